"""Nightly distributed inference: score one date partition of images with a registered model.

The driver lists ``<incoming-uri>/<date>/`` (nested folders, any names) and deals the keys over
Spark tasks. Each task fetches its images with a bounded pool of concurrent GETs, decodes them
with ``sparktf.images.decode_image`` (content decides the format, decompression-bomb limit),
and calls the model once per batch. The model is loaded once per Python worker (sha256-checked,
Keras safe mode) and reused by every task and batch that worker runs; TensorFlow's threads are
pinned to the task's cores. Images that cannot be scored are set aside with their reason.

Output (see ``sparktf.predictions`` for the layout, the publish protocol and the reader contract),
one folder per model so that several models can score the same day side by side::

    <output-uri>/<model>/<date>/part-<publish-id>-*.parquet          key, predicted_label, score,
                                                                     top_k, model_name, model_version,
                                                                     partition_date, processed_at
    <output-uri>/<model>/<date>/_errors/part-<publish-id>-*.parquet  key, reason, detail
    <output-uri>/<model>/<date>/_SUCCESS                             manifest: counts, model, files
                                                                     (size, ETag, rows); switched last

How the job publishes (staging, one conditional ``_SUCCESS`` switch, the first overlapping run to
publish wins, clean-up) and what readers rely on: the :mod:`sparktf.predictions` docstring. A re-run
replaces the partition with the same rows (``--processed-at`` is the run's logical timestamp); one
that would score fewer than half the images of the published partition is refused unless
``--allow-shrink``. If more than ``--max-failure-ratio`` of the images are set aside, the job
fails after publishing. Objects listed larger than ``--max-image-bytes`` are set aside as
``too_large`` without being fetched; empty folder markers (keys ending in ``/``) are counted,
not listed. An image the store keeps failing to serve fails its task (Spark retries it), never
becomes a set-aside row.

Usage::

    spark-submit --py-files sparktf.zip jobs/batch_inference.py \\
        --incoming-uri s3://bucket/ws/incoming/ --output-uri s3://bucket/ws/predictions/ \\
        --date 2026-11-20 --models-uri s3://bucket/ws/models/ --model-name mnist-cnn \\
        --model-version champion --processed-at 2026-11-21T02:30:00+00:00 \\
        --result-uri s3://bucket/ws/runs/nightly_inference/<run>/_results/batch_inference.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import uuid
from collections import Counter
from typing import Any

import sparktf
from sparktf import incoming, job, knobs, predictions, progress, registry, scoring, storage

log = job.log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--incoming-uri", required=True, help="S3 prefix holding <YYYY-MM-DD>/ image partitions")
    parser.add_argument("--output-uri", required=True, help="S3 prefix for <model>/<YYYY-MM-DD>/ prediction partitions")
    parser.add_argument("--date", required=True, type=predictions.check_date, help="partition to score (YYYY-MM-DD)")
    parser.add_argument("--models-uri", required=True, help="S3 prefix of the model registry")
    parser.add_argument("--model-name", required=True, help="registered model name")
    parser.add_argument("--model-version", default="champion", help="'champion' or a version number (the DAG passes the exact version it resolved)")
    parser.add_argument("--expected-sha256", default=None, help="refuse to run unless the version's model sha256 is this (what the DAG checked)")
    parser.add_argument("--result-uri", default=None, help="S3 URI for the job's JSON summary")
    parser.add_argument(
        "--processed-at",
        default=None,
        help="timestamp written in every row (ISO 8601; the run's logical date, so re-runs are identical); default: midnight UTC of --date",
    )
    parser.add_argument("--attempt-id", default=None, help="path-safe id of this attempt's staging folder (default: a random id)")
    parser.add_argument(
        "--max-keys-per-task", type=int, default=2000, help="upper bound of images per Spark task (tasks are a multiple of the slots)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="labels with scores kept per image")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="decompression-bomb limit per image")
    # --max-failure-ratio, --batch-size, --fetch-threads, --max-image-bytes, --allow-shrink: the
    # nightly DAG's Params, from the same table (sparktf.knobs.NIGHTLY_KNOBS).
    knobs.add_arguments(parser, "batch_inference")
    return parser.parse_args(argv)


def processed_timestamp(value: str | None, date: str) -> dt.datetime:
    """The rows' ``processed_at``: the given ISO timestamp (UTC), or midnight UTC of the date."""
    if not value:
        return dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC)
    stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.astimezone(dt.UTC)


