"""
# Nightly inference: score the images that landed for a day with the champion model

Every night at 02:30 UTC, scores the images of the day that just ended with a registered model,
on Spark, and publishes one predictions partition per day.

* **Which images:** `<workspace_uri>/incoming/<YYYY-MM-DD>/` (any names, nested folders). The date
  is the UTC date of the run's **data interval start**: the run at 2026-11-21 02:30 covers
  2026-11-20 02:30 → 2026-11-21 02:30 and scores partition `2026-11-20` (2.5 h of grace for late
  uploads). A backfill of N days is N runs, N independent partitions. The `date` Param overrides
  this for a manual run (leave it empty otherwise).
* **Which model:** the champion of `model_name`, or the version the `model_version` Param names.
  The exact version is resolved once and recorded in the `resolve_model` XCom; the job uses that
  version even if the champion moves meanwhile.

| task | what it does | XCom |
|---|---|---|
| `find_new_images` | lists the partition (empty folder markers are counted, not listed); **no images → every later task is skipped** (the run succeeds, the published partition is untouched) | date, images, bytes, markers skipped, data interval |
| `resolve_model` | champion or pinned version; checks the `.keras` artifact against its sha256; missing or tampered → fails with the reason and what to do | version, model URI, sha256, labels |
| `batch_inference` | Spark job `jobs/batch_inference.py`: concurrent GETs per task, decode, one model call per batch, model loaded once per Python worker; publish (new files, then a conditional `_SUCCESS` switch) | counts, reasons, label histogram, throughput |
| `publish` | checks the published `_SUCCESS` manifest; emits the predictions **Asset** event (extra: date, URI, counts, model version) | the run summary |

**Output** — `<workspace_uri>/predictions/<model_name>/<YYYY-MM-DD>/` (each model its own partitions): `part-<publish id>-*.parquet` (key,
predicted_label, score, top_k [label, score] x 5, model_name, model_version, partition_date,
processed_at), `_errors/part-<publish id>-*.parquet` (key, reason, detail for every image set
aside) and `_SUCCESS` (a JSON manifest listing every file with its size and ETag, switched last).
**Reader contract:** a published date always has a `_SUCCESS` naming one run's complete output;
read `_SUCCESS`, then exactly the files it lists (not the folder), and if a listed file is gone,
read `_SUCCESS` again (a re-run replaced it). A re-run (clear, or trigger with the same `date`)
writes new files, switches `_SUCCESS` in one conditional PUT, then deletes the old files: the
same rows (`processed_at` is the run's logical date), never a mix, never nothing. Overlapping runs
of one date: **the first to publish wins**; the other fails (`batch_inference`, no retry) without
touching the partition. A re-run that would score fewer than half the images of the published
partition (e.g. incoming objects expired) is refused unless `allow_shrink`.

**Failures:** more than `max_failure_ratio` of the images set aside fails `batch_inference` (no
retry) after the partition (with its `_errors`) is published, flagged `failure_ratio_exceeded` in
`_SUCCESS`; no Asset event is emitted for it. An image the store keeps failing to serve fails the
Spark task (Spark retries it), never becomes a set-aside row. Downstream DAGs schedule on the
Asset `s3://<default workspace>/predictions` and read the date from the event's extra.
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import Asset, CronTriggerTimetable, Param, dag, get_current_context, task

from sparktf.airflow import run_notes
from sparktf.airflow.pipeline_settings import (
    DEFAULT_ARGS,
    DEFAULT_MODEL_NAME,
    DEFAULT_WORKSPACE_URI,
    DRIVER_MEMORY,
    EXECUTOR_MEMORY,
    SPARK_CONF,
    path_safe,
)
from sparktf.airflow.spark_job_operator import SparkJobOperator, job_path

PREDICTIONS = Asset(name="nightly_predictions", uri=f"{DEFAULT_WORKSPACE_URI}/predictions",
                    extra={"layout": "<model name>/<date>/part-*.parquet + _errors/ + _SUCCESS manifest (written last)"})
RESULT_URI = "{{ params.workspace_uri }}/runs/{{ dag.dag_id }}/{{ run_id | path_safe }}/_results/{{ ti.task_id }}.json"
FOUND = "ti.xcom_pull(task_ids='find_new_images')"
RESOLVED = "ti.xcom_pull(task_ids='resolve_model')"

PARAMS = {
    "workspace_uri": Param(DEFAULT_WORKSPACE_URI, type="string", pattern=r"^s3a?://[^/]+(/.*[^/])?$",
                           title="Workspace",
                           description="S3 prefix (no trailing slash) with incoming/, predictions/ and models/."),
    "model_name": Param(DEFAULT_MODEL_NAME, type="string", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                        title="Model name"),
    "model_version": Param("champion", type="string", pattern=r"^(champion|[1-9][0-9]{0,8})$",
                           title="Model version", description="'champion', or a version number to pin."),
    "date": Param("", type="string", pattern=r"^(\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]))?$",
                  title="Partition date (manual runs)",
                  description="YYYY-MM-DD to score that partition; empty = the run's data interval decides."),
    "max_failure_ratio": Param(0.2, type="number", minimum=0, maximum=1, title="Maximum share set aside",
                               description="Fail the run (after publishing) when more images are set aside."),
    "batch_size": Param(256, type="integer", minimum=1, maximum=8192, title="Images per model call"),
    "fetch_threads": Param(16, type="integer", minimum=1, maximum=128, title="Concurrent GETs per Spark task"),
    "max_image_bytes": Param(50_000_000, type="integer", minimum=1, title="Largest image fetched (bytes)",
                             description="Objects listed larger are set aside as too_large without being fetched."),
    "allow_shrink": Param(False, type="boolean", title="Allow a much smaller re-run",
                          description="Replace a published partition even with one scoring fewer than half its images."),
}


def partition_date(params: dict, data_interval_start) -> tuple[str, str]:
    """The partition to score and where that came from: the ``date`` Param, else the data interval."""
    if params.get("date"):
        return params["date"], "param"
    if data_interval_start is None:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("this run has no data interval (triggered without a logical date): "
                                   "set the 'date' Param to the partition to score")
    return data_interval_start.astimezone(dt.UTC).date().isoformat(), "data_interval"


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
        date, source = partition_date(params, context.get("data_interval_start"))
        stamp = context.get("logical_date") or context["dag_run"].run_after
        interval = [str(context.get("data_interval_start")), str(context.get("data_interval_end"))]
        incoming = predictions.partition_uri(params["workspace_uri"] + "/incoming", date)
        objects, markers = scan_partition(params["workspace_uri"] + "/incoming", date)
        summary = {
            "date": date, "date_from": source, "data_interval": interval, "incoming_uri": incoming,
            "images": len(objects), "bytes": sum(o["size"] for o in objects), "markers_skipped": markers,
            "over_max_image_bytes": sum(1 for o in objects if o["size"] > params["max_image_bytes"]),
            "processed_at": stamp.astimezone(dt.UTC).isoformat(),
        }
        if objects:
            return summary
        # A falsy result skips the downstream tasks and is not pushed to XCom: push the summary
        # explicitly so the run still says "0 images for <date>".
        summary["skipped_reason"] = f"no images under {incoming} ({markers} empty folder markers skipped)"
        ti.xcom_push(key="return_value", value=summary)
        print(f"0 images for {date} under {incoming}: nothing to score, downstream tasks skipped")
        return False

    @task
    def resolve_model() -> dict:
        """Resolve champion (or the pinned version) and check its artifact before Spark starts."""
        from airflow.sdk.exceptions import AirflowFailException

        from sparktf import registry
        from sparktf.airflow import aws_connection

        aws_connection.use_connection()
        params = get_current_context()["params"]
        models_uri = params["workspace_uri"] + "/models/"
        try:
            metadata = registry.resolve(models_uri, params["model_name"], params["model_version"])
            registry.verify_artifact(metadata["model_uri"], metadata["model_sha256"])
        except registry.ModelNotFound as err:
            raise AirflowFailException(
                f"cannot use model {params['model_name']!r} ({params['model_version']}): {err}. To fix: run "
                f"tuning_pipeline to register and promote a model, or trigger with model_version set to a "
                f"registered version") from None
        except registry.ModelIntegrityError as err:
            raise AirflowFailException(
                f"cannot use model {params['model_name']!r} ({params['model_version']}): {err}. The artifact was "
                f"changed after it was registered, so it is not trusted. To fix: re-register the model (run "
                f"tuning_pipeline again), or trigger with model_version set to another registered version; "
                f"never edit an artifact in place") from None
        return {
            "model_name": params["model_name"], "version": int(metadata["version"]),
            "requested": params["model_version"], "model_uri": metadata["model_uri"],
            "model_sha256": metadata["model_sha256"], "input_shape": metadata["input_shape"],
            "label_names": metadata["label_names"], "metrics": metadata.get("metrics"),
        }

    batch_inference = SparkJobOperator(
        task_id="batch_inference",
        name="batch_inference",
        application=job_path("batch_inference.py"),
        application_args=[
            "--incoming-uri", "{{ params.workspace_uri }}/incoming/",
            "--output-uri", "{{ params.workspace_uri }}/predictions/",
            "--date", "{{ %s['date'] }}" % FOUND,
            "--models-uri", "{{ params.workspace_uri }}/models/",
            "--model-name", "{{ params.model_name }}",
            "--model-version", "{{ %s['version'] }}" % RESOLVED,
            "--expected-sha256", "{{ %s['model_sha256'] }}" % RESOLVED,
            "--processed-at", "{{ %s['processed_at'] }}" % FOUND,
            "--attempt-id", "{{ run_id | path_safe }}-{{ ti.try_number }}",
            "--batch-size", "{{ params.batch_size }}",
            "--fetch-threads", "{{ params.fetch_threads }}",
            "--max-failure-ratio", "{{ params.max_failure_ratio }}",
            "--max-image-bytes", "{{ params.max_image_bytes }}",
            "--allow-shrink", "{{ params.allow_shrink }}",
        ],
        result_uri=RESULT_URI,
        conf=SPARK_CONF,
        driver_memory=DRIVER_MEMORY,
        executor_memory=EXECUTOR_MEMORY,
        execution_timeout=pendulum.duration(hours=3),
    )

    @task(outlets=[PREDICTIONS])
    def publish(job: dict, model: dict, found: dict) -> dict:
        """Check the published partition and announce it (Asset event) with the run summary."""
        from airflow.sdk.exceptions import AirflowFailException

        from sparktf import predictions
        from sparktf.airflow import aws_connection

        aws_connection.use_connection()
        manifest = predictions.read_published(job["output_uri"])
        if manifest is None or manifest.get("publish_id") != job["publish_id"]:
            current = (manifest or {}).get("attempt_id")
            raise AirflowFailException(f"{job['output_uri']} no longer holds this run's output (attempt "
                                       f"{job['attempt_id']}): a later run (attempt {current}) replaced it; "
                                       f"its own run announces it")
        summary = {
            "date": job["date"], "images_listed": job["listed"], "images_scored": job["scored"],
            "images_set_aside": job["set_aside"], "set_aside_reasons": job["reasons"],
            "markers_skipped": job["markers_skipped"], "storage_retries": job["storage_retries"],
            "label_histogram": job["label_histogram"], "model_name": model["model_name"],
            "model_version": job["model_version"], "output_uri": job["output_uri"],
            "success_uri": job["success_uri"], "images_per_second": job["images_per_second"],
            "job_seconds": job["seconds"], "spark_tasks": job["tasks"], "date_from": found["date_from"],
        }
        get_current_context()["outlet_events"][PREDICTIONS].extra = {
            k: summary[k] for k in ("date", "output_uri", "success_uri", "model_name", "model_version",
                                    "images_scored", "images_set_aside")}
        return summary

    found = find_new_images()
    resolved = resolve_model()
    found >> resolved >> batch_inference
    publish(batch_inference.output, resolved, found)
    run_notes.report_task("nightly")  # last: the run's note (counts, reasons, labels, model)


nightly_inference()
