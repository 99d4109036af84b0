"""The embedded stack's Airflow UI: api-server, scheduler, dag-processor and triggerer on 127.0.0.1.

``airflow standalone`` cannot be confined to loopback: the scheduler and the triggerer each start
a log server, and those have no host setting (they bind every interface). This starts the four
components the way a deployment would, with every socket on 127.0.0.1:

* ``airflow api-server --host 127.0.0.1 --port <port>`` (UI, REST API, execution API);
* ``airflow scheduler --skip-serve-logs`` with the LocalExecutor, so tasks run on this machine and
  write their logs under ``$AIRFLOW_HOME/logs``; the api-server reads them from there (it serves
  a task's log from the local file first, and only asks a log server when the file is missing);
* ``airflow dag-processor`` (no log server);
* ``airflow triggerer --skip-serve-logs``.

Each component runs in its own process group (stopped as a group, with the Spark jobs its tasks
started), logs to ``<state dir>/airflow-<component>.log``, and is recorded in
``<state dir>/airflow-ui.json``. The api-server and the tasks share a JWT secret generated per
start and handed over in the environment only (never written to disk or logs).

Used by ``scripts/ui.py`` (start / stop / status) and the REST tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
LOOPBACK = "127.0.0.1"


def component_command(name: str, port: int) -> list[str]:
    """The ``airflow`` arguments of one component: every listening socket on 127.0.0.1."""
    return {
        "api-server": ["api-server", "--host", LOOPBACK, "--port", str(port)],
        # --skip-serve-logs: no log server (it would listen on every interface); see the module doc.
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", "--skip-serve-logs"],
    }[name]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalAirflow:
    """Start, stop and inspect the four Airflow components of a local UI.

    Args:
        state_dir: where the pid file and the components' logs go.
        port: the api-server's port (127.0.0.1 only).
        env: the base environment (``AIRFLOW_HOME``, DAG and plugin folders, connections...);
            default: this process's.
        settings: extra ``AIRFLOW__*`` settings; they win over the defaults set here.
    """

    def __init__(self, state_dir: str | Path, port: int = 8080, env: dict[str, str] | None = None, settings: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = int(port)
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.env = dict(os.environ if env is None else env)
        self.settings = dict(settings or {})
        self.airflow = str(Path(sys.executable).with_name("airflow"))
        self.pid_file = self.state_dir / "airflow-ui.json"
        self.processes: dict[str, subprocess.Popen] = {}

    def environment(self) -> dict[str, str]:
        env = {
            **self.env,
            "AIRFLOW__CORE__EXECUTOR": self.env.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
            "AIRFLOW__CORE__PARALLELISM": self.env.get("AIRFLOW__CORE__PARALLELISM", "4"),
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            # Spark jobs that tasks start bind their driver, block manager and UI here too.
            "SPARK_LOCAL_IP": self.env.get("SPARK_LOCAL_IP", LOOPBACK),
        }
        env.update(self.settings)
        return env

    # -- state -------------------------------------------------------------------------------
    def recorded(self) -> dict[str, Any]:
        try:
            return json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return {}

    def pids(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in self.recorded().get("pids", {}).items()}

    def running(self) -> dict[str, bool]:
        return {name: _alive(pid) for name, pid in self.pids().items()}

    def health(self) -> dict[str, Any] | None:
        """The api-server's ``/api/v2/monitor/health`` (None when it does not answer)."""
        try:
            with urllib.request.urlopen(self.base_url + "/api/v2/monitor/health", timeout=5) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def healthy(self) -> bool:
        health = self.health() or {}
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all((health.get(part) or {}).get("status") == "healthy" for part in parts)

    # -- start / stop ------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> None:
        """Migrate the metadata DB, start the four components, wait until all report healthy."""
        if any(self.running().values()):
            raise RuntimeError(f"the Airflow UI is already running (pids in {self.pid_file}); stop it first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        migrate = subprocess.run([self.airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed: {migrate.stderr[-2000:]}")
        try:
            for name in COMPONENTS:
                with open(self.state_dir / f"airflow-{name}.log", "ab") as log:
                    self.processes[name] = subprocess.Popen(
                        [self.airflow, *component_command(name, self.port)],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
            self.pid_file.write_text(
                json.dumps({"port": self.port, "base_url": self.base_url, "pids": {n: p.pid for n, p in self.processes.items()}})
            )
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, alive in self.running().items() if not alive]
            if dead:
                raise RuntimeError(f"Airflow component(s) {dead} exited; see {self.state_dir}/airflow-<component>.log")
            if self.healthy():
                return
            time.sleep(1.0)
        raise TimeoutError(f"Airflow UI not healthy within {timeout:.0f} s: {self.health()}; logs in {self.state_dir}")

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM each component's process group, SIGKILL what is left after ``timeout``."""
        pids = self.pids() or {n: p.pid for n, p in self.processes.items()}
        stopped = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for name, pid in pids.items():
                if _alive(pid):
                    try:
                        os.killpg(pid, sig)
                    except ProcessLookupError:
                        continue
                    stopped.append(name)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(_alive(pid) for pid in pids.values()):
                for process in self.processes.values():
                    if process.poll() is None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            process.wait(timeout=0.5)
                time.sleep(0.2)
            if not any(_alive(pid) for pid in pids.values()):
                break
        self.pid_file.unlink(missing_ok=True)
        self.processes.clear()
        return sorted(set(stopped))

    # -- sockets -------------------------------------------------------------------------------
    def listening_sockets(self) -> list[tuple[str, str, int, int]]:
        """``(component, address, port, pid)`` of every TCP socket the components' process groups
        (children included) listen on."""
        import psutil

        groups = {pid: name for name, pid in self.pids().items()}
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                group = os.getpgid(process.pid)
                if group not in groups:
                    continue
                for conn in process.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.append((groups[group], conn.laddr.ip, conn.laddr.port, process.pid))
            except (psutil.Error, ProcessLookupError):
                continue
        return sorted(set(found))
