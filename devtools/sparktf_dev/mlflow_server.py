"""A real MLflow tracking server on 127.0.0.1 for tests and the local demo: SQLite backend, local artifacts.

The server runs from its own virtualenv (``.stack/mlflow-venv``, made by ``scripts/setup.sh`` from
``requirements-mlflow-server.txt``): the full ``mlflow`` package pins versions the Airflow venv must
not take. The DAGs talk to it over its REST API (:mod:`sparktf.airflow.mlflow_tracking`); tests read
back what a user would see with MLflow's own client, run in that venv (:meth:`MlflowServer.read`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from sparktf_dev.testing import ROOT, free_port, http_ok, stop_process_group, wait_until

SERVER_VENV = Path(os.environ.get("SPARKTF_MLFLOW_VENV", ROOT / ".stack" / "mlflow-venv"))


def server_python() -> Path:
    """The server venv's interpreter (raises with what to run when it is missing)."""
    python = SERVER_VENV / "bin" / "python"
    if not (SERVER_VENV / "bin" / "mlflow").exists():
        raise FileNotFoundError(f"no MLflow server venv at {SERVER_VENV}: run scripts/setup.sh (it installs requirements-mlflow-server.txt there)")
    return python


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with ``<state_dir>/mlflow.db`` and ``<state_dir>/artifacts``; a context manager."""

    def __init__(self, state_dir: str | Path, port: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def is_up(self) -> bool:
        try:
            return http_ok(self.uri + "/health")
        except OSError:
            return False

    def start(self, timeout: float = 120.0) -> MlflowServer:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(SERVER_VENV / "bin" / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.state_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.state_dir / "artifacts"),
        ]
        server_python()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.state_dir / "mlflow.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            wait_until(self.is_up, f"MLflow server at {self.uri}", timeout, interval=0.5, process=self.process)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None

    def connection_json(self) -> str:
        """The ``mlflow_default`` connection (as ``AIRFLOW_CONN_MLFLOW_DEFAULT``): host = tracking URI."""
        return json.dumps({"conn_type": "http", "host": self.uri})

    def read(self, script: str) -> Any:
        """Run ``script`` with MLflow's own client in the server venv (``client`` is a ``MlflowClient``
        of this server); it assigns ``result``, returned as JSON."""
        program = "import json, mlflow\nclient = mlflow.MlflowClient(tracking_uri=%r)\n%s\nprint(json.dumps(result, default=str))\n" % (
            self.uri,
            script,
        )
        out = subprocess.run([str(server_python()), "-c", program], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"reading MLflow failed: {out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
