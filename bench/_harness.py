"""What only the benchmarks in bench/ need; everything else comes from :mod:`sparktf_dev.testing`.

The S3 server (``testing.S3Server``), local Spark (``testing.local_spark``), MNIST reading and
upload (``testing.read_mnist`` / ``testing.upload_mnist``) and the prepare job
(``testing.prepare``) are the project's one test harness. This module adds:

* :data:`MNIST_DIR` -- the full MNIST IDX files (``../shared/datasets/mnist`` next to the
  repository, or ``SPARKTF_MNIST_DIR``);
* :data:`SPARK_CONF` -- the benchmarks' extra Spark settings (pass as ``conf=`` to
  ``testing.local_spark``);
* :func:`run_worker` / :func:`emit_result` -- run a benchmark step in a fresh interpreter and read
  its JSON result (fresh TensorFlow thread settings, fresh JVM); :func:`run_step` does so with the
  load average recorded, the time and the result printed;
* :func:`write_json` -- a run's full report, for ``--json-out``;
* :func:`incoming_keys`, :func:`champion_metadata`, :func:`predict_batch_udf_runs` -- the inference
  benchmarks' shared steps: the partition to score, the model to score it with, and the
  ``predict_batch_udf`` pipeline they compare the batch-inference job with;
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
import time
from pathlib import Path
from typing import Any

from sparktf_dev import testing

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
        completed = subprocess.run(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})}, cwd=str(ROOT)
        )
    result = None
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER) :])
    if completed.returncode != 0 or result is None:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"worker {argv} failed (exit {completed.returncode}); log {log_path}:\n{tail}")
    return result


def run_step(label: str, argv: list[str], *, loads: dict[str, str], log_name: str) -> dict[str, Any]:
    """:func:`run_worker` for one named step: records the load average at its start in ``loads``
    and prints how long it took and what it returned."""
    loads[label] = load_average()
    started = time.perf_counter()
    out = run_worker(argv, log_path=log_file(log_name))
    print(f"  {label} done in {time.perf_counter() - started:.1f} s: {json.dumps(out, default=lambda v: round(v, 2))}", flush=True)
    return out


PROVENANCE_PACKAGES = ("pyspark", "tensorflow-cpu", "keras", "numpy", "pyarrow", "pandas", "pillow", "boto3", "apache-airflow", "moto")


def provenance() -> dict[str, Any]:
    """What produced a result: the commit (``+dirty`` with uncommitted changes), the packages'
    versions and the machine, recorded in every benchmark JSON so figures can be traced back."""
    from importlib import metadata

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "commit": commit,
        "packages": versions,
        "python": platform.python_version(),
        "machine": machine(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` (parent folders created), with its
    :func:`provenance` under ``"provenance"``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump({**data, "provenance": provenance()}, fh, indent=2, default=str)


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


# ---------------------------------------------------------------------------------------------
# Inference benchmarks: the partition, the model and the predict_batch_udf pipeline
# ---------------------------------------------------------------------------------------------


def incoming_keys(ws: str, date: str) -> tuple[str, list[str]]:
    """The bucket and keys of the partition ``<ws>/incoming/<date>/``, as the job lists them."""
    from sparktf import incoming, storage

    objects = incoming.list_partition(ws + "/incoming/", date)
    return storage.parse_uri(ws).bucket, [o["key"] for o in objects]


def champion_metadata(ws: str, model_name: str) -> dict:
    """The metadata of ``model_name``'s champion in the registry ``<ws>/models/``."""
    from sparktf import registry

    return registry.resolve(ws + "/models/", model_name)


def predict_batch_udf_runs(
    ws: str, date: str, model_name: str, *, slots: int, batch_size: int, fetch_threads: int, conf: dict[str, str], app_name: str
) -> dict[str, dict[str, Any]]:
    """Score a partition with Spark's own ``predict_batch_udf``, cold then warm, in a local session.

    Keys go through a pandas UDF that fetches and decodes them with the job's pool
    (:func:`sparktf.fetch.fetch_decoded`, the champion's input shape and resize policy); the model
    is loaded once per Python worker by ``make_predict_fn`` (sha256-checked) and called on each
    batch. Returns ``{"cold"|"warm": {"seconds", "rate", "scored"}}``.
    """
    import numpy as np
    import pandas as pd
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql import types as T
    from pyspark.sql.functions import PandasUDFType

    from sparktf import fetch, incoming

    bucket, keys = incoming_keys(ws, date)
    meta = champion_metadata(ws, model_name)
    height, width, channels = meta["input_shape"]
    resize_policy = meta.get("resize_policy", "resize")

    def fetch_batch(batch):
        decoded = {
            k: a
            for k, a, _r, _d in fetch.fetch_decoded(
                bucket,
                batch.tolist(),
                height=height,
                width=width,
                channels=channels,
                max_pixels=40_000_000,
                fetch_threads=fetch_threads,
                resize_policy=resize_policy,
            )
        }
        return pd.Series([None if decoded[k] is None else decoded[k].astype(np.float32).ravel() for k in batch])

    fetch_pixels = F.pandas_udf(fetch_batch, T.ArrayType(T.FloatType()), PandasUDFType.SCALAR)

    def make_predict_fn():
        from sparktf import executor, registry

        executor.pin_threads(executor.task_cpus())
        model = registry.load_version_model(meta)

        def predict(inputs):
            return np.asarray(model(inputs.astype(np.uint8), training=False))  # the models take uint8 pixels

        return predict

    classify = predict_batch_udf(
        make_predict_fn, return_type=T.ArrayType(T.FloatType()), batch_size=batch_size, input_tensor_shapes=[[height, width, channels]]
    )
    spark = testing.local_spark(slots, app_name, conf=conf)
    try:
        num_tasks = incoming.plan_tasks(len(keys), spark.sparkContext.defaultParallelism, 2000)
        runs = {}
        for label in ("cold", "warm"):
            started = time.perf_counter()
            frame = (
                spark.createDataFrame([(k,) for k in keys], "key string")
                .repartition(num_tasks)
                .withColumn("pixels", fetch_pixels("key"))
                .where(F.col("pixels").isNotNull())
                .withColumn("probabilities", classify("pixels"))
            )
            rows = frame.select("key", "probabilities").collect()
            seconds = time.perf_counter() - started
            runs[label] = {"seconds": seconds, "rate": len(keys) / seconds, "scored": len(rows), "listed": len(keys)}
        return runs
    finally:
        spark.stop()
