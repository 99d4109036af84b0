"""
# Tuning pipeline: prepare data → distributed grid tuning → export the best model

Trains one Keras model per Spark task over a grid (or a random sample of it) of learning rates,
hidden-layer widths, batch sizes and dropouts, picks the best by **validation** accuracy, and
registers it as a new model version, promoting it to `champion` only if it beats the current
champion on the same test set.

| task | what it does | XCom |
|---|---|---|
| `validate_params` | refuses a bad search space or an empty dataset location before Spark starts | the checked settings |
| `prepare_data` | Spark job `jobs/prepare_data.py`: decode, normalise, stratified split, Parquet shards + manifest | counts per split, manifest URI |
| `tune` | Spark job `jobs/tune.py`: one trial per task, TF threads pinned to the task's cores | leaderboard, best trial, figure URI |
| `export_best_model` | Spark job `jobs/export_model.py`: versioned `.keras` + SavedModel + metadata, champion pointer | version, URI, promoted, metrics |

Everything a run writes is under `<workspace_uri>/runs/tuning_pipeline/<run id>/`; models under
`<workspace_uri>/models/<model_name>/`. Re-running (clearing) a run overwrites its own outputs and
reuses finished trials. Runs weekly; trigger it from the UI with the form to try another grid.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from pipeline_settings import (
    DEFAULT_ARGS, DEFAULT_MODEL_NAME, DEFAULT_WORKSPACE_URI, DRIVER_MEMORY, EXECUTOR_MEMORY, SPARK_CONF, path_safe,
)
from spark_job_operator import SparkJobOperator, job_path

RUN_URI = "{{ params.workspace_uri }}/runs/{{ dag.dag_id }}/{{ run_id | path_safe }}"
PREPARED_URI = RUN_URI + "/prepared/"
TUNING_URI = RUN_URI + "/tuning/"
RESULT_URI = RUN_URI + "/_results/{{ ti.task_id }}.json"

PARAMS = {
    "dataset_uri": Param(f"{DEFAULT_WORKSPACE_URI}/datasets/mnist-demo/", type="string", pattern=r"^s3a?://[^/]+/.+",
                         title="Dataset location",
                         description="S3 prefix with <label>/<image> files and/or MNIST IDX files."),
    "workspace_uri": Param(DEFAULT_WORKSPACE_URI, type="string", pattern=r"^s3a?://[^/]+(/.*[^/])?$",
                           title="Workspace", description="S3 prefix (no trailing slash) for runs and models."),
    "model_name": Param(DEFAULT_MODEL_NAME, type="string", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                        title="Model name"),
    "model_family": Param("mnist_cnn", type="string", enum=["mnist_cnn", "mlp"], title="Model family",
                          description="mnist_cnn: the seed's 2-conv network; mlp: a quick 1-hidden-layer net."),
    "learning_rates": Param([0.0003, 0.001, 0.003], type="array", minItems=1,
                            items={"type": "number", "exclusiveMinimum": 0}, title="Learning rates"),
    "hidden_units": Param([128, 512, 1024], type="array", minItems=1, items={"type": "integer", "minimum": 1},
                          title="Hidden units", description="Widths of the fully connected layer."),
    "batch_sizes": Param([128], type="array", minItems=1, items={"type": "integer", "minimum": 1},
                         title="Batch sizes"),
    "dropouts": Param([0.5], type="array", minItems=1,
                      items={"type": "number", "minimum": 0, "exclusiveMaximum": 1}, title="Dropout rates"),
    "optimizer": Param("adam", type="string", enum=["adam", "sgd"], title="Optimizer"),
    "augment": Param(0.0, type="number", minimum=0, maximum=0.3, title="Augmentation",
                     description="Random shift as a fraction of the image size (0 = off)."),
    "epochs": Param(8, type="integer", minimum=1, maximum=500, title="Maximum epochs per trial"),
    "patience": Param(2, type="integer", minimum=1, title="Early-stopping patience (epochs)"),
    "lr_decay_patience": Param(1, type="integer", minimum=0, title="Learning-rate decay patience (epochs)",
                               description="Halve the learning rate after this many epochs without validation "
                                           "improvement; 0 = constant learning rate."),
    "search_strategy": Param("grid", type="string", enum=["grid", "random"], title="Search strategy"),
    "num_random_trials": Param(6, type="integer", minimum=1, title="Trials to sample (random search)"),
    "seed": Param(42, type="integer", minimum=0, title="Random seed"),
    "max_parallel_trials": Param(0, type="integer", minimum=0, title="Maximum parallel trials",
                                 description="0 = one task per trial on every free Spark task slot."),
    "validation_fraction": Param(0.1, type="number", exclusiveMinimum=0, exclusiveMaximum=0.5),
    "test_fraction": Param(0.1, type="number", exclusiveMinimum=0, exclusiveMaximum=0.5),
    "promotion_metric": Param("test_accuracy", type="string", enum=["test_accuracy", "test_loss"],
                              title="Promotion metric"),
    "min_improvement": Param(0.0, type="number", minimum=0, title="Minimum improvement to promote"),
}


def _csv(name: str) -> str:
    return "{{ params.%s | join(',') }}" % name


@dag(
    dag_id="tuning_pipeline",
    schedule="0 3 * * 0",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["ml", "spark", "tensorflow", "tuning"],
    doc_md=__doc__,
    user_defined_filters={"path_safe": path_safe},
    render_template_as_native_obj=False,
)
def tuning_pipeline():
    @task(retries=1)
    def validate_params(params=None) -> dict:
        """Refuse bad Params before any Spark job starts, saying what to fix."""
        from airflow.sdk.exceptions import AirflowFailException

        import airflow_s3
        from sparktf import search, storage

        space = {"learning_rate": params["learning_rates"], "hidden_units": params["hidden_units"],
                 "batch_size": params["batch_sizes"], "dropout": params["dropouts"]}
        problems = search.validate_search_space(
            space, strategy=params["search_strategy"], num_samples=params["num_random_trials"],
            epochs=params["epochs"], max_parallel_trials=params["max_parallel_trials"])
        if params["validation_fraction"] + params["test_fraction"] >= 0.9:
            problems.append("validation_fraction + test_fraction must leave at least 10% for training")
        for name in ("dataset_uri", "workspace_uri"):
            try:
                storage.parse_uri(params[name])
            except ValueError as err:
                problems.append(f"{name}: {err}")
        if not problems:
            location = storage.parse_uri(params["dataset_uri"]).as_prefix()
            listing = airflow_s3.s3_client().list_objects_v2(Bucket=location.bucket, Prefix=location.key, MaxKeys=1)
            if not listing.get("KeyCount"):
                problems.append(f"dataset_uri {location.uri} holds no objects: upload the data set there "
                                f"(<label>/<image> files or MNIST IDX files) or point dataset_uri at it")
        if problems:
            raise AirflowFailException("invalid parameters: " + "; ".join(problems))
        trials = search.build_trials(space, strategy=params["search_strategy"],
                                     num_samples=params["num_random_trials"], seed=params["seed"])
        return {"dataset_uri": params["dataset_uri"], "trials": len(trials),
                "search_strategy": params["search_strategy"], "epochs": params["epochs"]}

    prepare_data = SparkJobOperator(
        task_id="prepare_data",
        name="prepare_data",
        application=job_path("prepare_data.py"),
        application_args=[
            "--input-uri", "{{ params.dataset_uri }}",
            "--output-uri", PREPARED_URI,
            "--validation-fraction", "{{ params.validation_fraction }}",
            "--test-fraction", "{{ params.test_fraction }}",
            "--seed", "{{ params.seed }}",
        ],
        result_uri=RESULT_URI,
        conf=SPARK_CONF,
        driver_memory=DRIVER_MEMORY,
        executor_memory=EXECUTOR_MEMORY,
    )

    tune = SparkJobOperator(
        task_id="tune",
        name="tune",
        application=job_path("tune.py"),
        application_args=[
            "--prepared-uri", PREPARED_URI,
            "--output-uri", TUNING_URI,
            "--model-family", "{{ params.model_family }}",
            "--learning-rates", _csv("learning_rates"),
            "--hidden-units", _csv("hidden_units"),
            "--batch-sizes", _csv("batch_sizes"),
            "--dropouts", _csv("dropouts"),
            "--optimizer", "{{ params.optimizer }}",
            "--augment", "{{ params.augment }}",
            "--epochs", "{{ params.epochs }}",
            "--patience", "{{ params.patience }}",
            "--lr-decay-patience", "{{ params.lr_decay_patience }}",
            "--search-strategy", "{{ params.search_strategy }}",
            "--num-random-trials", "{{ params.num_random_trials }}",
            "--seed", "{{ params.seed }}",
            "--max-parallel-trials", "{{ params.max_parallel_trials }}",
        ],
        result_uri=RESULT_URI,
        conf=SPARK_CONF,
        driver_memory=DRIVER_MEMORY,
        executor_memory=EXECUTOR_MEMORY,
        execution_timeout=pendulum.duration(hours=12),
    )

    export_best_model = SparkJobOperator(
        task_id="export_best_model",
        name="export_best_model",
        application=job_path("export_model.py"),
        application_args=[
            "--results-uri", TUNING_URI + "results.json",
            "--models-uri", "{{ params.workspace_uri }}/models/",
            "--model-name", "{{ params.model_name }}",
            "--source-run", "{{ run_id }}",
            "--promotion-metric", "{{ params.promotion_metric }}",
            "--min-improvement", "{{ params.min_improvement }}",
        ],
        result_uri=RESULT_URI,
        conf=SPARK_CONF,
        driver_memory=DRIVER_MEMORY,
    )

    validate_params() >> prepare_data >> tune >> export_best_model


tuning_pipeline()
