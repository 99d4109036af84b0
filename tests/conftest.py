"""Shared fixtures: a real S3 server (moto) on 127.0.0.1, a local SparkSession, small data.

Everything is session-scoped and cheap: one S3 server and one SparkSession per test process.
Tests never use ../shared: their data comes from the demo subset shipped in data/demo/. The
helpers behind these fixtures live in :mod:`sparktf_dev.testing` (the development package beside the
library, shared with bench/ and scripts/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from sparktf import storage
from sparktf_dev import testing

ROOT = testing.ROOT
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # Spark listens on loopback only
# Airflow reads its configuration at import: point it at a throwaway home (never the demo's
# .airflow, which a fresh clone does not have) and this repo's folders.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="sparktf-airflow-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


@pytest.fixture(scope="session")
def dag_bag():
    """Every DAG file of ``dags/`` parsed once for the session (``dag_bag.dags[dag_id]``; get_dag() would query the DB)."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> testing.S3Server:
    """A moto S3 server on 127.0.0.1 for the whole session; sets the standard AWS variables."""
    server = testing.S3Server(log_path=str(tmp_path_factory.mktemp("moto") / "moto.log"))
    with server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    return s3_server.endpoint


@pytest.fixture(scope="session")
def bucket(s3_endpoint) -> str:
    name = "sparktf-tests"
    storage.create_bucket(name)
    return name


@pytest.fixture
def s3_prefix(bucket) -> str:
    """A fresh, unique S3 prefix for one test."""
    return f"s3://{bucket}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def spark(s3_endpoint):
    """One local SparkSession (2 task slots) for the session, created after the S3 variables."""
    session = testing.local_spark(2, "sparktf-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def mnist_subset():
    """The shipped demo digits: ``(train_x, train_y, test_x, test_y)`` as uint8 arrays."""
    return testing.read_mnist()


@pytest.fixture(scope="session")
def airflow_env(s3_server, tmp_path_factory) -> dict[str, str]:
    """Environment for ``airflow`` subprocesses: own metadata DB, the repo's DAGs, real connections."""
    home = tmp_path_factory.mktemp("airflow-home")
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_AWS_DEFAULT": s3_server.connection_json(),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
    }
    # The jobs must get S3 settings from the connection, as on a real deployment, not from the
    # test process's own AWS variables.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env.pop(name, None)
    subprocess.run([os.path.join(venv_bin, "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    return env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend, local artifact folder), from its own venv."""
    from sparktf_dev.mlflow_server import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server
