"""Distributed hyperparameter tuning: one Keras model per Spark task, one task per core slot.

The prepared data reaches every executor once: broadcast when it is small (below
``--broadcast-max-mb``), otherwise each Python worker reads the Parquet shards itself and keeps
them for the trials it runs. TensorFlow's (and OpenMP's) threads are pinned to the task's cores
(``spark.task.cpus``) so parallel trials do not fight for the CPU.

Writes, under ``--output-uri``: ``trials/<trial_id>/metrics.json`` (each trial's record, naming
its model ``trials/<trial_id>/attempts/<attempt id>/model.keras``; see :mod:`sparktf.trials`),
``results.json`` (every trial, the leaderboard, the selected best) and
``error_vs_learning_rate.png`` (final test error against learning rate, one line per hidden-layer
width). Selection is by validation accuracy.

A trial id covers everything that changes its result (:func:`trial_fingerprint`): the
hyperparameters, model family, epochs, patience, learning-rate decay, augmentation, seed, the
prepared data's manifest hash and the code version, so a re-run reuses only trials trained on
the same data with the same settings and code. A trial whose Python worker dies (OOM killer,
segfault) is recorded as ``failed`` by its retried task instead of failing the job: give Spark
room for one retry (``spark.task.maxFailures`` >= 2; in local mode a master ``local[N,F]`` with
F >= 2, since local mode ignores that setting). The job fails only if every trial fails.

Usage::

    spark-submit --py-files sparktf.zip jobs/tune.py \\
        --prepared-uri s3://bucket/runs/<run>/prepared/ --output-uri s3://bucket/runs/<run>/tuning/ \\
        --learning-rates 0.001,0.003 --hidden-units 128,512 --epochs 5
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import sparktf
from sparktf import dataset, executor, features, job, knobs, progress, search, storage, trials

log = job.log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepared-uri", required=True, help="S3 prefix of a prepared data set (with manifest)")
    parser.add_argument("--output-uri", required=True, help="S3 prefix for trials, results and figure")
    parser.add_argument("--result-uri", default=None, help="S3 URI for the job's JSON summary")
    knobs.add_arguments(parser, "tune")
    parser.add_argument(
        "--broadcast-max-mb", type=float, default=512.0, help="broadcast the data when it is at most this large, else read shards per worker"
    )
    features.add_arguments(parser)  # --models-uri, --features-uri, --featurize-batch-size (with --backbone)
    return parser.parse_args(argv)


def search_space(args: argparse.Namespace) -> dict[str, list]:
    return knobs.search_space(vars(args))


def trial_fingerprint(args: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the hyperparameters that changes a trial's result (part of its id)."""
    return {
        "model_family": args.model_family,
        "epochs": args.epochs,
        "patience": args.patience,
        "lr_decay_patience": args.lr_decay_patience,
        "augment": args.augment,
        "seed": args.seed,
        "manifest_sha256": manifest["content_sha256"],
        "code_version": sparktf.code_version(),
        **features.fingerprint_fields(args),  # with a backbone: its sha256 (features differ per version)
    }


def assign_partitions(trial_list: list[dict], max_parallel: int) -> list[list[dict]]:
    """One partition per trial, or ``max_parallel`` partitions dealt round-robin."""
    if max_parallel <= 0 or max_parallel >= len(trial_list):
        return [[t] for t in trial_list]
    return [trial_list[i::max_parallel] for i in range(max_parallel)]


