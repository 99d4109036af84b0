"""Start, stop or check the embedded stack's Airflow UI on 127.0.0.1 (like scripts/stack.py for S3).

Usage (after ``source scripts/env.sh``)::

    python scripts/ui.py start    # api-server on http://127.0.0.1:8080, scheduler, dag-processor, triggerer
    python scripts/ui.py status
    python scripts/ui.py stop

Every socket listens on 127.0.0.1 (see :mod:`sparktf.airflow.local_ui`); logs go to
``.stack/airflow-<component>.log``. The port comes from ``SPARKTF_UI_PORT`` (default 8080).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sparktf.airflow.local_ui import LocalAirflow

STATE_DIR = Path(os.environ.get("SPARKTF_STATE_DIR", Path(__file__).resolve().parents[1] / ".stack"))
PORT = int(os.environ.get("SPARKTF_UI_PORT", "8080"))


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    ui = LocalAirflow(STATE_DIR, PORT)
    if command == "start":
        if any(ui.running().values()):
            print(f"Airflow UI already running at {ui.recorded().get('base_url')}")
            return 0
        print(f"starting the Airflow UI on {ui.base_url} (logs: {STATE_DIR}/airflow-<component>.log) ...")
        ui.start()
        home = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser()
        print(f"Airflow UI up at {ui.base_url}: user admin, password in {home / 'simple_auth_manager_passwords.json.generated'}")
        for name, address, port, _pid in ui.listening_sockets():
            print(f"  {name:14s} listens on {address}:{port}")
        return 0
    if command == "stop":
        stopped = ui.stop()
        print(f"stopped: {', '.join(stopped)}" if stopped else "no Airflow UI started by this project was running")
        return 0
    if command == "status":
        running = ui.running()
        if not running:
            print("Airflow UI: not started")
            return 1
        health = ui.health()
        print(
            f"Airflow UI at {ui.recorded().get('base_url')}: " + ", ".join(f"{name} {'up' if alive else 'DOWN'}" for name, alive in running.items())
        )
        print(json.dumps(health, indent=2) if health else "api-server not answering")
        return 0 if all(running.values()) and ui.healthy() else 1
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
