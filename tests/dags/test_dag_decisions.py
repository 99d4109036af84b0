"""The DAGs' decisions as pure functions (sparktf.airflow.validation and sparktf.airflow.nightly): no Airflow run, no S3."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from sparktf.airflow import nightly, validation


def tuning_params(dag_bag, **change) -> dict:
    dag = dag_bag.dags["tuning_pipeline"]
    return {**{key: dag.params[key] for key in dag.params}, **change}


# --- tuning_pipeline -------------------------------------------------------------------------


def test_the_tuning_defaults_pass_and_say_how_many_trials(dag_bag):
    problems, summary = validation.tuning_problems(tuning_params(dag_bag))
    assert problems == []
    assert summary["trials"] == 4
    assert summary["search_strategy"] == "grid"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"learning_rates": []}, "learning_rates: give at least one value"),
        ({"hidden_units": [0]}, "hidden_units: 0 (a linear head) needs a backbone"),
        ({"dataset_uri": "/local/path"}, "dataset_uri:"),
        ({"learning_rates": [i / 1000 + 0.001 for i in range(40)], "hidden_units": list(range(1, 31))}, "more than 1000"),
    ],
    ids=lambda c: json.dumps(c) if isinstance(c, dict) else "",
)
def test_a_bad_tuning_setting_is_named(dag_bag, change, expected):
    problems, _summary = validation.tuning_problems(tuning_params(dag_bag, **change))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"halving_factor": 1}, "halving_factor: must be an integer >= 2"),
        ({"halving_min_epochs": 16, "epochs": 15}, "halving_min_epochs (16) is above epochs (15)"),
    ],
    ids=["factor-below-two", "first-rung-above-epochs"],
)
def test_halving_settings_that_make_no_sense_are_refused_before_spark(dag_bag, change, expected):
    problems, _summary = validation.tuning_problems(tuning_params(dag_bag, search_strategy="halving", **change))
    assert any(expected in p for p in problems), problems


def test_halving_defaults_pass_and_count_the_grid(dag_bag):
    problems, summary = validation.tuning_problems(tuning_params(dag_bag, search_strategy="halving"))
    assert problems == []
    assert (summary["trials"], summary["search_strategy"]) == (4, "halving")


def test_an_empty_dataset_location_is_refused():
    seen = []
    assert validation.dataset_problems("s3://b/data", lambda uri: seen.append(uri) or True) == []
    assert seen == ["s3://b/data/"]
    assert "s3://b/data/ holds no objects" in validation.dataset_problems("s3://b/data/", lambda uri: False)[0]


def test_refuse_fails_without_retry_and_says_everything():
    from airflow.sdk.exceptions import AirflowFailException

    validation.refuse([], "invalid parameters")  # nothing to say: no failure
    with pytest.raises(AirflowFailException, match=r"^invalid parameters: a; b$"):
        validation.refuse(["a", "b"], "invalid parameters")


# --- register_model --------------------------------------------------------------------------

REQUEST = {
    "model_name": "inception-v3",
    "source": "keras_application",
    "application": "InceptionV3",
    "weights_uri": "s3://b/w.weights.h5",
    "model_uri": "",
    "labels": "label_map",
    "label_map_uri": "s3://b/labels.json",
    "resize_policy": "center_crop",
}


def store_of(objects: dict[str, bytes]):
    return (lambda uri: {"size": len(objects[uri])} if uri in objects else None), (lambda uri: objects[uri])


def test_the_uploads_a_request_needs():
    assert validation.upload_uris(REQUEST) == {"weights_uri": "s3://b/w.weights.h5", "label_map_uri": "s3://b/labels.json"}
    own = {**REQUEST, "source": "keras_file", "model_uri": "s3://b/m.keras", "labels": "imagenet"}
    assert validation.upload_uris(own) == {"model_uri": "s3://b/m.keras"}


def test_missing_uploads_and_a_label_map_of_the_wrong_size_are_refused():
    head, read = store_of({"s3://b/labels.json": json.dumps(["cat", "dog"]).encode()})
    problems = validation.upload_problems(REQUEST, head, read)
    assert problems == ["weights_uri s3://b/w.weights.h5 does not exist: upload it first (aws s3 cp / mc cp)"]
    head, read = store_of({"s3://b/w.weights.h5": b"h5", "s3://b/labels.json": json.dumps(["cat", "dog"]).encode()})
    [problem] = validation.upload_problems(REQUEST, head, read)
    assert problem.startswith("label_map_uri:")
    assert "1000" in problem
    head, read = store_of({"s3://b/w.weights.h5": b"h5", "s3://b/labels.json": json.dumps([str(i) for i in range(1000)]).encode()})
    assert validation.upload_problems(REQUEST, head, read) == []


def test_the_request_is_the_params_the_job_takes():
    params = {**REQUEST, "promote": True, "workspace_uri": "s3://b/ws"}
    assert validation.registration_request(params) == REQUEST


# --- nightly_inference -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2026-02-31", "2026-13-01", "20261120", "2026-1-2", "tomorrow"])
def test_a_date_not_on_the_calendar_is_refused(value):
    from airflow.sdk.exceptions import AirflowFailException

    assert validation_problem(value)
    with pytest.raises(AirflowFailException, match="not a calendar date"):
        nightly.partition_date({"date": value}, None)


def validation_problem(value) -> str:
    return "".join(nightly.date_problems(value))


def test_the_partition_is_the_param_or_the_utc_date_of_the_interval_start():
    import pendulum

    start = pendulum.datetime(2026, 11, 20, 2, 30, tz="UTC")
    assert nightly.partition_date({"date": None}, start) == ("2026-11-20", "data_interval")
    assert nightly.partition_date({"date": ""}, pendulum.datetime(2026, 11, 20, 23, 30, tz="America/New_York")) == (
        "2026-11-21",
        "data_interval",
    )  # partitions are UTC dates
    assert nightly.partition_date({"date": "2028-02-29"}, start) == ("2028-02-29", "param")
    with pytest.raises(Exception, match="set the 'date' Param"):
        nightly.partition_date({"date": None}, None)


@pytest.mark.parametrize(
    ("text", "expected"), [("2g", 2 * 2**30), ("512m", 512 * 2**20), ("1024k", 2**20), ("2GB", 2 * 2**30), ("1t", 2**40), ("300", 300 * 2**20)]
)
def test_spark_memory_settings_are_read_as_spark_reads_them(text, expected):
    assert validation.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "g", "2x", "-1g", "1.5g"])
def test_an_unreadable_memory_setting_is_an_error(text):
    with pytest.raises(ValueError, match="not a Spark memory setting"):
        validation.parse_memory(text)


def test_a_batch_that_cannot_fit_the_executor_is_refused_with_the_largest_that_can():
    photos = [299, 299, 3]  # InceptionV3
    assert validation.batch_size_problems(256, photos, "2g") == []  # the default batch fits the default executor
    assert validation.batch_size_problems(8192, [28, 28, 1], "2g") == []  # digits: any allowed batch fits
    [problem] = validation.batch_size_problems(1024, photos, "2g")
    largest = 2 * 2**30 // validation.batch_bytes(1, photos)
    assert "batch_size 1024 needs about 4.1 GiB" in problem
    assert f"batch_size <= {largest}" in problem
    assert validation.batch_size_problems(largest, photos, "2g") == []
    assert validation.batch_size_problems(largest + 1, photos, "2g")


def test_a_missing_or_changed_model_says_what_to_do():
    missing = nightly.model_refusal("digits", "champion", "no champion", tampered=False)
    assert missing.startswith("cannot use model 'digits' (champion): no champion. To fix: run tuning_pipeline")
    changed = nightly.model_refusal("digits", "3", "sha256 differs", tampered=True)
    assert "not trusted" in changed
    assert "never edit an artifact in place" in changed


def test_the_resolved_model_is_the_exact_version():
    metadata = {
        "version": "3",
        "model_uri": "s3://b/m/3/model.keras",
        "model_sha256": "ab",
        "input_shape": [28, 28, 1],
        "label_names": ["0", "1"],
        "extra": "not passed on",
    }
    resolved = nightly.resolved_summary({"model_name": "digits", "model_version": "champion"}, metadata)
    assert resolved["version"] == 3
    assert resolved["requested"] == "champion"
    assert "extra" not in resolved


JOB_RESULT = {
    "date": "2026-11-20",
    "listed": 10,
    "scored": 8,
    "set_aside": 2,
    "reasons": {"unreadable": 2},
    "markers_skipped": 1,
    "storage_retries": 0,
    "label_histogram": {"3": 8},
    "model_name": "digits",
    "model_version": 3,
    "output_uri": "s3://b/p/digits/2026-11-20/",
    "success_uri": "s3://b/p/digits/2026-11-20/_SUCCESS",
    "images_per_second": 12.5,
    "seconds": 0.8,
    "tasks": 2,
    "publish_id": "p1",
    "attempt_id": "run-1",
    "failure_ratio_exceeded": False,
    "errors_sample": [],
}


def test_the_run_summary_keeps_the_jobs_own_keys():
    summary = nightly.published_summary(JOB_RESULT, {"model_name": "digits"}, {"date_from": "param"})
    assert {k: summary[k] for k in ("listed", "scored", "set_aside", "reasons", "seconds", "tasks")} == {
        k: JOB_RESULT[k] for k in ("listed", "scored", "set_aside", "reasons", "seconds", "tasks")
    }
    assert summary["date_from"] == "param"
    assert "errors_sample" not in summary
    assert nightly.asset_extra(summary) == {
        "date": "2026-11-20",
        "output_uri": JOB_RESULT["output_uri"],
        "success_uri": JOB_RESULT["success_uri"],
        "model_name": "digits",
        "model_version": 3,
        "scored": 8,
        "set_aside": 2,
    }


def test_a_partition_replaced_by_a_later_run_is_not_announced():
    assert nightly.replaced_problem({"publish_id": "p1"}, JOB_RESULT) is None
    later = nightly.replaced_problem({"publish_id": "p2", "attempt_id": "run-2"}, JOB_RESULT)
    assert "no longer holds this run's output (attempt run-1)" in later
    assert "(attempt run-2)" in later
    assert "no longer holds" in nightly.replaced_problem(None, JOB_RESULT)


def test_what_the_run_found_and_why_nothing_runs_on_an_empty_night():
    stamp = dt.datetime(2026, 11, 21, 2, 30, tzinfo=dt.UTC)
    common = {
        "date": "2026-11-20",
        "source": "data_interval",
        "incoming_uri": "s3://b/in/2026-11-20/",
        "markers": 2,
        "max_image_bytes": 100,
        "data_interval": ["a", "b"],
        "processed_at": stamp,
    }
    found = nightly.found_summary(objects=[{"size": 10}, {"size": 500}], **common)
    assert (found["images"], found["bytes"], found["over_max_image_bytes"]) == (2, 510, 1)
    assert found["processed_at"] == "2026-11-21T02:30:00+00:00"
    assert "skipped_reason" not in found
    empty = nightly.found_summary(objects=[], **common)
    assert empty["skipped_reason"] == "no images under s3://b/in/2026-11-20/ (2 empty folder markers skipped)"
