"""Start, stop or check the embedded local stack's S3 server (moto) on 127.0.0.1.

Usage: python scripts/stack.py start|stop|status

The server keeps its objects in memory for as long as it runs; ``start`` is idempotent (it
reuses a running server), so champion models survive between demo runs until ``stop``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

STATE_DIR = os.environ.get("SPARKTF_STATE_DIR", os.path.join(os.path.dirname(__file__), "..", ".stack"))
PORT = int(os.environ.get("SPARKTF_S3_PORT", "5055"))
ENDPOINT = f"http://127.0.0.1:{PORT}"
PID_FILE = os.path.join(STATE_DIR, "moto.pid")


def is_up() -> bool:
    try:
        with urllib.request.urlopen(ENDPOINT + "/moto-api/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start() -> None:
    if is_up():
        print(f"S3 server already running at {ENDPOINT}")
        return
    os.makedirs(STATE_DIR, exist_ok=True)
    log = open(os.path.join(STATE_DIR, "moto.log"), "ab")
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(PORT)], stdout=log, stderr=log,
                               start_new_session=True)
    with open(PID_FILE, "w") as fh:
        fh.write(str(process.pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"S3 server exited early (code {process.returncode}); see {STATE_DIR}/moto.log")
        if is_up():
            print(f"S3 server started at {ENDPOINT} (pid {process.pid})")
            return
        time.sleep(0.2)
    process.terminate()
    sys.exit(f"S3 server did not answer at {ENDPOINT} within 30 s")


def stop() -> None:
    try:
        with open(PID_FILE) as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        print("no S3 server started by this project")
        return
    try:
        os.kill(pid, signal.SIGTERM)
        print(f"stopped S3 server (pid {pid})")
    except ProcessLookupError:
        print("S3 server was not running")
    os.remove(PID_FILE)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "status"
    if command == "start":
        start()
    elif command == "stop":
        stop()
    else:
        print(f"S3 server at {ENDPOINT}: {'up' if is_up() else 'down'}")
