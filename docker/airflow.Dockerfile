# Airflow image (docker-compose.yaml: airflow-init, api-server, scheduler, dag-processor, triggerer).
#
# Airflow 3.3.2 with the Spark provider, on Python 3.11 + Java 17: the Airflow containers are the
# spark-submit clients and, in client deploy mode, the Spark driver runs in the container that
# runs the task (the scheduler, with the LocalExecutor). The driver imports the jobs, so the
# jobs' dependencies (TensorFlow, Pillow, boto3, pyarrow, pandas, matplotlib) are installed too,
# pinned as in requirements.txt via requirements-airflow.txt (the test-only packages left out).
#
# Built from python:3.11-slim-bookworm rather than apache/airflow so that Java 17 comes from
# Debian bookworm and the Python packages resolve exactly as in the project's tested .venv.
# dags/, jobs/ and plugins/ are not copied: docker-compose.yaml mounts them (read-only).
# Build context: docker/. linux/amd64: tensorflow-cpu has no Linux aarch64 wheels.
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# curl: health checks; procps: Spark's launch scripts use ps. The man1 folder: openjdk's
# postinst expects it on slim images.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps curl \
    && rm -rf /var/lib/apt/lists/*

COPY requirements-airflow.txt /tmp/requirements-airflow.txt
RUN pip install -r /tmp/requirements-airflow.txt && rm /tmp/requirements-airflow.txt

ENV AIRFLOW_HOME=/opt/airflow \
    PYSPARK_PYTHON=python3 \
    PYSPARK_DRIVER_PYTHON=python3 \
    TF_CPP_MIN_LOG_LEVEL=2
# Smoke check at build time (a throwaway AIRFLOW_HOME: no airflow.cfg with secrets baked in).
RUN AIRFLOW_HOME=/tmp/airflow-check airflow version && rm -rf /tmp/airflow-check \
    && spark-submit --version && java -version \
    && python3 -c "import pyspark, tensorflow, PIL, boto3, pyarrow, pandas, matplotlib, psycopg2; print('pyspark', pyspark.__version__, 'tensorflow', tensorflow.__version__)"

# Non-root (uid 50000, gid 0 as in the official Airflow image). The mount points and the
# volume folders exist in the image with this owner, so named volumes start writable.
RUN useradd --uid 50000 --gid 0 --create-home --home-dir /home/airflow airflow \
    && mkdir -p /opt/airflow/dags /opt/airflow/jobs /opt/airflow/plugins /opt/airflow/logs /opt/airflow/auth \
    && chown -R 50000:0 /opt/airflow
USER 50000
WORKDIR /opt/airflow

EXPOSE 8080 8793 8974
ENTRYPOINT ["airflow"]
CMD ["version"]
