"""Settings the DAGs share: storage defaults, Spark configuration, task defaults.

Cheap to import (stdlib and the ``sparktf`` package root only). Deployment-specific values come from environment variables set
for the Airflow workers, never from code edits.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import Any

import sparktf

# Where runs, prepared data and models live; a Param of every DAG, defaulting to this.
DEFAULT_WORKSPACE_URI = os.environ.get("SPARKTF_WORKSPACE_URI", "s3://ml-pipeline").rstrip("/")
DEFAULT_MODEL_NAME = os.environ.get("SPARKTF_MODEL_NAME", "mnist-cnn")

# One task = one trial = spark.task.cpus cores; TensorFlow and OpenMP are pinned to the same.
TASK_CPUS = os.environ.get("SPARKTF_TASK_CPUS", "1")
SPARK_CONF = {
    "spark.task.cpus": TASK_CPUS,
    "spark.python.worker.reuse": "true",  # the model/data caches live in reused Python workers
    "spark.executorEnv.OMP_NUM_THREADS": TASK_CPUS,
    "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": "2",
    "spark.task.maxFailures": "4",
    "spark.ui.showConsoleProgress": "false",
}
# The connection of the two jobs that write the registry (export_best_model, register_model): on a
# store with one user per role, the only user allowed to write models/ (the compose stack sets
# aws_registry); by default the same connection as every other task.
REGISTRY_CONN_ID = os.environ.get("SPARKTF_REGISTRY_CONN_ID", "aws_default")
DRIVER_MEMORY = os.environ.get("SPARKTF_DRIVER_MEMORY", "2g")
EXECUTOR_MEMORY = os.environ.get("SPARKTF_EXECUTOR_MEMORY", "2g")

# Every DAG has the workspace_uri Param and the path_safe filter; each job writes its result here.
RUN_URI = "{{ params.workspace_uri }}/runs/{{ dag.dag_id }}/{{ run_id | path_safe }}"
RESULT_URI = RUN_URI + "/_results/{{ ti.task_id }}.json"

OWNER = "ml-platform"

DEFAULT_ARGS = {
    "owner": OWNER,
    "retries": 1,
    "retry_delay": dt.timedelta(minutes=1),
    "execution_timeout": dt.timedelta(hours=1),
}


def path_safe(value: str) -> str:
    """A run id made safe for an object key: ``manual__2026-11-24T10:00:00+00:00`` ->
    ``manual__2026-11-24T100000_0000``."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "", str(value).replace("+", "_"))


def workspace_param_spec(description: str) -> dict[str, Any]:
    """Keyword arguments of the ``workspace_uri`` Param (every DAG has one)."""
    return {
        "default": DEFAULT_WORKSPACE_URI,
        "type": "string",
        "pattern": r"^s3a?://[^/]+(/.*[^/])?$",
        "title": "Workspace",
        "description": description,
    }


def model_name_param_spec(default: str = DEFAULT_MODEL_NAME, description: str | None = None) -> dict[str, Any]:
    """Keyword arguments of a ``model_name`` Param: the registry's name pattern (:data:`sparktf.MODEL_NAME_PATTERN`)."""
    spec: dict[str, Any] = {"default": default, "type": "string", "pattern": sparktf.MODEL_NAME_PATTERN, "title": "Model name"}
    if description:
        spec["description"] = description
    return spec
