# Spark standalone master and worker image (docker-compose.yaml: spark-master, spark-worker-1/2).
#
# Python 3.11 (the same minor version as the driver in the Airflow image: PySpark refuses a
# driver/worker minor mismatch), Java 17, and PySpark 4.2.0, whose bundled Spark distribution
# (jars + bin/spark-class) runs the Master and Worker daemons, so SPARK_HOME is PySpark's install
# directory. Executors run the jobs' Python code here: TensorFlow (CPU), Pillow, boto3, pyarrow,
# pandas (numpy comes with them), pinned as in requirements.txt via requirements-spark.txt.
#
# Build context: docker/ (see docker-compose.yaml). linux/amd64: tensorflow-cpu has no
# Linux aarch64 wheels.
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# procps: Spark's launch scripts use ps. The man1 folder: openjdk's postinst expects it on slim.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/*

COPY requirements-spark.txt /tmp/requirements-spark.txt
RUN pip install -r /tmp/requirements-spark.txt && rm /tmp/requirements-spark.txt

ENV SPARK_HOME=/usr/local/lib/python3.11/site-packages/pyspark \
    SPARK_WORKER_DIR=/opt/spark/work \
    SPARK_LOG_DIR=/opt/spark/logs \
    PYSPARK_PYTHON=python3 \
    TF_CPP_MIN_LOG_LEVEL=2
# Fail the build early if PySpark's Spark distribution or Java is not where Spark looks for them.
RUN test -x "$SPARK_HOME/bin/spark-class" && test -d "$SPARK_HOME/jars" && java -version \
    && python3 -c "import pyspark, tensorflow, PIL, boto3, pyarrow, pandas, numpy; print('pyspark', pyspark.__version__, 'tensorflow', tensorflow.__version__)"

# Non-root; the worker's work dir (application files, executor logs) must be writable.
RUN useradd --uid 185 --gid 0 --create-home --home-dir /home/spark spark \
    && mkdir -p /opt/spark/work /opt/spark/logs \
    && chown -R 185:0 /opt/spark
USER 185
WORKDIR /opt/spark

EXPOSE 7077 8080 8081
# The compose file passes the full command (Master or Worker with its arguments).
CMD ["spark-class", "org.apache.spark.deploy.master.Master"]