def run(spark, args: argparse.Namespace) -> dict[str, Any]:
    """Score the partition, publish it, and return the job result.

    Raises:
        job.FinalFailure: the failure ratio was breached (after publishing), another run published
            the date first (nothing published), or the re-run would shrink the partition
            (nothing changed). Running again would end the same way.
    """
    s3 = storage.client()
    model = registry.resolve(args.models_uri, args.model_name, args.model_version, s3)
    if args.expected_sha256 and model["model_sha256"] != args.expected_sha256:
        raise registry.ModelIntegrityError(
            f"{args.model_name} v{model['version']} now has sha256 {model['model_sha256']}, not the "
            f"{args.expected_sha256} resolved before the job started"
        )
    output_root = predictions.model_output_uri(args.output_uri, model["name"])  # models never share a partition
    attempt = predictions.begin_attempt(output_root, args.date, args.attempt_id or uuid.uuid4().hex[:12], s3, model_version=model["version"])
    try:
        result = score_and_publish(spark, args, attempt, model, s3)
    except BaseException:
        try:
            predictions.end_attempt(attempt, s3)
        except Exception as err:  # noqa: BLE001 - the job's own failure is the one to report
            log.error("could not remove the staging of attempt %s: %s", attempt.publish_id, err)
        raise
    predictions.end_attempt(attempt, s3)
    return result


def score_and_publish(spark, args: argparse.Namespace, attempt: predictions.Attempt, model: dict[str, Any], s3) -> dict[str, Any]:
    """List, score on the executors, and publish (see :mod:`sparktf.predictions`)."""
    source = predictions.partition_uri(args.incoming_uri, args.date)
    final = predictions.partition_uri(attempt.predictions_uri, args.date)
    objects, markers = incoming.scan_partition(args.incoming_uri, args.date, s3)
    processed_at = processed_timestamp(args.processed_at, args.date)
    base = result_header(args, attempt, model, source=source, final=final, listed=len(objects), markers=markers, processed_at=processed_at)
    # Listing fewer images than half of what the partition scored already: refused before scoring.
    refusal = predictions.shrink_refusal(attempt.previous, len(objects), allow_shrink=args.allow_shrink)
    if refusal:
        raise job.FinalFailure(refusal, base)
    log.info("scoring %d objects of %s with %s v%s (%d folder markers skipped)", len(objects), source, model["name"], model["version"], markers)

    groups = plan_groups(objects, spark.sparkContext.defaultParallelism, args.max_keys_per_task)
    settings = {
        "bucket": storage.parse_uri(source).bucket,
        "staged_uri": attempt.staged_uri,
        "model": model,
        "partition_date": args.date,
        "processed_at": processed_at,
        "batch_size": args.batch_size,
        "fetch_threads": args.fetch_threads,
        "max_pixels": args.max_pixels,
        "top": args.top_k,
        "max_image_bytes": args.max_image_bytes,
    }
    task_results, seconds = score_groups(
        spark, groups, settings, attempt.staged_uri, description=(f"batch_inference {args.date}: {len(objects)} images in {len(groups)} tasks")
    )

    summary = summarise_tasks(task_results, model["label_names"], listed=len(objects), max_failure_ratio=args.max_failure_ratio)
    counts = {"scored": summary["scored"], "set_aside": summary["set_aside"]}
    refusal = predictions.shrink_refusal(attempt.previous, summary["scored"], allow_shrink=args.allow_shrink)
    if refusal:
        raise job.FinalFailure(refusal, {**base, **counts})
    manifest = partition_manifest(args, model, summary, source=source, markers=markers, processed_at=processed_at)
    try:
        manifest = predictions.publish_partition(attempt, staged_files(task_results), manifest, s3)
    except predictions.PublishConflict as conflict:
        raise job.FinalFailure(str(conflict), {**base, **counts, "conflict": str(conflict)}) from None

    result = job_result(base, summary, task_results, manifest, seconds=seconds, final=final)
    if summary["failure_ratio_exceeded"]:
        raise job.FinalFailure(
            f"{summary['set_aside']} of {len(objects)} images ({summary['ratio']:.1%}) were set aside, more than "
            f"--max-failure-ratio {args.max_failure_ratio:.1%}; the partition was published anyway, flagged "
            f"failure_ratio_exceeded, with every reason in {final}{predictions.ERRORS_DIR}/ "
            f"(reasons: {summary['reasons_seen']})",
            result,
        )
    return result


