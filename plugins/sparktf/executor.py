"""Where a Spark task runs and how many threads it may use: a leaf module for executor code.

Trials and scoring import this, never the job skeleton (:mod:`sparktf.job`). Nothing here
imports PySpark or TensorFlow at module level.
"""

from __future__ import annotations

import os
import socket
from typing import Any


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
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[name] = value
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(value))
        tf.config.threading.set_inter_op_parallelism_threads(int(value))
    except RuntimeError:
        # Already initialised in this (reused) Python worker with the same task size: fine.
        pass


def executor_identity() -> dict[str, Any]:
    """Where this task runs: host, pid and the executor's id (its work directory's name)."""
    identity: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "task_cpus": task_cpus()}
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        if context is not None:
            identity["partition"] = context.partitionId()
            identity["attempt"] = context.attemptNumber()
            identity["executor_id"] = _executor_id_from_cwd()
    except Exception:  # noqa: BLE001 - not in a Spark task
        pass
    return identity


def _executor_id_from_cwd() -> str:
    # Standalone and YARN start Python workers in the executor's own directory
    # (.../app-<id>/<executor-id>); local mode runs everything in the driver ("driver").
    cwd = os.getcwd()
    parent = os.path.basename(os.path.dirname(cwd))
    return os.path.basename(cwd) if parent.startswith(("app-", "application_", "container_")) else "driver"
