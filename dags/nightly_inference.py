"""
# Nightly inference: score the images that landed for a day with the champion model

Every night at 02:30 UTC, scores the images of the day that just ended with a registered model,
on Spark, and publishes one predictions partition per day.

* **Which images:** `<workspace_uri>/incoming/<YYYY-MM-DD>/` (any names, nested folders). The date
  is the UTC date of the run's **data interval start**: the run at 2026-11-21 02:30 covers
  2026-11-20 02:30 → 2026-11-21 02:30 and scores partition `2026-11-20` (2.5 h of grace for late
  uploads). A backfill of N days is N runs, N independent partitions. The `date` Param overrides
  this for a manual run (leave it empty otherwise); a date that is not on the calendar is refused.
* **Which model:** the champion of `model_name`, or the version the `model_version` Param names.
  The exact version is resolved once and recorded in the `resolve_model` XCom; the job uses that
  version even if the champion moves meanwhile.

| task | what it does | XCom |
|---|---|---|
| `find_new_images` | lists the partition (empty folder markers are counted, not listed); **no images → every later task is skipped** (the run succeeds, the published partition is untouched) | date, images, bytes, markers skipped, data interval |
| `resolve_model` | champion or pinned version; checks the `.keras` artifact against its sha256; missing or tampered, or a `batch_size` too large for the executor's memory at the model's input size → fails with the reason and what to do | version, model URI, sha256, labels |
| `batch_inference` | Spark job `jobs/batch_inference.py`: concurrent GETs per task, decode, one model call per batch, model loaded once per Python worker; publish (new files, then a conditional `_SUCCESS` switch) | counts, reasons, label histogram, throughput |
| `publish` | checks the published `_SUCCESS` manifest; emits the predictions **Asset** event (extra: date, URI, counts, model version) | the run summary |
| `mlflow` | only with an `mlflow_default` connection (or `MLFLOW_TRACKING_URI`), else skipped: the night's counts, reasons and labels in MLflow; MLflow down never fails the run | what was and was not logged |

**Output** — `<workspace_uri>/predictions/<model_name>/<YYYY-MM-DD>/` (each model its own partitions):
the layout, the publish protocol and the reader contract are described once, in the `sparktf.predictions`
module. Overlapping runs of one date: **the first to publish wins**; the other fails (`batch_inference`, no
retry). A re-run that would score fewer than half the images of the published partition is refused unless
`allow_shrink`.

**Failures:** more than `max_failure_ratio` of the images set aside fails `batch_inference` (no
retry) after the partition (with its `_errors`) is published, flagged `failure_ratio_exceeded` in
`_SUCCESS`; no Asset event is emitted for it. An image the store keeps failing to serve fails the
Spark task (Spark retries it), never becomes a set-aside row. Downstream DAGs schedule on the
Asset `s3://<default workspace>/predictions` and read the date from the event's extra.

**Late nights:** a run not finished `SPARKTF_NIGHTLY_DEADLINE_MINUTES` (default 240) after its data
interval ends misses its deadline (Airflow's deadline alerts): the triggerer logs one `late night:` line
(DAG, run, date, how late) and calls the notifier `SPARKTF_LATE_NIGHT_NOTIFIER` names (`sparktf.airflow.deadlines`).
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import Asset, CronTriggerTimetable, Param, dag, get_current_context, task

from sparktf import knobs
from sparktf.airflow import deadlines, nightly, run_notes
from sparktf.airflow.pipeline_settings import (
    DEFAULT_ARGS,
    DEFAULT_WORKSPACE_URI,
    model_name_param_spec,
    path_safe,
    workspace_param_spec,
)
from sparktf.airflow.spark_job_operator import SparkJobOperator, job_path

PREDICTIONS = Asset(
    name="nightly_predictions",
    uri=f"{DEFAULT_WORKSPACE_URI}/predictions",
    extra={"layout": "<model name>/<date>/part-*.parquet + _errors/ + _SUCCESS manifest (written last)"},
)

PARAMS = {
    "workspace_uri": Param(**workspace_param_spec("S3 prefix (no trailing slash) with incoming/, predictions/ and models/.")),
    "model_name": Param(**model_name_param_spec()),
    "model_version": Param(
        "champion",
        type="string",
        pattern=r"^(champion|[1-9][0-9]{0,8})$",
        title="Model version",
        description="'champion', or a version number to pin.",
    ),
    # format "date": the form shows a date picker and refuses 2026-02-31 (find_new_images checks again).
    "date": Param(
        None,
        type=["null", "string"],
        format="date",
        title="Partition date (manual runs)",
        description="YYYY-MM-DD to score that partition; empty = the run's data interval decides.",
    ),
    # The job's settings: one table (sparktf.knobs.NIGHTLY_KNOBS) gives the form and the job's flags.
    **{name: Param(**spec) for name, spec in knobs.param_specs(knobs.NIGHTLY_KNOBS).items()},
}


@dag(
    dag_id="nightly_inference",
    schedule=CronTriggerTimetable("30 2 * * *", timezone="UTC", interval=dt.timedelta(days=1)),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=3,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["ml", "spark", "tensorflow", "inference"],
    doc_md=__doc__,
    user_defined_filters={"path_safe": path_safe},
    render_template_as_native_obj=False,
    # Late night: not finished SPARKTF_NIGHTLY_DEADLINE_MINUTES after the data interval end -> one log line + notifier.
    deadline=deadlines.nightly_deadline(),
)
def nightly_inference():
    @task.short_circuit(retries=2)
    def find_new_images() -> dict | bool:
        """List the day's partition; with nothing in it, skip everything downstream (not a failure)."""
        from sparktf import predictions
        from sparktf.airflow import aws_connection
        from sparktf.incoming import scan_partition

        aws_connection.use_connection()
        context = get_current_context()
        params, ti = context["params"], context["ti"]
        date, source = nightly.partition_date(params, context.get("data_interval_start"))
        objects, markers = scan_partition(params["workspace_uri"] + "/incoming", date)
        summary = nightly.found_summary(
            date=date,
            source=source,
            incoming_uri=predictions.partition_uri(params["workspace_uri"] + "/incoming", date),
            objects=objects,
            markers=markers,
            max_image_bytes=params["max_image_bytes"],
            data_interval=[str(context.get("data_interval_start")), str(context.get("data_interval_end"))],
            processed_at=context.get("logical_date") or context["dag_run"].run_after,
        )
        # The two values batch_inference takes, as XComs of their own (found["date"] below).
        for key in ("date", "processed_at"):
            ti.xcom_push(key=key, value=summary[key])
        if objects:
            return summary
        # A falsy result skips the downstream tasks: push the summary so the run still says "0 images".
        ti.xcom_push(key="return_value", value=summary)
        print(f"0 images for {date}: {summary['skipped_reason']}; downstream tasks skipped")
        return False

    @task(multiple_outputs=True)  # each key is an XCom of its own too: resolved["version"] below
    def resolve_model() -> dict:
        """Resolve champion (or the pinned version), check its artifact and the batch size before Spark starts."""
        from sparktf import registry
        from sparktf.airflow import aws_connection, validation
        from sparktf.airflow.pipeline_settings import EXECUTOR_MEMORY

        aws_connection.use_connection()
        params = get_current_context()["params"]
        try:
            metadata = registry.resolve(params["workspace_uri"] + "/models/", params["model_name"], params["model_version"])
            registry.verify_artifact(metadata["model_uri"], metadata["model_sha256"])
        except (registry.ModelNotFound, registry.ModelIntegrityError) as err:
            tampered = isinstance(err, registry.ModelIntegrityError)
            raise validation.failure(nightly.model_refusal(params["model_name"], params["model_version"], str(err), tampered=tampered)) from None
        validation.refuse(validation.batch_size_problems(params["batch_size"], metadata["input_shape"], EXECUTOR_MEMORY), "invalid parameters")
        return nightly.resolved_summary(params, metadata)

    found = find_new_images()
    resolved = resolve_model()
    batch_inference = SparkJobOperator(
        task_id="batch_inference",
        application=job_path("batch_inference.py"),
        application_args=[
            "--incoming-uri",
            "{{ params.workspace_uri }}/incoming/",
            "--output-uri",
            "{{ params.workspace_uri }}/predictions/",
            "--date",
            found["date"],
            "--models-uri",
            "{{ params.workspace_uri }}/models/",
            "--model-name",
            "{{ params.model_name }}",
            "--model-version",
            resolved["version"],
            "--expected-sha256",
            resolved["model_sha256"],
            "--processed-at",
            found["processed_at"],
            "--attempt-id",
            "{{ run_id | path_safe }}-{{ ti.try_number }}",
            *knobs.job_arguments("batch_inference"),
        ],
        execution_timeout=pendulum.duration(hours=3),
    )

    @task(outlets=[PREDICTIONS])
    def publish(job: dict, model: dict, found: dict) -> dict:
        """Check the published partition and announce it (Asset event) with the run summary."""
        from sparktf import predictions
        from sparktf.airflow import aws_connection, validation

        aws_connection.use_connection()
        problem = nightly.replaced_problem(predictions.read_published(job["output_uri"]), job)
        validation.refuse([problem] if problem else [])
        summary = nightly.published_summary(job, model, found)
        get_current_context()["outlet_events"][PREDICTIONS].extra = nightly.asset_extra(summary)
        return summary

    found >> resolved >> batch_inference

    @task(task_id="mlflow")
    def track_in_mlflow() -> dict:
        """Log the night's counts, reasons and labels to MLflow when configured (skipped otherwise; never fails)."""
        from sparktf.airflow import mlflow_tracking

        return mlflow_tracking.run_task("nightly")

    publish(batch_inference.output, resolved, found) >> track_in_mlflow()
    run_notes.report_task("nightly")  # last: the run's note (counts, reasons, labels, model)


nightly_inference()