def result_header(
    args: argparse.Namespace,
    attempt: predictions.Attempt,
    model: dict[str, Any],
    *,
    source: str,
    final: str,
    listed: int,
    markers: int,
    processed_at: dt.datetime,
) -> dict[str, Any]:
    """What every result of this attempt says, published or not."""
    return {
        "date": args.date,
        "source_uri": source,
        "output_uri": final,
        "model_name": model["name"],
        "model_version": model["version"],
        "model_uri": model["model_uri"],
        "listed": listed,
        "markers_skipped": markers,
        "attempt_id": attempt.attempt_id,
        "publish_id": attempt.publish_id,
        "processed_at": processed_at.isoformat(),
        "published": False,
    }


def plan_groups(objects: list[dict[str, Any]], slots: int, max_keys_per_task: int) -> list[tuple]:
    """The Spark tasks: ``(index, keys, {key: listed size})`` per task, keys dealt round-robin."""
    keys = [o["key"] for o in objects]
    sizes = {o["key"]: o["size"] for o in objects}
    num_tasks = incoming.plan_tasks(len(keys), slots, max_keys_per_task)
    return [(index, group, {k: sizes[k] for k in group}) for index, group in enumerate(incoming.assign_keys(keys, num_tasks))]


def score_groups(spark, groups: list[tuple], settings: dict[str, Any], staged_uri: str, *, description: str) -> tuple[list[dict[str, Any]], float]:
    """Score every group as one Spark task; ``(the tasks' summaries by index, seconds)``."""
    sc = spark.sparkContext

    def score_task(items):
        for index, group, group_sizes in items:
            yield scoring.score_partition(index, group, sizes=group_sizes, **settings)

    started = time.perf_counter()
    # A log line per finished task, read from the attempt's staging.
    watch = progress.InferenceProgress(staged_uri, [len(g) for _, g, _ in groups], log=log).start()
    try:
        # A failed job's other tasks end before the attempt's staging is removed (see run).
        with job.tasks_settled_on_failure(sc, description):
            task_results = sorted(sc.parallelize(groups, len(groups)).mapPartitions(score_task).collect(), key=lambda r: r["index"])
    finally:
        watch.stop()  # also when a task failed: no watcher outlives the attempt
    return task_results, time.perf_counter() - started


