# Sourced by the other scripts: the embedded local stack's environment (project-local, no Docker).
# Override any of these in your shell before running a script.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT
# Defaults this file derived from another checkout (sourced there first, e.g. in the same shell) are
# not overrides: a fresh clone's set-up must not install into the other checkout's venv.
if [ -n "${SPARKTF_ENV_ROOT:-}" ] && [ "$SPARKTF_ENV_ROOT" != "$ROOT" ]; then
  if [ "${VENV:-}" = "$SPARKTF_ENV_ROOT/.venv" ]; then unset VENV; fi
  if [ "${SPARKTF_STATE_DIR:-}" = "$SPARKTF_ENV_ROOT/.stack" ]; then unset SPARKTF_STATE_DIR; fi
fi
export SPARKTF_ENV_ROOT="$ROOT"
export VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export SPARKTF_STATE_DIR="${SPARKTF_STATE_DIR:-$ROOT/.stack}"
export SPARKTF_S3_PORT="${SPARKTF_S3_PORT:-5055}"
export SPARKTF_S3_ENDPOINT="${SPARKTF_S3_ENDPOINT:-http://127.0.0.1:$SPARKTF_S3_PORT}"
export SPARKTF_WORKSPACE_URI="${SPARKTF_WORKSPACE_URI:-s3://ml-pipeline}"
# local[N,F]: N task slots, F attempts per task (local mode ignores spark.task.maxFailures; a
# retry is how a trial whose Python worker died gets recorded as failed instead of failing tune).
export SPARKTF_SPARK_MASTER="${SPARKTF_SPARK_MASTER:-local[2,4]}"

# Project-local Airflow home and metadata DB (SQLite), whatever AIRFLOW_HOME your shell has.
export AIRFLOW_HOME="${SPARKTF_AIRFLOW_HOME:-$ROOT/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=True
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW__LOGGING__LOGGING_LEVEL:-INFO}"
# The embedded S3 server (moto) accepts any key pair: these are local placeholders, not secrets.
# On a real deployment, define aws_default in Airflow (or use the instance's role) instead.
# Each default is built in a variable first: inside ${VAR:-...} the expansion would end at the
# JSON's first "}", so sourcing this file a second time appended a stray "}" to both connections.
sparktf_default_conn="{\"conn_type\": \"aws\", \"login\": \"local-access-key\", \"password\": \"local-secret-key\", \"extra\": {\"endpoint_url\": \"$SPARKTF_S3_ENDPOINT\", \"region_name\": \"us-east-1\"}}"
: "${AIRFLOW_CONN_AWS_DEFAULT:=$sparktf_default_conn}"
sparktf_default_conn="{\"conn_type\": \"spark\", \"host\": \"$SPARKTF_SPARK_MASTER\"}"
: "${AIRFLOW_CONN_SPARK_DEFAULT:=$sparktf_default_conn}"
unset sparktf_default_conn
export AIRFLOW_CONN_AWS_DEFAULT AIRFLOW_CONN_SPARK_DEFAULT
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$VENV/bin/python}"
export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$VENV/bin/python}"
export TF_CPP_MIN_LOG_LEVEL=2
# Spark binds its driver and block manager to loopback only.
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
