"""Nightly distributed inference: score one date partition of images with a registered model.

The driver lists ``<incoming-uri>/<date>/`` (nested folders, any names) and deals the keys over
Spark tasks. Each task fetches its images with a bounded pool of concurrent GETs, decodes them
with ``sparktf.images.decode_image`` (content decides the format, decompression-bomb limit),
and calls the model once per batch. The model is loaded once per Python worker (sha256-checked,
Keras safe mode) and reused by every task and batch that worker runs; TensorFlow's threads are
pinned to the task's cores. Images that cannot be scored are set aside with their reason.

Output (see ``sparktf.predictions`` for the layout and the reader contract), one folder per model
so that several models can score the same day side by side::

    <output-uri>/<model>/<date>/part-*.parquet           key, predicted_label, score, top_k, model_name,
                                                          model_version, partition_date, processed_at
    <output-uri>/<model>/<date>/_errors/part-*.parquet   key, reason, detail
    <output-uri>/<model>/<date>/_SUCCESS                 manifest, written last

Tasks write to ``<output-uri>/<model>/_staging/<date>/<attempt-id>/``; the driver then publishes the
partition atomically for readers (old ``_SUCCESS`` deleted first, new one written last). A re-run
replaces the partition with the same rows (``--processed-at`` is the run's logical timestamp).
If more than ``--max-failure-ratio`` of the images are set aside, the job fails after publishing.

Usage::

    spark-submit --py-files sparktf.zip jobs/batch_predictions.py \\
        --incoming-uri s3://bucket/ws/incoming/ --output-uri s3://bucket/ws/predictions/ \\
        --date 2026-11-20 --models-uri s3://bucket/ws/models/ --model-name mnist-cnn \\
        --model-version champion --processed-at 2026-11-21T02:30:00+00:00 \\
        --result-uri s3://bucket/ws/runs/nightly_inference/<run>/_results/batch_predictions.json
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
from sparktf import job, predictions, progress, registry, scoring, storage

log = job.log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--incoming-uri", required=True, help="S3 prefix holding <YYYY-MM-DD>/ image partitions")
    parser.add_argument("--output-uri", required=True, help="S3 prefix for <model>/<YYYY-MM-DD>/ prediction partitions")
    parser.add_argument("--date", required=True, type=predictions.check_date, help="partition to score (YYYY-MM-DD)")
    parser.add_argument("--models-uri", required=True, help="S3 prefix of the model registry")
    parser.add_argument("--model-name", required=True, help="registered model name")
    parser.add_argument("--model-version", default="champion",
                        help="'champion' or a version number (the DAG passes the exact version it resolved)")
    parser.add_argument("--expected-sha256", default=None,
                        help="refuse to run unless the version's model sha256 is this (what the DAG checked)")
    parser.add_argument("--result-uri", default=None, help="S3 URI for the job's JSON summary")
    parser.add_argument("--processed-at", default=None,
                        help="timestamp written in every row (ISO 8601; the run's logical date, so re-runs "
                             "are identical); default: midnight UTC of --date")
    parser.add_argument("--attempt-id", default=None,
                        help="path-safe id of this attempt's staging folder (default: a random id)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call")
    parser.add_argument("--fetch-threads", type=int, default=16, help="concurrent GETs per task")
    parser.add_argument("--max-keys-per-task", type=int, default=2000,
                        help="upper bound of images per Spark task (tasks are a multiple of the slots)")
    parser.add_argument("--top-k", type=int, default=5, help="labels with scores kept per image")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="decompression-bomb limit per image")
    parser.add_argument("--max-failure-ratio", type=float, default=0.2,
                        help="fail (after publishing) when more than this share of images is set aside")
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
    """Score the partition, publish it, and return the job result."""
    s3 = storage.client()
    model = registry.resolve(args.models_uri, args.model_name, args.model_version, s3)
    if args.expected_sha256 and model["model_sha256"] != args.expected_sha256:
        raise registry.ModelIntegrityError(
            f"{args.model_name} v{model['version']} now has sha256 {model['model_sha256']}, not the "
            f"{args.expected_sha256} resolved before the job started")
    source = predictions.partition_uri(args.incoming_uri, args.date)
    bucket = storage.parse_uri(source).bucket
    objects = predictions.list_partition(args.incoming_uri, args.date, s3)
    keys = [o["key"] for o in objects]
    processed_at = processed_timestamp(args.processed_at, args.date)
    attempt_id = args.attempt_id or uuid.uuid4().hex[:12]
    output_root = predictions.model_output_uri(args.output_uri, model["name"])  # models never share a partition
    staged = predictions.staging_uri(output_root, args.date, attempt_id)
    final = predictions.model_partition_uri(args.output_uri, model["name"], args.date)
    storage.delete_prefix(staged, s3)  # a retried attempt with the same id starts clean
    log.info("scoring %d objects of %s with %s v%s", len(keys), source, model["name"], model["version"])

    sc = spark.sparkContext
    num_tasks = predictions.plan_tasks(len(keys), sc.defaultParallelism, args.max_keys_per_task)
    groups = list(enumerate(predictions.assign_keys(keys, num_tasks)))
    sc.setJobDescription(f"batch_inference {args.date}: {len(keys)} images in {len(groups)} tasks")
    settings = {"bucket": bucket, "staged_uri": staged, "model": model, "partition_date": args.date,
                "processed_at": processed_at, "batch_size": args.batch_size, "fetch_threads": args.fetch_threads,
                "max_pixels": args.max_pixels, "top": args.top_k}

    def score_task(items):
        for index, group in items:
            yield scoring.score_partition(index, group, **settings)

    started = time.perf_counter()
    watch = progress.InferenceProgress(staged, [len(g) for _, g in groups], log=log).start()  # a line per task
    task_results = sorted(sc.parallelize(groups, len(groups)).mapPartitions(score_task).collect(),
                          key=lambda r: r["index"])
    watch.stop()
    seconds = time.perf_counter() - started

    scored = sum(r["scored"] for r in task_results)
    set_aside = sum(r["set_aside"] for r in task_results)
    if scored + set_aside != len(keys):
        raise RuntimeError(f"accounting error: {scored} scored + {set_aside} set aside != {len(keys)} listed")
    labels: Counter = Counter()
    reasons: Counter = Counter()
    for r in task_results:
        labels.update(r["labels"])
        reasons.update(r["reasons"])
    label_order = {str(name): i for i, name in enumerate(model["label_names"])}
    histogram = {k: labels[k] for k in sorted(labels, key=lambda k: (label_order.get(k, 1 << 30), k))}
    ratio = set_aside / len(keys) if keys else 0.0
    exceeded = ratio > args.max_failure_ratio
    files = {"predictions": [r["file"] for r in task_results], "errors": [r["errors_file"] for r in task_results]}
    manifest = {
        "format": predictions.MANIFEST_FORMAT, "date": args.date, "source_uri": source,
        "model_name": model["name"], "model_version": model["version"], "model_uri": model["model_uri"],
        "model_sha256": model["model_sha256"], "processed_at": processed_at.isoformat(),
        "listed": len(keys), "scored": scored, "set_aside": set_aside, "set_aside_ratio": round(ratio, 6),
        "max_failure_ratio": args.max_failure_ratio, "failure_ratio_exceeded": exceeded,
        "label_histogram": histogram, "reasons": dict(sorted(reasons.items())),
        "files": files, "rows": {r["file"]: r["scored"] for r in task_results},
        "error_rows": {r["errors_file"]: r["set_aside"] for r in task_results},
        "attempt_id": attempt_id, "code_version": sparktf.code_version(),
    }
    success_uri = predictions.publish_partition(staged, final, files["predictions"] + files["errors"], manifest, s3)
    storage.delete_prefix(predictions.staging_uri(output_root, args.date), s3)

    stats = [r["stats"] for r in task_results]
    errors = sorted((e for r in task_results for e in r["errors"]), key=lambda e: e["key"])
    result = {
        "date": args.date, "source_uri": source, "output_uri": final, "success_uri": success_uri,
        "model_name": model["name"], "model_version": model["version"], "model_uri": model["model_uri"],
        "listed": len(keys), "scored": scored, "set_aside": set_aside, "set_aside_ratio": round(ratio, 6),
        "failure_ratio_exceeded": exceeded, "label_histogram": histogram, "reasons": dict(sorted(reasons.items())),
        "errors_sample": [{"key": e["key"], "reason": e["reason"]} for e in errors[:20]],
        "tasks": len(task_results), "seconds": round(seconds, 3),
        "images_per_second": round(len(keys) / seconds, 1) if seconds > 0 and keys else 0.0,
        "model_loads": sum(1 for s in stats if s["model_loaded_now"]),
        "python_workers": len({s["pid"] for s in stats}),
        "executors": sorted({r["executor"] for r in task_results}),
        "model_seconds": round(sum(s["model_seconds"] for s in stats), 3),
        "processed_at": processed_at.isoformat(), "attempt_id": attempt_id,
    }
    if exceeded:
        job.write_result(args.result_uri, result)
        raise RuntimeError(
            f"{set_aside} of {len(keys)} images ({ratio:.1%}) were set aside, more than --max-failure-ratio "
            f"{args.max_failure_ratio:.1%}; the partition was published anyway with every reason in "
            f"{final}{predictions.ERRORS_DIR}/ (reasons: {dict(reasons)})")
    return result


def main(argv: list[str] | None = None) -> int:
    return job.run_spark_job("batch_inference", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
