"""register_model: a hand-triggered DAG whose Params form reaches the job's parser intact, whose
bad Params are refused at trigger time, and whose check_registered task turns a refusal into a failed run."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import ParamValidationError

from sparktf_dev.testing import params_with, rendered_task

WEIGHTS = "s3://bucket/uploads/inception_v3.weights.h5"


@pytest.fixture(scope="module")
def dag(dag_bag):
    return dag_bag.dags["register_model"]


def test_shape_manual_trigger_and_form(dag):
    from sparktf.applications import APPLICATIONS

    assert [t.task_id for t in dag.topological_sort()] == ["validate_params", "register_model", "check_registered", "mlflow"]
    assert dag.get_task("mlflow").upstream_task_ids == {"check_registered"}  # the alias follows a promote at once
    assert dag.schedule is None
    assert dag.max_active_runs == 1
    schema = dag.params.get_param("application").schema
    assert {"InceptionV3", "MobileNetV3Small"} <= set(schema["enum"]) == set(APPLICATIONS)
    assert dag.params.get_param("promote").schema["type"] == "boolean"


@pytest.mark.parametrize(
    "change",
    [
        {"source": "torch_hub"},
        {"application": "ResNet50"},
        {"weights_uri": "s3://b/w.h5"},
        {"weights_uri": "/home/me/w.weights.h5"},
        {"model_uri": "s3://b/model.h5"},
        {"labels": "coco"},
        {"resize_policy": "letterbox"},
        {"model_name": "Inception V3"},
        {"promote": "yes"},
    ],
    ids=lambda c: json.dumps(c),
)
def test_bad_trigger_params_are_refused(dag, change):
    with pytest.raises(ParamValidationError):
        params_with(dag, change).validate()


@pytest.mark.parametrize("promote", [True, False])
def test_the_form_reaches_the_job_intact(dag, promote):
    from sparktf.jobs import register_model

    conf = {"weights_uri": WEIGHTS, "promote": promote, "workspace_uri": "s3://bucket/ws"}
    params_with(dag, conf).validate()
    args = register_model.parse_args(rendered_task(dag, "register_model", conf).application_args)
    assert (args.source, args.application, args.weights_uri, args.model_uri) == ("keras_application", "InceptionV3", WEIGHTS, "")
    assert (args.labels, args.label_map_uri, args.resize_policy, args.promote) == ("imagenet", "", "center_crop", promote)
    assert args.models_uri == "s3://bucket/ws/models/"
    assert args.source_run == "manual__2026-11-24T10:00:00+00:00"
    assert args.registered_at == "2026-11-24T10:00:00+00:00"


def test_a_refusal_by_the_job_fails_the_run_with_its_reason(dag):
    from airflow.sdk.exceptions import AirflowFailException

    report = dag.get_task("check_registered").python_callable
    refusal = {"model_name": "mine", "registered": False, "refused": "the model holds Lambda layers ['lambda']"}
    with pytest.raises(AirflowFailException, match=r"'mine' was not registered: the model holds Lambda layers"):
        report(refusal)
    assert report({"registered": True, "version": 3})["version"] == 3
