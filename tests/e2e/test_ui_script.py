"""scripts/ui.py: the documented way to start the UI puts every listening socket on 127.0.0.1.

``airflow standalone`` cannot: the scheduler's and the triggerer's log servers bind every
interface. The script starts the four components itself (see sparktf.airflow.local_ui); this test
starts it on a free port, lists every listening TCP socket of the four process groups (children
included) and stops it. That the UI still shows the logs of tasks it ran without log servers is
checked in test_airflow_rest.py (task logs read through the API).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from sparktf.airflow.local_ui import COMPONENTS, LocalAirflow, _alive
from sparktf_dev.testing import ROOT, free_port

pytestmark = pytest.mark.e2e
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_ui_script_listens_on_loopback_only_and_stops_cleanly(airflow_env, tmp_path):
    port, state = free_port(), tmp_path / "state"
    (tmp_path / "home").mkdir()
    env = {**airflow_env, "AIRFLOW_HOME": str(tmp_path / "home"), "SPARKTF_STATE_DIR": str(state), "SPARKTF_UI_PORT": str(port)}

    def ui(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "ui.py"), command], env=env, capture_output=True, text=True, timeout=420)

    started = ui("start")
    pids = LocalAirflow(state, port).pids()
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"Airflow UI up at http://127.0.0.1:{port}" in started.stdout
        assert set(pids) == set(COMPONENTS)
        status = ui("status")
        assert status.returncode == 0, status.stdout
        assert all(f"{name} up" in status.stdout for name in COMPONENTS), status.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
            assert b"<html" in response.read().lower()
        sockets = LocalAirflow(state, port).listening_sockets()
        assert ("api-server", "127.0.0.1", port) in {s[:3] for s in sockets}
        assert {address for _name, address, _port, _pid in sockets} <= LOOPBACK, sockets
        assert (state / "airflow-scheduler.log").exists()
        assert (state / "airflow-api-server.log").exists()
    finally:
        stopped = ui("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped:" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not any(_alive(pid) for pid in pids.values())
    assert ui("status").returncode == 1
