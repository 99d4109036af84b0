# The MLflow tracking server of the compose stack: the pins of ../requirements-mlflow-server.txt
# (the tests' server) plus the drivers of its stores (PostgreSQL backend, S3/MinIO artifacts).
FROM python:3.11-slim-bookworm
COPY requirements-mlflow.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements-mlflow.txt
USER 1000:1000