def summarise_tasks(task_results: list[dict[str, Any]], label_names: list, *, listed: int, max_failure_ratio: float) -> dict[str, Any]:
    """Counts, histograms and the failure ratio of the tasks' summaries (every listed key accounted for).

    Raises:
        RuntimeError: the tasks scored and set aside a different number of images than listed.
    """
    scored = sum(r["scored"] for r in task_results)
    set_aside = sum(r["set_aside"] for r in task_results)
    if scored + set_aside != listed:
        raise RuntimeError(f"accounting error: {scored} scored + {set_aside} set aside != {listed} listed")
    labels: Counter = Counter()
    reasons: Counter = Counter()
    for r in task_results:
        labels.update(r["labels"])
        reasons.update(r["reasons"])
    label_order = {str(name): i for i, name in enumerate(label_names)}
    ratio = set_aside / listed if listed else 0.0
    return {
        "listed": listed,
        "scored": scored,
        "set_aside": set_aside,
        "ratio": ratio,
        "failure_ratio_exceeded": ratio > max_failure_ratio,
        "label_histogram": {k: labels[k] for k in sorted(labels, key=lambda k: (label_order.get(k, 1 << 30), k))},
        "reasons": dict(sorted(reasons.items())),
        "reasons_seen": dict(reasons),
        "storage_retries": sum(r["stats"].get("storage_retries", 0) for r in task_results),
    }


def partition_manifest(
    args: argparse.Namespace, model: dict[str, Any], summary: dict[str, Any], *, source: str, markers: int, processed_at: dt.datetime
) -> dict[str, Any]:
    """The ``_SUCCESS`` manifest's content before publishing (the publish adds the files)."""
    return {
        "format": predictions.MANIFEST_FORMAT,
        "date": args.date,
        "source_uri": source,
        "model_name": model["name"],
        "model_version": model["version"],
        "model_uri": model["model_uri"],
        "model_sha256": model["model_sha256"],
        "processed_at": processed_at.isoformat(),
        "listed": summary["listed"],
        "markers_skipped": markers,
        "scored": summary["scored"],
        "set_aside": summary["set_aside"],
        "set_aside_ratio": round(summary["ratio"], 6),
        "max_failure_ratio": args.max_failure_ratio,
        "failure_ratio_exceeded": summary["failure_ratio_exceeded"],
        "label_histogram": summary["label_histogram"],
        "reasons": summary["reasons"],
        "max_image_bytes": args.max_image_bytes,
        "allow_shrink": args.allow_shrink,
        "code_version": sparktf.code_version(),
    }


def staged_files(task_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exactly the staged parts the tasks reported (names unique per task attempt), for the publish."""
    files = []
    for r in task_results:
        files.append({"name": r["file"], "kind": "predictions", "index": r["index"], "rows": r["scored"], "size": r["file_size"]})
        files.append({"name": r["errors_file"], "kind": "errors", "index": r["index"], "rows": r["set_aside"], "size": r["errors_size"]})
    return files


def job_result(
    base: dict[str, Any], summary: dict[str, Any], task_results: list[dict[str, Any]], manifest: dict[str, Any], *, seconds: float, final: str
) -> dict[str, Any]:
    """The job's JSON result once the partition is published."""
    stats = [r["stats"] for r in task_results]
    errors = sorted((e for r in task_results for e in r["errors"]), key=lambda e: e["key"])
    listed = summary["listed"]
    return {
        **base,
        "published": True,
        "success_uri": storage.join_uri(final, predictions.MANIFEST_NAME),
        "scored": summary["scored"],
        "set_aside": summary["set_aside"],
        "set_aside_ratio": round(summary["ratio"], 6),
        "failure_ratio_exceeded": summary["failure_ratio_exceeded"],
        "label_histogram": summary["label_histogram"],
        "reasons": summary["reasons"],
        "errors_sample": [{"key": e["key"], "reason": e["reason"]} for e in errors[:20]],
        "files": len(predictions.listed_files(manifest)),
        "replaced": manifest["replaces"],
        "tasks": len(task_results),
        "seconds": round(seconds, 3),
        "images_per_second": round(listed / seconds, 1) if seconds > 0 and listed else 0.0,
        "model_loads": sum(1 for s in stats if s["model_loaded_now"]),
        "python_workers": len({s["pid"] for s in stats}),
        "executors": sorted({r["executor"] for r in task_results}),
        "model_seconds": round(sum(s["model_seconds"] for s in stats), 3),
        "storage_retries": summary["storage_retries"],
    }


def main(argv: list[str] | None = None) -> int:
    return job.run_spark_job("batch_inference", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
