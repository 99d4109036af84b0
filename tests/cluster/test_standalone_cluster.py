"""A real Spark standalone cluster on 127.0.0.1: a master and two 1-core workers.

The workers start with a clean environment (no PYTHONPATH, no project paths): the package reaches
them only as it would on a real cluster, through the operator's --py-files zip. Their S3
credentials are given to them like an instance role would be, in their own environment.
Every process started here is stopped by its process group id.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sparktf import idx, storage
from sparktf.testing import ROOT, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port, run_dag

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
SPARK_HOME = str(Path(__import__("pyspark").__file__).parent)
VENV_BIN = Path(sys.executable).parent


def _clean_env(s3_endpoint: str, work_dir: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work_dir), "SPARK_HOME": SPARK_HOME,
        "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(work_dir / "logs"),
        "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
    }
    if os.environ.get("JAVA_HOME"):
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    return env


def _master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as response:
        return json.loads(response.read())


class Cluster:
    def __init__(self, s3_endpoint: str, base: Path) -> None:
        self.base = base
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.env = _clean_env(s3_endpoint, base)
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.base / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            [str(VENV_BIN / "spark-class"), *args], env=self.env, stdout=log, stderr=log,
            start_new_session=True)  # own process group: executors and Python workers die with it

    def start(self) -> None:
        self._start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(self.port), "--webui-port", str(self.ui_port)])
        self._wait(lambda s: s.get("status") == "ALIVE", "master")
        for n in (1, 2):
            work = self.base / f"worker-{n}"
            work.mkdir()
            self._start(f"worker-{n}", ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                        "--cores", "1", "--memory", "3g", "--work-dir", str(work),
                                        "--webui-port", str(free_port()), self.url])
        self._wait(lambda s: sum(w["state"] == "ALIVE" for w in s.get("workers", [])) == 2, "two workers")

    def _wait(self, ready, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ready(_master_state(self.ui_port)):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready in {timeout} s; logs in {self.base}")

    def kill(self, name: str) -> None:
        process = self.processes[name]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.kill(name)


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    spark_cluster = Cluster(s3_endpoint, tmp_path_factory.mktemp("spark-cluster"))
    try:
        spark_cluster.start()
        yield spark_cluster
    finally:
        spark_cluster.stop()


@pytest.fixture(scope="module")
def cluster_airflow_env(airflow_env, cluster) -> dict[str, str]:
    env = dict(airflow_env)
    env["AIRFLOW_CONN_SPARK_DEFAULT"] = json.dumps({"conn_type": "spark", "host": cluster.url})
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["SPARKTF_EXECUTOR_MEMORY"] = "1g"
    return env


@pytest.fixture(scope="module")
def raw_mnist(bucket, mnist_subset) -> str:
    train_x, train_y, test_x, test_y = mnist_subset
    prefix = f"s3://{bucket}/cluster/raw"
    for name, array in {"train-images-idx3-ubyte.gz": train_x[:800], "train-labels-idx1-ubyte.gz": train_y[:800],
                        "t10k-images-idx3-ubyte.gz": test_x[:200], "t10k-labels-idx1-ubyte.gz": test_y[:200]}.items():
        storage.write_bytes(f"{prefix}/{name}", gzip.compress(idx.encode_idx(array)))
    return prefix + "/"


@pytest.fixture(scope="module")
def cluster_tuning_run(cluster_airflow_env, raw_mnist, bucket, tmp_path_factory):
    conf = {"dataset_uri": raw_mnist, "workspace_uri": f"s3://{bucket}/cluster/ws", "model_name": "digits",
            "learning_rates": [0.001, 0.003], "hidden_units": [32, 64], "epochs": 1, "batch_sizes": [32]}
    code, summary, output = run_dag(cluster_airflow_env, tmp_path_factory.mktemp("run"), "tuning_pipeline", conf)
    assert code == 0, output[-6000:]
    return conf, summary


def test_tuning_dag_runs_on_the_cluster_and_uses_both_workers(cluster_tuning_run):
    _conf, summary = cluster_tuning_run
    tune = summary["tasks"]["tune"]["xcom"]
    assert tune["succeeded"] == 4
    assert len(tune["executors"]) == 2, tune["executors"]  # trials ran on both workers
    assert "driver" not in tune["executors"]
    assert summary["tasks"]["export_best_model"]["xcom"]["version"] == 1


def test_losing_a_worker_mid_job_still_finishes_every_trial_once(cluster, cluster_tuning_run, bucket, tmp_path):
    _conf, summary = cluster_tuning_run
    prepared = summary["tasks"]["prepare_data"]["xcom"]["prepared_uri"]
    out = f"s3://{bucket}/cluster/worker-loss/"
    env = {**cluster.env, "PATH": f"{VENV_BIN}:{cluster.env['PATH']}", "PYSPARK_PYTHON": sys.executable}
    from sparktf.airflow.spark_job_operator import package_zip

    zip_path, _sha = package_zip()
    command = [str(VENV_BIN / "spark-submit"), "--master", cluster.url, "--conf", "spark.task.cpus=1",
               "--conf", "spark.executor.memory=1g", "--py-files", zip_path, str(ROOT / "jobs" / "tune.py"),
               "--prepared-uri", prepared, "--output-uri", out, "--model-family", "mnist_cnn",
               "--learning-rates", "0.001,0.002,0.003", "--hidden-units", "32,64", "--epochs", "2",
               "--patience", "2", "--batch-sizes", "32", "--result-uri", out + "result.json"]
    log = open(tmp_path / "tune.log", "wb")
    job = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        # Wait until trials are running on both workers, then kill worker 2 with its executor.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            apps = _master_state(cluster.ui_port).get("activeapps", [])
            if apps and len(storage.list_keys(out + "trials/")) >= 1:
                break
            assert job.poll() is None, (tmp_path / "tune.log").read_text()[-4000:]
            time.sleep(0.5)
        cluster.kill("worker-2")
        assert job.wait(timeout=900) == 0, (tmp_path / "tune.log").read_text()[-6000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    driver_log = (tmp_path / "tune.log").read_text(errors="replace")
    assert "Lost executor" in driver_log or "lost executor" in driver_log.lower()  # the loss really happened
    result = storage.read_json(out + "result.json")
    results = storage.read_json(out + "results.json")
    assert result["trials"] == 6 and result["succeeded"] == 6
    ids = [r["trial_id"] for r in results["trials"]]
    assert len(ids) == len(set(ids)) == 6
    metrics = [k for k in storage.list_keys(out + "trials/") if k.endswith("metrics.json")]
    assert len(metrics) == 6  # one record per trial, however many attempts ran


def test_nightly_inference_dag_scores_on_the_cluster_with_the_exported_champion(
        cluster_airflow_env, cluster_tuning_run, bucket, mnist_subset, tmp_path):
    from sparktf import predictions
    from sparktf.testing import land_partition

    conf, _summary = cluster_tuning_run
    _tx, _ty, test_x, test_y = mnist_subset
    landed = land_partition(conf["workspace_uri"] + "/incoming/", "2026-11-20", test_x[:24], test_y[:24],
                            with_bad=False)
    storage.write_bytes(conf["workspace_uri"] + "/incoming/2026-11-20/scans/garbled.png", b"\x89PNG\r\n\x1a\n??")
    code, summary, output = run_dag(cluster_airflow_env, tmp_path, "nightly_inference",
                                    {"workspace_uri": conf["workspace_uri"], "model_name": conf["model_name"]},
                                    logical_date="2026-11-21T02:30:00+00:00")
    assert code == 0, output[-6000:]
    job = summary["tasks"]["batch_inference"]["xcom"]
    assert job["executors"] and "driver" not in job["executors"], job  # scored by the workers' executors
    assert (job["scored"], job["set_aside"], job["model_version"]) == (len(landed), 1, 1)
    published = summary["tasks"]["publish"]["xcom"]
    rows, errors = predictions.read_predictions(published["output_uri"])
    assert sorted(r["key"] for r in rows) == sorted(landed)
    assert [(e["key"].rsplit("/", 1)[-1], e["reason"]) for e in errors] == [("garbled.png", "not_an_image")]
