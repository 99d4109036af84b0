"""Spark RPC authentication as docker-compose.yaml sets it up, on a real standalone cluster on 127.0.0.1.

The master, a worker and the driver's spark-submit are each started through docker/spark-auth.sh
(with its own SPARK_CONF_DIR, as each container has its own), as the spark-master, spark-worker and
scheduler services start them. A driver with the secret runs a job on an executor; a driver without
it is refused. Every process started here is stopped by its process group id.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sparktf_dev.testing import free_port

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
SPARK_AUTH_SCRIPT = ROOT / "docker" / "spark-auth.sh"
VENV_BIN = Path(sys.executable).parent
SPARK_HOME = str(Path(__import__("pyspark").__file__).parent)
SECRET = "a-shared-secret-of-the-test-0123456789"
APP = """
from pyspark.sql import SparkSession
spark = SparkSession.builder.appName("auth-check").getOrCreate()
print("authenticate=" + spark.sparkContext.getConf().get("spark.authenticate", "false"))
print("count=%d" % spark.sparkContext.parallelize(range(10), 2).map(lambda x: x).count())
spark.stop()
"""


def base_env(work: Path, conf_dir: str) -> dict[str, str]:
    env = {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "SPARK_HOME": SPARK_HOME,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(work / "logs"),
        "SPARK_CONF_DIR": str(work / conf_dir),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    if os.environ.get("JAVA_HOME"):
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    return env


def master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as response:
        return json.loads(response.read())


def wait_for(ready, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready in {timeout} s")


@pytest.fixture(scope="module")
def authenticated_cluster(tmp_path_factory):
    """A master and a 1-core worker started through spark-auth.sh with SECRET; the master's URL."""
    work = tmp_path_factory.mktemp("spark-auth")
    port, ui_port = free_port(), free_port()
    url = f"spark://127.0.0.1:{port}"
    daemons = {
        "master": ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui_port)],
        "worker": [
            "org.apache.spark.deploy.worker.Worker",
            "--host",
            "127.0.0.1",
            "--cores",
            "1",
            "--memory",
            "1g",
            "--work-dir",
            str(work / "worker"),
            "--webui-port",
            str(free_port()),
            url,
        ],
    }
    processes = []
    try:
        for name, args in daemons.items():
            log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - the daemon's log, open while it runs
            env = {**base_env(work, f"{name}-conf"), "SPARK_AUTH_SECRET": SECRET}
            processes.append(
                subprocess.Popen(["/bin/sh", str(SPARK_AUTH_SCRIPT), "spark-class", *args], env=env, stdout=log, stderr=log, start_new_session=True)
            )
            if name == "master":
                wait_for(lambda: master_state(ui_port).get("status") == "ALIVE", "master")
        wait_for(lambda: sum(w["state"] == "ALIVE" for w in master_state(ui_port).get("workers", [])) == 1, "worker")
        yield {"url": url, "work": work}
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def submit(cluster: dict, *, with_secret: bool, timeout: float) -> subprocess.CompletedProcess:
    app = cluster["work"] / "app.py"
    app.write_text(APP)
    env = base_env(cluster["work"], "driver-conf" if with_secret else "no-conf")
    command = [
        "spark-submit",
        "--master",
        cluster["url"],
        "--conf",
        "spark.executor.memory=512m",
        "--conf",
        "spark.cores.max=1",
        "--conf",
        "spark.ui.enabled=false",
        str(app),
    ]
    if with_secret:  # as the scheduler service runs it
        env["SPARK_AUTH_SECRET"] = SECRET
        command = ["/bin/sh", str(SPARK_AUTH_SCRIPT), *command]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=30)
    return subprocess.CompletedProcess(command, process.returncode, out, "")


def test_the_daemons_run_with_authentication_on(authenticated_cluster):
    for name in ("master", "worker"):
        log = (authenticated_cluster["work"] / f"{name}.log").read_text()
        assert "authentication enabled" in log, log[-3000:]
        assert SECRET not in log


def test_a_driver_with_the_secret_runs_a_job(authenticated_cluster):
    proc = submit(authenticated_cluster, with_secret=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "count=10" in proc.stdout, proc.stdout[-4000:]
    assert "authenticate=true" in proc.stdout
    assert SECRET not in proc.stdout


def test_a_driver_without_the_secret_is_refused(authenticated_cluster):
    proc = submit(authenticated_cluster, with_secret=False, timeout=150)
    assert "count=10" not in proc.stdout
    assert proc.returncode != 0, proc.stdout[-4000:]
