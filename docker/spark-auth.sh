#!/bin/sh
# Entrypoint wrapper of the Spark master, the workers and the scheduler (the spark-submit client):
# turns on Spark's RPC authentication with the shared secret of .env, then runs the command.
#
# The secret goes into $SPARK_CONF_DIR/spark-defaults.conf (mode 600), which the Master, Worker
# and spark-submit all read, and is removed from the environment, so it is never on a command
# line, in the operator's conf (the UI shows rendered templates) or in a task's environment.
# Executors get it from their worker (Spark passes it in their launch environment).
set -eu
: "${SPARK_CONF_DIR:?SPARK_CONF_DIR is not set}"
: "${SPARK_AUTH_SECRET:?SPARK_AUTH_SECRET is not set (see .env.example)}"
umask 077
mkdir -p "$SPARK_CONF_DIR"
partial="$SPARK_CONF_DIR/.spark-defaults.conf.$$"
printf 'spark.authenticate true\nspark.authenticate.secret %s\n' "$SPARK_AUTH_SECRET" > "$partial"
mv "$partial" "$SPARK_CONF_DIR/spark-defaults.conf"
unset SPARK_AUTH_SECRET
exec "$@"
