"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_ACCESS_KEY = "test-access-key"  # moto accepts any pair; not a secret
TEST_SECRET_KEY = "test-secret-key"


def run_dag(env: dict[str, str], tmp_path: Path, dag_id: str, conf: dict | None = None,
            logical_date: str | None = None, timeout: int = 1200) -> tuple[int, dict | None, str]:
    """Run a DAG with scripts/run_dag.py; returns (exit code, summary or None, combined output)."""
    out_file = tmp_path / f"{dag_id}-summary.json"
    command = [sys.executable, str(ROOT / "scripts" / "run_dag.py"), dag_id, "--conf", json.dumps(conf or {}),
               "--json-out", str(out_file)]
    if logical_date:
        command += ["--logical-date", logical_date]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    summary = json.loads(out_file.read_text()) if out_file.exists() else None
    return proc.returncode, summary, proc.stdout + proc.stderr
