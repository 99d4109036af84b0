"""The knob table: the DAG's Params, its rendered job arguments and the jobs' parsers agree."""

from __future__ import annotations

import math
import shlex

import pytest

from sparktf import knobs, search
from sparktf.jobs import export_model, prepare_data, tune
from sparktf_dev.testing import rendered_task

JOB_PARSERS = {"prepare_data": prepare_data.parse_args, "tune": tune.parse_args, "export_model": export_model.parse_args}
REQUIRED = {
    "prepare_data": ["--input-uri", "s3://b/raw/", "--output-uri", "s3://b/prepared/"],
    "tune": ["--prepared-uri", "s3://b/prepared/", "--output-uri", "s3://b/tuning/"],
    "export_model": [
        "--results-uri",
        "s3://b/r.json",
        "--models-uri",
        "s3://b/models/",
        "--model-name",
        "m",
        "--source-run",
        "r",
        "--trained-at",
        "2026-11-22T03:00:00+00:00",
    ],
}


@pytest.fixture(scope="module")
def tuning_dag(dag_bag):
    return dag_bag.dags["tuning_pipeline"]


@pytest.mark.parametrize("job", sorted(JOB_PARSERS))
def test_dag_defaults_reach_the_job_unchanged(tuning_dag, job):
    """The DAG's default Params, rendered into the job's command line, parse to the job's own defaults."""
    params = {name: param.value for name, param in tuning_dag.params.items()}
    task = {"prepare_data": "prepare_data", "tune": "tune", "export_model": "export_best_model"}[job]
    argv = rendered_task(tuning_dag, task).application_args
    from_dag = vars(JOB_PARSERS[job](argv))
    own_defaults = vars(JOB_PARSERS[job](REQUIRED[job]))
    for knob in knobs.knobs_of(job):
        assert from_dag[knob.name] == own_defaults[knob.name] == knob.default, (job, knob.name, shlex.join(argv))
        assert params[knob.name] == knob.default


def test_every_knob_is_a_param_with_its_bounds(tuning_dag):
    for knob in knobs.KNOBS:
        schema = tuning_dag.params.get_param(knob.name).schema
        assert schema["title"] == knob.title
        bounds = schema["items"] if knob.is_list else schema
        if knob.minimum is not None:
            assert bounds["minimum"] == knob.minimum, knob.name


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"learning_rates": [0.01, math.nan]}, "learning_rates: every value must be a number"),
        ({"dropouts": [math.inf]}, "dropouts: every value must be a number"),
        ({"min_improvement": math.nan}, "min_improvement: must be a number"),
        ({"seed": 2**32}, "seed: must be an integer >= 0 and <= 4294967295"),
        ({"epochs": 2.5}, "epochs: must be an integer"),
        ({"hidden_units": [64, 64]}, "hidden_units: remove the duplicate values"),
        ({"model_family": "resnet"}, "model_family: must be one of"),
        ({"validation_fraction": 0.45, "test_fraction": 0.45}, "at least 10% for training"),
        ({"learning_rate": [0.1]}, "learning_rate: unknown setting"),
    ],
)
def test_what_a_schema_lets_through_is_refused(change, fragment):
    problems = knobs.validate({**knobs.defaults(), **change})
    assert any(fragment in p for p in problems), problems


def test_defaults_are_valid():
    assert knobs.validate(knobs.defaults()) == []


def test_random_search_samples_a_huge_grid_without_building_it():
    space = {
        "learning_rate": [0.001 * (i + 1) for i in range(100)],
        "hidden_units": list(range(1, 101)),
        "batch_size": list(range(1, 101)),
        "dropout": [i / 200 for i in range(100)],
    }  # 10^8 points
    sample = search.build_trials(space, strategy="random", num_samples=20, seed=3)
    assert len(sample) == len({t["trial_id"] for t in sample}) == 20
    assert sample == search.build_trials(space, strategy="random", num_samples=20, seed=3)
    for trial in sample:
        assert trial["params"]["learning_rate"] in space["learning_rate"]
        assert trial["params"]["hidden_units"] in space["hidden_units"]


def test_model_builders_refuse_a_hyperparameter_they_do_not_use():
    from sparktf.models import build_model

    with pytest.raises(ValueError, match=r"does not use \['hiden_units'\]"):
        build_model("mlp", (28, 28, 1), 10, learning_rate=0.01, hiden_units=64)
    model = build_model("mlp", (28, 28, 1), 10, learning_rate=0.01, hidden_units=8, augment=0.1)
    assert "shift" in [layer.name for layer in model.layers]  # mlp honours augment now


def test_every_family_takes_every_hyperparameter_the_tune_job_passes():
    from sparktf import knobs
    from sparktf.models import MODEL_FAMILIES, build_model, model_hyperparameters

    # "head" is no choice of the form: a backbone run's trials are heads (sparktf.features).
    assert set(knobs.BY_NAME["model_family"].choices) | {"head"} == set(MODEL_FAMILIES)
    trial = {dimension: knob.default[0] for dimension, knob in knobs.search_dimensions().items()}
    hyper = model_hyperparameters(trial)  # as the trials build: batch size goes to fit(), not the builder
    for family in knobs.BY_NAME["model_family"].choices:
        model = build_model(family, (28, 28, 1), 10, optimizer="adam", augment=0.1, **hyper)
        assert model.output_shape == (None, 10), family
    head_space = knobs.search_space({**knobs.defaults(), "backbone": "b"})
    head_hyper = model_hyperparameters({k: v[0] for k, v in head_space.items()})  # fine_tune_layers is the trial's phase, not the head's
    assert build_model("head", (12,), 10, optimizer="adam", augment=0.0, **head_hyper).output_shape == (None, 10)
