"""
# Tuning pipeline: prepare data → distributed grid tuning → export the best model

Trains one Keras model per Spark task over a grid (or a random sample of it) of learning rates,
hidden-layer widths, batch sizes and dropouts, picks the best by **validation** accuracy, and
registers it as a new model version, promoting it to `champion` only if it beats the current
champion on the same test set.

| task | what it does | XCom |
|---|---|---|
| `validate_params` | refuses a bad search space, an empty dataset location or an unusable `backbone` before Spark starts | the checked settings |
| `prepare_data` | Spark job `jobs/prepare_data.py`: decode, normalise, stratified split, Parquet shards + manifest | counts per split, manifest URI |
| `tune` | Spark job `jobs/tune.py` (with a `backbone`: its features computed once per backbone version and data, then heads tuned on them): one trial per task, TF threads pinned to the task's cores; a trial whose worker dies is recorded as failed | leaderboard, best trial, failed trials and why, figure URI |
| `export_best_model` | Spark job `jobs/export_model.py`: versioned `.keras` + SavedModel + metadata, champion pointer moved by compare-and-swap (with `promotion` approve: only whether it would move) | version, URI, promoted and `promotion_reason`, `awaiting_approval`, metrics |
| `approve_promotion` | `promotion` approve only, and only when the version would become champion: waits for a person's Approve / Reject in the UI (Required Actions), with the leaderboard, the comparison and the figure; no answer within `approval_timeout_hours` = Reject | the answer: approved, by whom, when |
| `promote_approved` | on Approve, moves the champion by the same compare-and-swap, compared again with the champion of that moment; on Reject / timeout records why not (no Spark) | the final decision (export's keys) |
| `mlflow` | only with an `mlflow_default` connection (or `MLFLOW_TRACKING_URI`), else skipped: the run, its trials, the model version and the `champion` alias in MLflow (`sparktf.airflow.mlflow_tracking`), after the promotion settled; MLflow down never fails the run | what was and was not logged |

Everything a run writes is under `<workspace_uri>/runs/tuning_pipeline/<run id>/`; models under
`<workspace_uri>/models/<model_name>/`. Re-running (clearing) a run overwrites its own outputs and
reuses finished trials trained on the same data with the same settings and code. Runs weekly; trigger it from the UI with the form to try another grid.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from sparktf import knobs
from sparktf.airflow import approval, run_notes
from sparktf.airflow.pipeline_settings import (
    DEFAULT_ARGS,
    DEFAULT_WORKSPACE_URI,
    REGISTRY_CONN_ID,
    RUN_URI,
    model_name_param_spec,
    path_safe,
    workspace_param_spec,
)
from sparktf.airflow.spark_job_operator import SparkJobOperator, job_path

PREPARED_URI = RUN_URI + "/prepared/"
TUNING_URI = RUN_URI + "/tuning/"
# With a backbone: prepare_data decodes to its input (registry), tune keeps its features by backbone and data.
PREPARE_BACKBONE_ARGS = ["--models-uri", "{{ params.workspace_uri }}/models/"]
TUNE_BACKBONE_ARGS = [*PREPARE_BACKBONE_ARGS, "--features-uri", "{{ params.workspace_uri }}/features/"]

PARAMS = {
    "dataset_uri": Param(
        f"{DEFAULT_WORKSPACE_URI}/datasets/mnist-demo/",
        type="string",
        pattern=r"^s3a?://[^/]+/.+",
        title="Dataset location",
        description="S3 prefix with <label>/<image> files and/or MNIST IDX files.",
    ),
    "workspace_uri": Param(**workspace_param_spec("S3 prefix (no trailing slash) for runs and models.")),
    "model_name": Param(**model_name_param_spec()),
    # The tuning knobs: one table (sparktf.knobs) gives the form, the job arguments and the checks.
    **{name: Param(**spec) for name, spec in knobs.param_specs().items()},
}


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
        from sparktf import storage
        from sparktf.airflow import aws_connection, validation

        problems, summary = validation.tuning_problems(params)
        if not problems:
            aws_connection.use_connection()
            problems = validation.dataset_problems(params["dataset_uri"], storage.has_objects)
        problems = problems or validation.backbone_problems(params["backbone"], params["workspace_uri"] + "/models/", params["fine_tune_layers"])
        validation.refuse(problems, "invalid parameters")
        return summary

    prepare_data = SparkJobOperator(
        task_id="prepare_data",
        application=job_path("prepare_data.py"),
        application_args=[
            "--input-uri",
            "{{ params.dataset_uri }}",
            "--output-uri",
            PREPARED_URI,
            *PREPARE_BACKBONE_ARGS,
            *knobs.job_arguments("prepare_data"),
        ],
    )

    tune = SparkJobOperator(
        task_id="tune",
        application=job_path("tune.py"),
        application_args=[
            "--prepared-uri",
            PREPARED_URI,
            "--output-uri",
            TUNING_URI,
            *TUNE_BACKBONE_ARGS,
            *knobs.job_arguments("tune"),
        ],
        execution_timeout=pendulum.duration(hours=12),
    )

    export_best_model = SparkJobOperator(
        task_id="export_best_model",
        application=job_path("export_model.py"),
        aws_conn_id=REGISTRY_CONN_ID,  # the one connection that may write models/ (pipeline_settings)
        application_args=[
            "--results-uri",
            TUNING_URI + "results.json",
            "--models-uri",
            "{{ params.workspace_uri }}/models/",
            "--model-name",
            "{{ params.model_name }}",
            "--source-run",
            "{{ run_id }}",
            "--trained-at",
            "{{ dag_run.run_after.isoformat() }}",
            *knobs.job_arguments("export_model"),
        ],
    )

    @task(task_id="mlflow", trigger_rule="none_failed")  # the approval tasks are skipped unless a person decides
    def track_in_mlflow() -> dict:
        """Log the run, its trials, the model version and the champion alias to MLflow when configured (skipped otherwise; never fails)."""
        from sparktf.airflow import mlflow_tracking

        return mlflow_tracking.run_task("tuning")

    approve, settled = approval.approval_tasks()  # promotion "approve": a person first
    validate_params() >> prepare_data >> tune >> export_best_model >> approve
    settled >> track_in_mlflow()  # the champion alias follows the promotion as settled
    run_notes.report_task("tuning")  # last: the run's note (leaderboard, champion, figure)


tuning_pipeline()
