"""nightly_inference: schedule, partition date from the data interval, Params refused at trigger time."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "nightly_inference.py"))
    assert bag.import_errors == {}
    return bag.dags["nightly_inference"]  # get_dag() would query the metadata DB


def test_shape_schedule_and_asset(dag):
    assert [t.task_id for t in dag.topological_sort()] == [
        "find_new_images", "resolve_model", "batch_inference", "publish", "report"]
    report = dag.get_task("report")  # the run note: a teardown after everything, ignored by the run's state
    assert report.is_teardown and report.upstream_task_ids == {"publish"}
    from airflow.serialization.encoders import coerce_to_core_timetable

    assert coerce_to_core_timetable(dag.timetable).summary == "30 2 * * *"
    assert dag.max_active_runs == 3 and dag.catchup is False
    publish = dag.get_task("publish")
    assert [a.name for a in publish.outlets] == ["nightly_predictions"]


def test_the_0230_run_scores_the_day_its_interval_starts_on(dag):
    import importlib.util

    import pendulum

    # The run at 2026-11-21 02:30 covers 2026-11-20 02:30 -> 2026-11-21 02:30.
    run_after = pendulum.datetime(2026, 11, 21, 2, 30, tz="UTC")
    from airflow.serialization.encoders import coerce_to_core_timetable

    interval = coerce_to_core_timetable(dag.timetable).infer_manual_data_interval(run_after=run_after)
    assert (interval.start, interval.end) == (run_after - dt.timedelta(days=1), run_after)
    spec = importlib.util.spec_from_file_location("nightly_dagfile", ROOT / "dags" / "nightly_inference.py")
    dagfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dagfile)
    start = pendulum.datetime(2026, 11, 20, 2, 30, tz="UTC")
    assert dagfile.partition_date({"date": ""}, start) == ("2026-11-20", "data_interval")
    assert dagfile.partition_date({"date": ""}, pendulum.datetime(2026, 11, 20, 23, 30, tz="America/New_York")) == (
        "2026-11-21", "data_interval")  # partitions are UTC dates
    assert dagfile.partition_date({"date": "2026-01-02"}, start) == ("2026-01-02", "param")
    with pytest.raises(Exception, match="set the 'date' Param"):
        dagfile.partition_date({"date": ""}, None)


@pytest.mark.parametrize("change", [
    {"date": "2026-13-01"}, {"date": "20261120"}, {"model_version": "latest"}, {"model_version": "0"},
    {"max_failure_ratio": 1.5}, {"batch_size": 0}, {"workspace_uri": "/local/path"},
    {"max_image_bytes": 0}, {"allow_shrink": "yes"},
], ids=lambda c: json.dumps(c))
def test_bad_trigger_params_are_refused(dag, change):
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict

    values = {key: change.get(key, dag.params[key]) for key in dag.params}
    params = ParamsDict({key: Param(value, **dag.params.get_param(key).schema) for key, value in values.items()})
    with pytest.raises(Exception) as err:
        params.validate()
    assert type(err.value).__name__ == "ParamValidationError"


def test_good_manual_params_are_accepted(dag):
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict

    values = {key: dag.params[key] for key in dag.params}
    values.update(date="2026-11-20", model_version="12")
    ParamsDict({key: Param(value, **dag.params.get_param(key).schema) for key, value in values.items()}).validate()


def test_the_job_gets_the_byte_cap_and_the_shrink_permission(dag):
    from sparktf.jobs import batch_inference

    job_args = dag.get_task("batch_inference").application_args
    assert job_args[job_args.index("--max-image-bytes") + 1] == "{{ params.max_image_bytes }}"
    assert job_args[job_args.index("--allow-shrink") + 1] == "{{ params.allow_shrink }}"
    assert dag.params["allow_shrink"] is False and dag.params["max_image_bytes"] == 50_000_000
    # How Airflow renders a boolean Param, read back by the job
    required = ["--incoming-uri", "s3://b/i/", "--output-uri", "s3://b/o/", "--date", "2026-11-20",
                "--models-uri", "s3://b/m/", "--model-name", "digits"]
    assert batch_inference.parse_args([*required, "--allow-shrink", "False"]).allow_shrink is False
    assert batch_inference.parse_args([*required, "--allow-shrink", "True"]).allow_shrink is True
    assert batch_inference.parse_args(required).allow_shrink is False
