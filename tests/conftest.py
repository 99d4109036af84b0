"""Shared fixtures: a real S3 server (moto) on 127.0.0.1, a local SparkSession, small data.

Everything is session-scoped and cheap: one S3 server and one SparkSession per test process.
Tests never use ../shared: their data comes from the demo subset shipped in data/demo/.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
JOBS = ROOT / "jobs"
for path in (str(PLUGINS), str(JOBS)):
    if path not in sys.path:
        sys.path.insert(0, path)
# Spark's Python workers inherit this process's environment: make the package and jobs importable.
os.environ["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), str(JOBS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # Spark listens on loopback only
# Airflow reads its configuration at import: point it at a throwaway home (never the demo's
# .airflow, which a fresh clone does not have) and this repo's folders.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="sparktf-airflow-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(PLUGINS)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"

from support import TEST_ACCESS_KEY, TEST_SECRET_KEY  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """A moto S3 server on 127.0.0.1 for the whole session; sets the standard AWS variables."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/")
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
        })
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def bucket(s3_endpoint) -> str:
    from sparktf import storage

    name = "sparktf-tests"
    storage.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_prefix(bucket) -> str:
    """A fresh, unique S3 prefix for one test."""
    return f"s3://{bucket}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def spark(s3_endpoint):
    """One local SparkSession (2 task slots) for the session, created after the S3 variables."""
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("sparktf-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
               .config("spark.python.worker.reuse", "true").config("spark.task.maxFailures", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def mnist_subset():
    """The shipped demo digits: ``(train_x, train_y, test_x, test_y)`` as uint8 arrays."""
    from sparktf import idx

    folder = ROOT / "data" / "demo" / "mnist"

    def load(name):
        return idx.parse_idx(gzip.decompress((folder / name).read_bytes()))

    return (load("train-images-idx3-ubyte.gz"), load("train-labels-idx1-ubyte.gz"),
            load("t10k-images-idx3-ubyte.gz"), load("t10k-labels-idx1-ubyte.gz"))


@pytest.fixture(scope="session")
def airflow_env(s3_endpoint, tmp_path_factory) -> dict[str, str]:
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
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({
            "conn_type": "aws", "login": TEST_ACCESS_KEY, "password": TEST_SECRET_KEY,
            "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        "PYTHONPATH": str(ROOT / "plugins"),
    }
    # The jobs must get S3 settings from the connection, as on a real deployment, not from the
    # test process's own AWS variables.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env.pop(name, None)
    subprocess.run([os.path.join(venv_bin, "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=600)
    return env
