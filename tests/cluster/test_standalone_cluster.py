"""A real Spark standalone cluster on 127.0.0.1: a master and two 1-core workers.

The workers start with a clean environment (no PYTHONPATH, no project paths): the package reaches
them only as it would on a real cluster, through the operator's --py-files zip. Their S3
credentials are given to them like an instance role would be, in their own environment.
Every process started here is stopped by its process group id.
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

from sparktf import storage, trials
from sparktf_dev.testing import ROOT, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port, not_green, run_dag, upload_mnist

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
SPARK_HOME = str(Path(__import__("pyspark").__file__).parent)
VENV_BIN = Path(sys.executable).parent


def _clean_env(s3_endpoint: str, work_dir: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work_dir),
        "SPARK_HOME": SPARK_HOME,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(work_dir / "logs"),
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
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
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 - the daemon's log, open while it runs
        self.processes[name] = subprocess.Popen(
            [str(VENV_BIN / "spark-class"), *args], env=self.env, stdout=log, stderr=log, start_new_session=True
        )  # own process group: executors and Python workers die with it

    def start(self) -> None:
        self._start(
            "master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.ui_port)]
        )
        self._wait(lambda s: s.get("status") == "ALIVE", "master")
        for n in (1, 2):
            work = self.base / f"worker-{n}"
            work.mkdir()
            self._start(
                f"worker-{n}",
                [
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    "1",
                    "--memory",
                    "3g",
                    "--work-dir",
                    str(work),
                    "--webui-port",
                    str(free_port()),
                    self.url,
                ],
            )
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
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
    prefix = f"s3://{bucket}/cluster/raw"
    upload_mnist(prefix, mnist_subset, train_limit=800, test_limit=200)
    return prefix + "/"


@pytest.fixture(scope="module")
def cluster_tuning_run(cluster_airflow_env, raw_mnist, bucket, tmp_path_factory):
    conf = {
        "dataset_uri": raw_mnist,
        "workspace_uri": f"s3://{bucket}/cluster/ws",
        "model_name": "digits",
        "learning_rates": [0.001, 0.003],
        "hidden_units": [32, 64],
        "epochs": 1,
        "batch_sizes": [32],
    }
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


def start_dag(env: dict[str, str], out_dir: Path, dag_id: str, conf: dict) -> tuple[subprocess.Popen, Path, Path]:
    """Start a DAG run like :func:`sparktf_dev.testing.run_dag`, in the background (own process group)."""
    summary, log_path = out_dir / f"{dag_id}-summary.json", out_dir / f"{dag_id}.log"
    command = [sys.executable, str(ROOT / "scripts" / "run_dag.py"), dag_id, "--conf", json.dumps(conf), "--json-out", str(summary)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, summary, log_path


def started_attempts(prefix: str) -> list[tuple[str, dict, bool]]:
    """``(trial id, started marker, finished)`` of every trial attempt under a workspace prefix."""
    keys = set(storage.list_keys(prefix))
    bucket = storage.parse_uri(prefix).bucket
    found = []
    for key in sorted(keys):
        if "/tuning/trials/" in key and key.endswith("/" + trials.STARTED_NAME):
            attempt_dir = key.rsplit("/", 1)[0]
            trial_id = attempt_dir.split("/tuning/trials/", 1)[1].split("/", 1)[0]
            marker = storage.read_json(storage.object_uri(bucket, key))
            found.append((trial_id, marker, f"{attempt_dir}/{trials.RECORD_NAME}" in keys))
    return found


def ran_on(cluster: Cluster, worker: str, marker: dict) -> bool:
    """Whether an attempt's executor is one of ``worker``'s (its work dir is <worker>/<app>/<executor>)."""
    app_id = marker["job_id"].rsplit("-", 1)[0]  # the tuning job's id is <Spark application id>-<suffix>
    return (cluster.base / worker / app_id / str(marker["executor"].get("executor_id"))).is_dir()


def test_losing_a_worker_while_the_dags_tune_task_runs_trains_every_trial_once(cluster, cluster_airflow_env, raw_mnist, bucket, tmp_path):
    """Kill worker 2 (its process group: worker, executor, Python workers) while the DAG's tune task
    has a trial training there; the run still ends green and no trial is trained to completion twice."""
    ws = f"s3://{bucket}/cluster/worker-loss"
    conf = {
        "dataset_uri": raw_mnist,
        "workspace_uri": ws,
        "model_name": "digits",
        "model_family": "mnist_cnn",
        "learning_rates": [0.001, 0.002, 0.003],
        "hidden_units": [32, 64],
        "epochs": 2,
        "patience": 2,
        "batch_sizes": [32],
    }
    run, summary_path, log_path = start_dag(cluster_airflow_env, tmp_path, "tuning_pipeline", conf)
    try:
        victim = None
        deadline = time.monotonic() + 900
        while victim is None and time.monotonic() < deadline:
            assert run.poll() is None, log_path.read_text(errors="replace")[-6000:]
            victim = next(
                (
                    (trial_id, marker)
                    for trial_id, marker, finished in started_attempts(ws + "/")
                    if not finished and ran_on(cluster, "worker-2", marker)
                ),
                None,
            )
            if victim is None:
                time.sleep(0.5)
        assert victim is not None, "no trial started on worker 2"
        cluster.kill("worker-2")  # while that trial trains
        assert run.wait(timeout=1500) == 0, log_path.read_text(errors="replace")[-8000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = log_path.read_text(errors="replace")
    assert "lost executor" in output.lower()  # the driver saw the executor go

    summary = json.loads(summary_path.read_text())
    assert not_green(summary) == {}
    tune = summary["tasks"]["tune"]["xcom"]
    assert tune["trials"] == tune["succeeded"] == 6
    results = storage.read_json(tune["results_uri"])
    assert sorted(r["trial_id"] for r in results["trials"]) == sorted({r["trial_id"] for r in results["trials"]})

    # Training starts and completions per trial, from the attempts' markers and records in S3.
    attempts: dict[str, list[tuple[dict, bool]]] = {}
    for trial_id, marker, finished in started_attempts(ws + "/"):
        attempts.setdefault(trial_id, []).append((marker, finished))
    assert sorted(attempts) == sorted(r["trial_id"] for r in results["trials"])
    for trial_id, runs in attempts.items():
        assert sum(finished for _marker, finished in runs) == 1, (trial_id, runs)  # trained to completion once
        for marker, finished in runs:
            if finished:
                record = trials.attempt_uri(tune["trials_uri"], trial_id, marker["attempt_id"], trials.RECORD_NAME)
                assert storage.read_json(record)["status"] == "ok"

    victim_id, victim_marker = victim
    finished_by_attempt = {marker["attempt_id"]: finished for marker, finished in attempts[victim_id]}
    assert len(finished_by_attempt) == 2, attempts[victim_id]  # started on worker 2, then once more
    assert finished_by_attempt[victim_marker["attempt_id"]] is False  # killed with worker 2
    [rerun] = [marker for marker, _ in attempts[victim_id] if marker["attempt_id"] != victim_marker["attempt_id"]]
    assert finished_by_attempt[rerun["attempt_id"]]
    assert not ran_on(cluster, "worker-2", rerun)
    assert rerun["job_id"] == victim_marker["job_id"]
    assert rerun["attempt"] > victim_marker["attempt"]
    assert summary["tasks"]["export_best_model"]["xcom"]["version"] == 1


def test_nightly_inference_dag_scores_on_the_cluster_with_the_exported_champion(
    cluster_airflow_env, cluster_tuning_run, bucket, mnist_subset, tmp_path
):
    from sparktf import predictions
    from sparktf_dev.testing import land_partition

    conf, _summary = cluster_tuning_run
    _tx, _ty, test_x, test_y = mnist_subset
    landed = land_partition(conf["workspace_uri"] + "/incoming/", "2026-11-20", test_x[:24], test_y[:24], with_bad=False)
    storage.write_bytes(conf["workspace_uri"] + "/incoming/2026-11-20/scans/garbled.png", b"\x89PNG\r\n\x1a\n??")
    code, summary, output = run_dag(
        cluster_airflow_env,
        tmp_path,
        "nightly_inference",
        {"workspace_uri": conf["workspace_uri"], "model_name": conf["model_name"]},
        logical_date="2026-11-21T02:30:00+00:00",
    )
    assert code == 0, output[-6000:]
    job = summary["tasks"]["batch_inference"]["xcom"]
    assert job["executors"], job
    assert "driver" not in job["executors"], job  # scored by the workers' executors
    assert (job["scored"], job["set_aside"], job["model_version"]) == (len(landed), 1, 1)
    published = summary["tasks"]["publish"]["xcom"]
    rows, errors = predictions.read_predictions(published["output_uri"])
    assert sorted(r["key"] for r in rows) == sorted(landed)
    assert [(e["key"].rsplit("/", 1)[-1], e["reason"]) for e in errors] == [("garbled.png", "not_an_image")]
