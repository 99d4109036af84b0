"""nightly_inference: schedule, partition date from the data interval, Params refused at trigger time,
the job's command line rendered by Airflow from the Params and the upstream XComs."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from airflow.sdk.exceptions import ParamValidationError

from sparktf_dev.testing import batch_inference_argv, params_with, rendered_task

XCOMS = {
    ("find_new_images", "date"): "2026-11-20",
    ("find_new_images", "processed_at"): "2026-11-21T02:30:00+00:00",
    ("resolve_model", "version"): 12,
    ("resolve_model", "model_sha256"): "ab" * 32,
}


@pytest.fixture(scope="module")
def dag(dag_bag):
    return dag_bag.dags["nightly_inference"]


def rendered_args(dag, conf: dict | None = None) -> list[str]:
    """batch_inference's command line as the operator passes it (it makes every argument a string)."""
    return [str(a) for a in rendered_task(dag, "batch_inference", conf, xcoms=XCOMS).application_args]


def test_shape_schedule_and_asset(dag):
    assert [t.task_id for t in dag.topological_sort()] == ["find_new_images", "resolve_model", "batch_inference", "publish", "mlflow", "report"]
    report = dag.get_task("report")  # the run note: a teardown after everything, ignored by the run's state
    assert report.is_teardown
    assert report.upstream_task_ids == {"mlflow"}
    from airflow.serialization.encoders import coerce_to_core_timetable

    assert coerce_to_core_timetable(dag.timetable).summary == "30 2 * * *"
    assert dag.max_active_runs == 3
    assert dag.catchup is False
    publish = dag.get_task("publish")
    assert [a.name for a in publish.outlets] == ["nightly_predictions"]


def test_the_0230_run_scores_the_day_its_interval_starts_on(dag):
    import pendulum
    from airflow.serialization.encoders import coerce_to_core_timetable

    from sparktf.airflow.nightly import partition_date

    # The run at 2026-11-21 02:30 covers 2026-11-20 02:30 -> 2026-11-21 02:30.
    run_after = pendulum.datetime(2026, 11, 21, 2, 30, tz="UTC")
    interval = coerce_to_core_timetable(dag.timetable).infer_manual_data_interval(run_after=run_after)
    assert (interval.start, interval.end) == (run_after - dt.timedelta(days=1), run_after)
    assert partition_date({"date": None}, interval.start) == ("2026-11-20", "data_interval")


@pytest.mark.parametrize(
    "change",
    [
        {"date": "2026-13-01"},
        {"date": "20261120"},
        {"date": "2026-02-31"},
        {"model_version": "latest"},
        {"model_version": "0"},
        {"max_failure_ratio": 1.5},
        {"batch_size": 0},
        {"workspace_uri": "/local/path"},
        {"max_image_bytes": 0},
        {"allow_shrink": "yes"},
    ],
    ids=lambda c: json.dumps(c),
)
def test_bad_trigger_params_are_refused(dag, change):
    with pytest.raises(ParamValidationError):
        params_with(dag, change).validate()


def test_good_manual_params_are_accepted(dag):
    params_with(dag, {"date": "2026-11-20", "model_version": "12"}).validate()
    params_with(dag, {"date": "2028-02-29"}).validate()  # a leap day


def test_the_job_gets_the_byte_cap_and_the_shrink_permission(dag):
    from sparktf.jobs import batch_inference

    args = batch_inference.parse_args(rendered_args(dag, {"max_image_bytes": 1000, "allow_shrink": True}))
    assert (args.max_image_bytes, args.allow_shrink) == (1000, True)
    assert dag.params["allow_shrink"] is False
    assert dag.params["max_image_bytes"] == 50_000_000
    # How Airflow renders a boolean Param, read back by the job
    required = batch_inference_argv("s3://b/ws", "2026-11-20")
    assert batch_inference.parse_args([*required, "--allow-shrink", "False"]).allow_shrink is False
    assert batch_inference.parse_args([*required, "--allow-shrink", "True"]).allow_shrink is True
    assert batch_inference.parse_args([*required, "--allow-shrink"]).allow_shrink is True
    assert batch_inference.parse_args(required).allow_shrink is False


def test_the_job_gets_the_resolved_version_and_the_found_date_as_xcoms(dag):
    """The upstream results reach the command line as XComArgs (no hand-written ``ti.xcom_pull`` Jinja)."""
    from sparktf.jobs import batch_inference

    task = rendered_task(dag, "batch_inference", {"model_name": "digits", "workspace_uri": "s3://b/ws"}, xcoms=XCOMS)
    args = batch_inference.parse_args([str(a) for a in task.application_args])
    assert (args.date, args.model_name, args.model_version, args.expected_sha256) == ("2026-11-20", "digits", "12", "ab" * 32)
    assert args.processed_at == "2026-11-21T02:30:00+00:00"
    assert args.models_uri == "s3://b/ws/models/"
    assert args.attempt_id == "manual__2026-11-24T100000_0000-1"
    assert task.result_uri == "s3://b/ws/runs/nightly_inference/manual__2026-11-24T100000_0000/_results/batch_inference.json"
    assert dag.get_task("batch_inference").upstream_task_ids == {"find_new_images", "resolve_model"}


def test_the_form_and_the_job_share_one_knob_table(dag):
    """Each NIGHTLY_KNOBS entry is a Param with the job's own default, and the DAG's defaults parse to them."""
    from sparktf import knobs
    from sparktf.jobs import batch_inference

    own = vars(batch_inference.parse_args(batch_inference_argv("s3://b/ws", "2026-11-20")))
    from_dag = vars(batch_inference.parse_args(rendered_args(dag)))
    for knob in knobs.NIGHTLY_KNOBS:
        assert dag.params[knob.name] == own[knob.name] == from_dag[knob.name] == knob.default, knob.name
        assert dag.params.get_param(knob.name).schema["title"] == knob.title
