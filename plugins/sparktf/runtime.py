"""What every spark-submit application of this package shares: session, result, thread pinning."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from sparktf import storage

log = logging.getLogger("sparktf")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def spark_session(app_name: str):
    """The job's SparkSession; master and resources come from spark-submit, never from code."""
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName(app_name).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def run_spark_job(app_name: str, run, args) -> int:
    """A job's main(): ``run(spark, args)`` in a SparkSession, its result written to ``--result-uri``."""
    spark = spark_session(app_name)
    try:
        write_result(args.result_uri, run(spark, args))
    finally:
        spark.stop()
    return 0


def write_result(result_uri: str | None, result: dict[str, Any]) -> None:
    """Hand the job's small JSON summary to the Airflow operator that submitted it."""
    if result_uri:
        storage.write_json(result_uri, result)
    log.info("job result: %s", result)


def task_cpus(default: int = 1) -> int:
    """CPU cores Spark reserved for the running task (``spark.task.cpus``), or ``default``."""
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        if context is not None:
            return max(1, int(context.cpus()))
    except Exception:  # noqa: BLE001 - outside a Spark task
        pass
    return default


def pin_threads(cpus: int) -> None:
    """Pin this process's math libraries to ``cpus`` threads, before TensorFlow starts its pools.

    Sets OpenMP/MKL/OpenBLAS variables too: TensorFlow's thread settings do not cover them, and
    parallel tasks on one machine would otherwise oversubscribe its cores.
    """
    value = str(max(1, int(cpus)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[name] = value
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(value))
        tf.config.threading.set_inter_op_parallelism_threads(int(value))
    except RuntimeError:
        # Already initialised in this (reused) Python worker with the same task size: fine.
        pass


def code_version() -> str:
    """Package version plus the hash of the shipped code (set by the submitting operator)."""
    from sparktf import __version__

    shipped = os.environ.get("SPARKTF_CODE_SHA256", "")
    return f"{__version__}+{shipped[:12]}" if shipped else __version__


def executor_identity() -> dict[str, Any]:
    """Where this task runs: host, pid and the executor's work directory (unique per executor)."""
    identity = {"host": socket.gethostname(), "pid": os.getpid(), "task_cpus": task_cpus()}
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        if context is not None:
            identity["partition"] = context.partitionId()
            identity["attempt"] = context.attemptNumber()
            identity["executor_id"] = context.getLocalProperty("sparktf.executor") or _executor_id_from_cwd()
    except Exception:  # noqa: BLE001 - not in a Spark task
        pass
    return identity


def _executor_id_from_cwd() -> str:
    # Standalone and YARN start Python workers in the executor's own directory
    # (.../app-<id>/<executor-id>); local mode runs everything in the driver ("driver").
    cwd = os.getcwd()
    parent = os.path.basename(os.path.dirname(cwd))
    return os.path.basename(cwd) if parent.startswith(("app-", "application_", "container_")) else "driver"
