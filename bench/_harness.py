"""What only the benchmarks in bench/ need; everything else comes from :mod:`sparktf.testing`.

The S3 server (``testing.S3Server``), local Spark (``testing.local_spark``), MNIST reading and
upload (``testing.read_mnist`` / ``testing.upload_mnist``) and the prepare job
(``testing.prepare``) are the project's one test harness. This module adds:

* :data:`MNIST_DIR` -- the full MNIST IDX files (``../shared/datasets/mnist`` next to the
  repository, or ``SPARKTF_MNIST_DIR``);
* :data:`SPARK_CONF` -- the benchmarks' extra Spark settings (pass as ``conf=`` to
  ``testing.local_spark``);
* :func:`run_worker` / :func:`emit_result` -- run a benchmark step in a fresh interpreter and read
  its JSON result (fresh TensorFlow thread settings, fresh JVM);
* :func:`results_dir`, :func:`log_file`, :func:`check_mnist`, :func:`load_average`, :func:`machine`.

``sparktf`` is installed in editable mode, so the subprocesses and Spark's Python workers import
it without any path set-up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sparktf import testing

ROOT = testing.ROOT
MNIST_DIR = Path(os.environ.get("SPARKTF_MNIST_DIR", ROOT.parent / "shared" / "datasets" / "mnist"))
RESULTS_DIR = ROOT / "bench-results"  # ignored by git; the default place for figures and JSON results
SPARK_CONF = {"spark.driver.memory": "4g"}
RESULT_MARKER = "BENCH_RESULT "

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")


def results_dir(*parts: str) -> Path:
    """A folder under ``bench-results/`` in the repository (created)."""
    path = RESULTS_DIR.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_file(name: str) -> str:
    """A log file for a benchmark step, in the system's temporary folder."""
    return os.path.join(tempfile.gettempdir(), f"sparktf-bench-{name}.log")


def check_mnist(source: Path = MNIST_DIR) -> Path:
    """``source`` if it holds the MNIST IDX files, else exit with what to do."""
    if not (Path(source) / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"MNIST IDX files not found in {source} (set SPARKTF_MNIST_DIR)")
    return Path(source)


def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result as one marked JSON line (read back by :func:`run_worker`)."""
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)


def run_worker(argv: list[str], *, log_path: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <argv>`` in a fresh interpreter (inherits os.environ) and return its result.

    The worker's output goes to ``log_path`` (or a temporary file); a failing worker raises with
    the end of its log.
    """
    log_path = log_path or os.path.join(tempfile.gettempdir(), f"sparktf-bench-worker-{os.getpid()}.log")
    with open(log_path, "w") as log:
        completed = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, stderr=log, text=True,
                                   env={**os.environ, **(env or {})}, cwd=str(ROOT))
    result = None
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
    if completed.returncode != 0 or result is None:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"worker {argv} failed (exit {completed.returncode}); log {log_path}:\n{tail}")
    return result


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * page_size / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){memory}, Python {platform.python_version()}"