def run_trials(
    spark,
    trial_list: list[dict],
    *,
    data_source,
    family: str,
    epochs: int,
    patience: int,
    trials_uri: str,
    seed: int,
    max_parallel: int,
    lr_decay_patience: int = 0,
    fingerprint: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> list[dict[str, Any]]:
    """Run every trial as Spark tasks; returns their records in trial order.

    ``job_id`` identifies this run of the job in the trials' attempt markers (default: the Spark
    application id plus a random suffix), so a retried task tells this run's crashed attempts
    from an earlier run's.
    """
    sc = spark.sparkContext
    job_id = job_id or f"{sc.applicationId}-{uuid.uuid4().hex[:8]}"
    groups = assign_partitions(trial_list, max_parallel)

    def run_partition(items: Iterator[list[dict]]) -> Iterator[dict]:
        cpus = executor.task_cpus()
        data = features.task_data(data_source)
        for group in items:
            for trial in group:
                yield trials.train_trial(
                    trial,
                    data,
                    family=family,
                    epochs=epochs,
                    patience=patience,
                    trials_uri=trials_uri,
                    seed=seed,
                    cpus=cpus,
                    lr_decay_patience=lr_decay_patience,
                    fingerprint=fingerprint,
                    job_id=job_id,
                )

    sc.setJobDescription(f"tune: {len(trial_list)} trials")
    records = sc.parallelize(groups, len(groups)).mapPartitions(run_partition).collect()
    order = {t["trial_id"]: i for i, t in enumerate(trial_list)}
    return sorted(records, key=lambda r: order[r["trial_id"]])


def plot_error_vs_learning_rate(records: list[dict[str, Any]]) -> bytes:
    """The reference recipe's figure: final test error against learning rate, one line per hidden-unit count.

    Where other dimensions (batch size, dropout) vary too, each point is the trial with the best
    validation accuracy for that (hidden units, learning rate), consistent with selection.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[tuple[int, float], dict] = {}
    for record in trials.rank_trials(records):
        key = (record["params"]["hidden_units"], record["params"]["learning_rate"])
        best.setdefault(key, record)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for hidden in sorted({h for h, _ in best}):
        points = sorted((lr, r["test_error"]) for (h, lr), r in best.items() if h == hidden)
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=f"{hidden} hidden units")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test error (%)")
    ax.set_title("Final test error vs learning rate")
    ax.grid(True, which="both", alpha=0.3)
    if best:
        ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def ship_data(spark, args: argparse.Namespace, manifest: dict[str, Any]) -> tuple[str, Any]:
    """How the prepared arrays reach trials: ``("broadcast", <Broadcast>)`` when they fit, else ``("shards", (uri, manifest))``."""
    size_mb = dataset.prepared_size_bytes(manifest) / 1e6
    if size_mb <= args.broadcast_max_mb:
        data_source = ("broadcast", spark.sparkContext.broadcast(dataset.load_arrays(args.prepared_uri, manifest)))
    else:
        data_source = ("shards", (args.prepared_uri, manifest))
    log.info("data set %.1f MB: %s to executors", size_mb, data_source[0])
    return data_source


def job_summary(results: dict[str, Any], summary: dict[str, Any], *, results_uri: str, trials_uri: str) -> dict[str, Any]:
    """The job's small result (what reaches XCom) from its results document and :func:`sparktf.trials.leaderboard`.

    ``results_uri`` is where the results document was written, ``trials_uri`` the trials' folder.

    ``summary["best"]`` must not be None (a run where every trial failed raises before this).
    """
    records = results["trials"]
    best = summary["best"]
    executors = sorted({str(r["executor"].get("executor_id", r["executor"]["host"])) for r in records})
    return {
        "results_uri": results_uri,
        "figure_uri": results["figure_uri"],
        "trials_uri": trials_uri,
        "trials": len(records),
        "succeeded": len(records) - len(summary["failed"]),
        "failed": len(summary["failed"]),
        "selection_metric": "val_accuracy",
        "failed_trials": [{"trial_id": f["trial_id"], "reason": f["reason"]} for f in summary["failed"][:20]],
        "reused": sum(1 for r in records if r.get("reused")),
        "best": {
            "trial_id": best["trial_id"],
            "params": best["params"],
            "val_accuracy": round(best["val_accuracy"], 5),
            "test_accuracy": round(best["test_accuracy"], 5),
        },
        "leaderboard": summary["leaderboard"],
        "executors": executors,
        "wall_seconds": results["wall_seconds"],
    }


def train_trials(spark, args: argparse.Namespace, trial_list: list[dict], *, data_source, trials_uri: str, fingerprint: dict[str, Any]) -> list[dict]:
    """Grid or random search: every trial to the end (early stopping aside), with a progress line per finished trial."""
    watch = progress.TrialProgress(trials_uri, trial_list, log=log).start()
    try:
        return run_trials(
            spark,
            trial_list,
            data_source=data_source,
            family=args.model_family,
            epochs=args.epochs,
            patience=args.patience,
            trials_uri=trials_uri,
            seed=args.seed,
            max_parallel=args.max_parallel_trials,
            lr_decay_patience=args.lr_decay_patience,
            fingerprint=fingerprint,
        )
    finally:
        watch.stop()


def run(spark, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    manifest = dataset.read_manifest(args.prepared_uri)
    # With --backbone: features computed (or reused), heads trained on them (and the images shipped too when a trial fine-tunes).
    transfer = features.prepare_transfer(spark, args, manifest, ship_images=lambda: ship_data(spark, args, manifest))
    space = search_space(args)
    fixed = {"optimizer": args.optimizer, "augment": args.augment}
    fingerprint = trial_fingerprint(args, manifest)
    trial_list = search.build_trials(
        space, strategy=args.search_strategy, num_samples=args.num_random_trials, seed=args.seed, fixed=fixed, fingerprint=fingerprint
    )
    log.info("tuning %d trials (%s search) on %s", len(trial_list), args.search_strategy, args.prepared_uri)

    data_source = transfer["data_source"] if transfer else ship_data(spark, args, manifest)

    trials_uri = storage.join_uri(args.output_uri, "trials")
    halving_stats = None
    if args.search_strategy == "halving":
        from sparktf import halving_driver

        records, halving_stats = halving_driver.run_halving(
            spark, args, trial_list, data_source=data_source, trials_uri=trials_uri, fingerprint=fingerprint
        )
        summary = halving_driver.leaderboard(records)
    else:
        records = train_trials(spark, args, trial_list, data_source=data_source, trials_uri=trials_uri, fingerprint=fingerprint)
        summary = trials.leaderboard(records)
    results_uri = storage.join_uri(args.output_uri, "results.json")
    figure_uri = storage.join_uri(args.output_uri, "error_vs_learning_rate.png")
    storage.write_bytes(figure_uri, plot_error_vs_learning_rate(records), content_type="image/png")
    results = {
        "prepared_uri": args.prepared_uri,
        "manifest_sha256": manifest["content_sha256"],
        "model_family": args.model_family,
        "search_space": space,
        "fixed": fixed,
        "search_strategy": args.search_strategy,
        "seed": args.seed,
        "epochs": args.epochs,
        "fingerprint": fingerprint,
        "selection_metric": "val_accuracy",
        "data_transfer": data_source[0],
        "trials": records,
        "leaderboard": summary["full_leaderboard"],
        "failed": summary["failed"],
        "best_trial_id": summary["best"]["trial_id"] if summary["best"] else None,
        "figure_uri": figure_uri,
        "wall_seconds": round(time.perf_counter() - started, 2),
        **features.results_fields(transfer),
    }
    if halving_stats:
        results["halving"] = halving_stats
    storage.write_json(results_uri, results)
    if summary["best"] is None:
        reasons = "; ".join(f"{f['trial_id']}: {f['reason']}" for f in summary["failed"][:5])
        raise RuntimeError(f"every one of {len(records)} trials failed ({reasons}); see {results_uri}")
    extra = {**features.summary_fields(transfer), **({"halving": halving_stats} if halving_stats else {})}
    return {**job_summary(results, summary, results_uri=results_uri, trials_uri=trials_uri), **extra}


def main(argv: list[str] | None = None) -> int:
    return job.run_spark_job("tune", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
