"""A real Airflow (api-server, scheduler, dag-processor, triggerer on 127.0.0.1) driven through the
REST API the UI uses: unpause, trigger with a conf of Params, poll, read XComs, backfill, refusals.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from support import TEST_SECRET_KEY

pytestmark = pytest.mark.e2e
VENV_BIN = Path(sys.executable).parent


class AirflowServer:
    """Airflow's four long-running components, each in its own process group."""

    def __init__(self, base_env: dict[str, str], home: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.env = {
            **base_env,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        }
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        for command in (["api-server", "--host", "127.0.0.1", "--port", str(self.port)],
                        ["scheduler"], ["dag-processor"], ["triggerer"]):
            log = open(self.home / f"{command[0]}.log", "wb")
            self.processes.append(subprocess.Popen([str(VENV_BIN / "airflow"), *command], env=self.env,
                                                   stdout=log, stderr=log, start_new_session=True))
        self.wait_for(lambda: self.get("/api/v2/monitor/health")["metadatabase"]["status"] == "healthy",
                      "api-server", 180)

    def stop(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            payload = err.read()
            try:
                return err.code, json.loads(payload)
            except ValueError:
                return err.code, {"detail": payload.decode(errors="replace")}

    def get(self, path: str) -> dict:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def wait_for(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, AssertionError, KeyError) as err:
                last_error = err
            time.sleep(2)
        raise TimeoutError(f"{what} not ready within {timeout} s (last: {last_error}); logs in {self.home}")

    def wait_for_dag(self, dag_id: str) -> None:
        self.wait_for(lambda: self.request("GET", f"/api/v2/dags/{dag_id}")[0] == 200, f"DAG {dag_id}", 180)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 1200) -> dict:
        state: dict = {}

        def finished() -> bool:
            state.update(self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))
            return state["state"] in ("success", "failed")

        self.wait_for(finished, f"run {run_id}", timeout)
        return state

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        body = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
        value = body["value"]
        return json.loads(value) if isinstance(value, str) else value


@pytest.fixture(scope="module")
def airflow_server(airflow_env, tmp_path_factory):
    server = AirflowServer(airflow_env, tmp_path_factory.mktemp("airflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_mnist(bucket, mnist_subset) -> str:
    import gzip

    from sparktf import idx, storage

    train_x, train_y, test_x, test_y = mnist_subset
    prefix = f"s3://{bucket}/rest/raw"
    for name, array in {"train-images-idx3-ubyte.gz": train_x[:400], "train-labels-idx1-ubyte.gz": train_y[:400],
                        "t10k-images-idx3-ubyte.gz": test_x[:100], "t10k-labels-idx1-ubyte.gz": test_y[:100]}.items():
        storage.write_bytes(f"{prefix}/{name}", gzip.compress(idx.encode_idx(array)))
    return prefix + "/"


def test_invalid_param_is_refused_with_a_clear_message(airflow_server):
    airflow_server.wait_for_dag("tuning_pipeline")
    status, body = airflow_server.request("POST", "/api/v2/dags/tuning_pipeline/dagRuns",
                                          {"logical_date": None, "conf": {"learning_rates": [0.01, 0]}})
    assert status == 400, body
    assert "learning_rates" in json.dumps(body) or "exclusiveMinimum" in json.dumps(body)
    runs = airflow_server.get("/api/v2/dags/tuning_pipeline/dagRuns")
    assert runs["total_entries"] == 0  # nothing was started


def test_trigger_tuning_with_params_and_read_xcoms(airflow_server, tiny_mnist, bucket):
    airflow_server.wait_for_dag("tuning_pipeline")
    status, body = airflow_server.request("PATCH", "/api/v2/dags/tuning_pipeline", {"is_paused": False})
    assert status == 200 and body["is_paused"] is False
    conf = {"dataset_uri": tiny_mnist, "workspace_uri": f"s3://{bucket}/rest/ws", "model_name": "digits",
            "learning_rates": [0.001, 0.003], "hidden_units": [32], "epochs": 1, "batch_sizes": [32],
            "model_family": "mlp"}
    status, run = airflow_server.request("POST", "/api/v2/dags/tuning_pipeline/dagRuns",
                                         {"logical_date": None, "conf": conf})
    assert status == 200, run
    final = airflow_server.wait_for_run("tuning_pipeline", run["dag_run_id"])
    assert final["state"] == "success", final
    prepared = airflow_server.xcom("tuning_pipeline", run["dag_run_id"], "prepare_data")
    tuned = airflow_server.xcom("tuning_pipeline", run["dag_run_id"], "tune")
    exported = airflow_server.xcom("tuning_pipeline", run["dag_run_id"], "export_best_model")
    assert prepared["counts"]["test"] == 100
    assert tuned["trials"] == 2 and tuned["succeeded"] == 2
    assert exported["version"] == 1 and exported["promoted"] is True
    assert TEST_SECRET_KEY not in json.dumps([prepared, tuned, exported])
