"""Shared plumbing for the benchmarks in bench/: a private S3 server, a local Spark, MNIST data.

Every benchmark starts what it needs and stops all of it:

* :class:`MotoServer` -- a moto S3 server on 127.0.0.1 on a free port; sets the standard AWS_*
  variables (before any SparkSession starts, so Spark's Python workers inherit them);
* :func:`spark_session` -- a local SparkSession with N task slots (``local[N]``);
* :func:`upload_mnist` -- the MNIST IDX files (whole, or the first N images of each) to S3;
* :func:`prepare` -- ``jobs/prepare_data.py``'s ``run`` on them: a prepared data set;
* :func:`run_worker` -- run a benchmark step in a fresh interpreter and read its JSON result
  (fresh TensorFlow thread settings, fresh JVM).

Importing this module puts ``plugins/`` and ``jobs/`` on ``sys.path`` and on ``PYTHONPATH`` (for
Spark's Python workers and for the subprocesses).
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
JOBS = ROOT / "jobs"
MNIST_DIR = Path(os.environ.get("SPARKTF_MNIST_DIR", ROOT.parent / "shared" / "datasets" / "mnist"))
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
RESULT_MARKER = "BENCH_RESULT "

for _path in (str(PLUGINS), str(JOBS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
_pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), str(JOBS)] + [p for p in _pythonpath
                                                                         if p not in (str(PLUGINS), str(JOBS))])
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # Spark's driver, block manager and UI on loopback only

BENCH_ACCESS_KEY = "bench-access-key"  # moto accepts any pair; not a secret
BENCH_SECRET_KEY = "bench-secret-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited early (code {process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class MotoServer:
    """A moto S3 server on 127.0.0.1 (free port) for one benchmark; a context manager.

    On start it sets ``AWS_ENDPOINT_URL`` and dummy credentials in ``os.environ`` (inherited by
    Spark's workers and by :func:`run_worker` subprocesses) and creates ``bucket``.
    """

    def __init__(self, bucket: str = "sparktf-bench", log_path: str | None = None):
        self.bucket = bucket
        self.log_path = log_path or os.path.join("/tmp", f"sparktf-bench-moto-{os.getpid()}.log")
        self.process: subprocess.Popen | None = None
        self.endpoint: str | None = None

    def start(self) -> "MotoServer":
        port = free_port()
        server = Path(sys.executable).with_name("moto_server")
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        log.close()
        self.endpoint = f"http://127.0.0.1:{port}"
        try:
            _wait_http(self.endpoint + "/moto-api/", self.process)
        except Exception:
            self.stop()
            raise
        os.environ.update({
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": BENCH_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": BENCH_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
        })
        from sparktf import storage

        storage.s3_client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def spark_session(slots: int, app_name: str = "sparktf-bench", conf: dict[str, str] | None = None):
    """A local SparkSession with ``slots`` task slots (``local[slots]``), UI off, no task retries."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(f"local[{int(slots)}]").appName(app_name)
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", str(max(2, 2 * slots)))
               .config("spark.python.worker.reuse", "true").config("spark.task.maxFailures", "1")
               .config("spark.driver.memory", "4g").config("spark.ui.showConsoleProgress", "false"))
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def upload_mnist(prefix_uri: str, *, train_limit: int | None = None, test_limit: int | None = None,
                 source: Path = MNIST_DIR) -> dict[str, int]:
    """Upload MNIST's IDX pairs under ``prefix_uri``: the files as they are, or the first
    ``train_limit`` / ``test_limit`` images of each pair (re-encoded as IDX).

    Returns the number of images uploaded per pair (``{"train": n, "t10k": m}``).
    """
    from sparktf import idx, storage

    if not (source / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"MNIST IDX files not found in {source} (set SPARKTF_MNIST_DIR)")
    client = storage.s3_client()
    counts = {}
    for stem, limit in (("train", train_limit), ("t10k", test_limit)):
        for kind in ("images", "labels"):
            name = f"{stem}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            raw = (source / f"{name}.gz").read_bytes()
            if limit is None:
                storage.write_bytes(storage.join_uri(prefix_uri, name + ".gz"), raw, client)
                array_len = len(idx.parse_idx(raw)) if kind == "labels" else None
            else:
                array = idx.parse_idx(gzip.decompress(raw))[:limit]
                storage.write_bytes(storage.join_uri(prefix_uri, name), idx.encode_idx(array), client)
                array_len = len(array)
            if kind == "labels":
                counts[stem] = array_len
    return counts


def prepare(spark, input_uri: str, output_uri: str, *extra_args: str) -> dict[str, Any]:
    """Run ``jobs/prepare_data.py`` (its ``run``) on ``input_uri``; returns the job result."""
    import prepare_data

    args = prepare_data.parse_args(["--input-uri", input_uri, "--output-uri", output_uri, *extra_args])
    return prepare_data.run(spark, args)


def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result as one marked JSON line (read back by :func:`run_worker`)."""
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)


def run_worker(argv: list[str], *, log_path: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <argv>`` in a fresh interpreter (inherits os.environ) and return its result.

    The worker's output goes to ``log_path`` (or is discarded); a failing worker raises with the
    end of its log.
    """
    log_path = log_path or os.path.join("/tmp", f"sparktf-bench-worker-{os.getpid()}.log")
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
