"""SparkJobOperator on its own: the spark-submit command line it builds, the stale result it removes
before the run, and a job's final failure ending the task without a retry.

Each test submits a small real application (a Python file, no Spark session) with spark-submit on
``local[1]``; the application writes its JSON result to the moto S3 server like a real job.
"""

from __future__ import annotations

import json

import pytest

from sparktf import storage
from sparktf.airflow import pipeline_settings

# The application: reports whether a result already existed when it started, or fails as told.
APPLICATION = """
import sys
from sparktf import storage

args = sys.argv[1:]
uri = args[args.index("--result-uri") + 1]
mode = args[args.index("--mode") + 1]
found = storage.read_json_if_exists(uri)
if mode == "final":
    storage.write_json(uri, {"final_failure": "the data says no: another try ends the same way"})
    sys.exit(3)
if mode == "crash":
    sys.exit(4)
storage.write_json(uri, {"found_at_start": found, "argv": args})
"""


@pytest.fixture
def application(tmp_path, s3_server, monkeypatch) -> str:
    path = tmp_path / "report_job.py"
    path.write_text(APPLICATION)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", s3_server.connection_json())
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[1]"}))
    return str(path)


def operator(application: str, result_uri: str, mode: str):
    from sparktf.airflow.spark_job_operator import SparkJobOperator

    return SparkJobOperator(task_id="report_job", application=application, application_args=["--mode", mode, "--n", 7], result_uri=result_uri)


def test_the_command_line_carries_the_shared_settings_and_the_result_uri(application, s3_prefix):
    result_uri = s3_prefix + "/_results/report_job.json"
    op = operator(application, result_uri, "ok")
    result = op.execute({})
    assert result["argv"] == ["--mode", "ok", "--n", "7", "--result-uri", result_uri]  # every argument a string
    command = op._hook._build_spark_submit_command(op.application)
    assert command[command.index("--name") + 1] == "report_job"  # the task id
    assert command[command.index("--master") + 1] == "local[1]"  # spark_default
    assert command[command.index("--driver-memory") + 1] == pipeline_settings.DRIVER_MEMORY
    assert command[command.index("--executor-memory") + 1] == pipeline_settings.EXECUTOR_MEMORY
    confs = {command[i + 1] for i, part in enumerate(command) if part == "--conf"}
    assert {f"{k}={v}" for k, v in pipeline_settings.SPARK_CONF.items()} <= confs
    py_files = command[command.index("--py-files") + 1]
    assert py_files.endswith(".zip")
    assert "sparktf-" in py_files
    assert command[-6:] == [application, "--mode", "ok", "--n", "7", "--result-uri", result_uri][-6:]


def test_the_default_result_uri_is_the_runs_results_folder():
    from sparktf.airflow.spark_job_operator import SparkJobOperator

    op = SparkJobOperator(task_id="t", application="job.py")
    assert op.result_uri == pipeline_settings.RESULT_URI
    assert op.result_uri.endswith("/_results/{{ ti.task_id }}.json")
    assert "result_uri" in op.template_fields


def test_a_stale_result_is_removed_before_the_job_starts(application, s3_prefix):
    result_uri = s3_prefix + "/_results/report_job.json"
    storage.write_json(result_uri, {"from": "an earlier attempt"})
    result = operator(application, result_uri, "ok").execute({})
    assert result["found_at_start"] is None  # the job never saw (and the task never returns) the earlier result


def test_a_final_failure_ends_the_task_without_retry(application, s3_prefix):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=r"^the data says no: another try ends the same way$"):
        operator(application, s3_prefix + "/_results/final.json", "final").execute({})


def test_any_other_failure_is_left_to_the_retries(application, s3_prefix):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(Exception) as err:  # noqa: PT011 - any failure but the final one: Airflow retries it
        operator(application, s3_prefix + "/_results/crash.json", "crash").execute({})
    assert not isinstance(err.value, AirflowFailException)
