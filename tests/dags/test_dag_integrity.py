"""Every DAG file imports cleanly, cheaply, and follows the house rules (per file, so failures name it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.sdk.exceptions import ParamValidationError

from sparktf_dev.testing import params_with

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY_MODULES = ("tensorflow", "keras", "pyspark", "pandas", "boto3", "botocore", "PIL", "numpy", "matplotlib")
ALLOWED_TAGS = {"ml", "spark", "tensorflow", "tuning", "inference", "registry"}
MANUAL_DAGS = {"register_model"}  # triggered by hand with a form, never scheduled


def dags_of(dag_bag, path: Path):
    return [dag for dag in dag_bag.dags.values() if Path(dag.fileloc).resolve() == path.resolve()]


def test_no_import_errors(dag_bag):
    assert dag_bag.import_errors == {}
    assert len(dag_bag.dags) >= 1


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_one_dag_per_file_named_after_it(dag_bag, path):
    dags = dags_of(dag_bag, path)
    assert [d.dag_id for d in dags] == [path.stem]


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_nothing_heavy(path):
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('dagfile', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n"
    )
    env = dict(__import__("os").environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# Counts every connection lookup (the Task SDK's and the metadata DB's) while a DAG file is parsed.
COUNT_LOOKUPS = (
    "import importlib.util, json, sys\n"
    "import airflow.sdk.execution_time.context as sdk_context\n"
    "from airflow.models.connection import Connection as DbConnection\n"
    "lookups = []\n"
    "def counted(original):\n"
    "    def lookup(*args, **kwargs):\n"
    "        lookups.append(str(args[-1] if args else kwargs))\n"
    "        return original(*args, **kwargs)\n"
    "    return lookup\n"
    "sdk_context._get_connection = counted(sdk_context._get_connection)\n"
    "DbConnection.get_connection_from_secrets = counted(DbConnection.get_connection_from_secrets)\n"
    "spec = importlib.util.spec_from_file_location('dagfile', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "print(json.dumps(lookups))\n"
)


def connection_lookups(path: Path) -> list[str]:
    """Connection lookups made while parsing ``path`` in a fresh interpreter whose connections are all invalid."""
    import os

    env = {**os.environ, "AIRFLOW_CONN_AWS_DEFAULT": "not-a-connection", "AIRFLOW_CONN_SPARK_DEFAULT": "not-a-connection"}
    out = subprocess.run([sys.executable, "-c", COUNT_LOOKUPS, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_without_a_connection_lookup(path):
    """Parsing runs often, on the DAG processor: a connection lookup there costs a secrets-backend call each time."""
    assert connection_lookups(path) == []


def test_the_lookup_count_sees_a_lookup_at_parse_time(tmp_path):
    """The counter itself: a DAG file that reads a connection at the top is caught."""
    bad = tmp_path / "reads_a_connection.py"
    bad.write_text("from airflow.sdk import Connection\ntry:\n    Connection.get('aws_default')\nexcept Exception:\n    pass\n")
    assert connection_lookups(bad) == ["aws_default"]


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_house_rules(dag_bag, path):
    for dag in dags_of(dag_bag, path):
        assert dag.doc_md, "the module docstring is the runbook"
        assert len(dag.doc_md) > 200, "the module docstring is the runbook"
        assert dag.tags
        assert set(dag.tags) <= ALLOWED_TAGS
        assert dag.catchup is False
        assert dag.max_active_runs is not None
        assert dag.max_active_runs <= 3
        if dag.dag_id in MANUAL_DAGS:
            assert dag.schedule is None, "triggered by hand only"
        else:
            assert dag.schedule is not None, "runs unattended on a schedule"
        for task in dag.tasks:
            assert task.owner == "ml-platform", task.task_id
            assert task.retries >= 1, f"{task.task_id} has no retries"
            assert task.execution_timeout is not None, f"{task.task_id} has no execution_timeout"


def test_spark_tasks_use_the_result_operator_with_job_files(dag_bag):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from sparktf.airflow.spark_job_operator import SparkJobOperator

    for dag in dag_bag.dags.values():
        spark_tasks = [task for task in dag.tasks if isinstance(task, SparkSubmitOperator)]
        assert spark_tasks, f"{dag.dag_id} submits no Spark job"
        for task in spark_tasks:
            # A plain SparkSubmitOperator would push nothing to XCom and ship no code.
            assert type(task) is SparkJobOperator, (dag.dag_id, task.task_id, type(task).__name__)
            assert Path(task.application).is_file(), task.application
            assert "{{" in task.result_uri
            assert task.conf["spark.task.cpus"] == task.conf["spark.executorEnv.OMP_NUM_THREADS"]


@pytest.mark.parametrize(
    "change",
    [
        {"learning_rates": []},
        {"learning_rates": [0.001, 0]},
        {"learning_rates": [-0.1]},
        {"hidden_units": [-1]},  # 0 passes the schema (a backbone's linear head); validate_params refuses it without a backbone
        {"dropouts": [1.0]},
        {"search_strategy": "bayes"},
        {"epochs": 0},
        {"dataset_uri": "/local/path"},
    ],
    ids=lambda c: json.dumps(c),
)
def test_bad_trigger_params_are_refused(dag_bag, change):
    """The same JSON-schema check Airflow runs when a run is triggered from the UI or the API."""
    with pytest.raises(ParamValidationError):
        params_with(dag_bag.dags["tuning_pipeline"], change).validate()


def test_default_params_are_valid(dag_bag):
    for dag in dag_bag.dags.values():
        dag.params.validate()
