"""Start, stop or check the embedded local stack's S3 server (moto) on 127.0.0.1.

Usage: python scripts/stack.py start|stop|status

The server keeps its objects in memory for as long as it runs; ``start`` is idempotent (it
reuses a running server), so champion models survive between demo runs until ``stop``.
"""

from __future__ import annotations

import os
import signal
import sys

from sparktf_dev.testing import S3Server

STATE_DIR = os.environ.get("SPARKTF_STATE_DIR", os.path.join(os.path.dirname(__file__), "..", ".stack"))
PORT = int(os.environ.get("SPARKTF_S3_PORT", "5055"))
PID_FILE = os.path.join(STATE_DIR, "moto.pid")


def start(server: S3Server) -> None:
    if server.is_up():
        print(f"S3 server already running at {server.endpoint}")
        return
    os.makedirs(STATE_DIR, exist_ok=True)
    server.start(set_environment=False)  # its own session: it outlives this script
    with open(PID_FILE, "w") as fh:
        fh.write(str(server.process.pid))
    print(f"S3 server started at {server.endpoint} (pid {server.process.pid})")


def stop() -> None:
    try:
        with open(PID_FILE) as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        print("no S3 server started by this project")
        return
    try:
        os.killpg(pid, signal.SIGTERM)
        print(f"stopped S3 server (pid {pid})")
    except ProcessLookupError:
        print("S3 server was not running")
    os.remove(PID_FILE)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "status"
    s3_server = S3Server(port=PORT, log_path=os.path.join(STATE_DIR, "moto.log"))
    if command == "start":
        start(s3_server)
    elif command == "stop":
        stop()
    else:
        print(f"S3 server at {s3_server.endpoint}: {'up' if s3_server.is_up() else 'down'}")
