"""Export the best tuning trial as a new model version and promote it if it beats the champion.

Picks the trial with the best validation accuracy from the tuning results and registers it
(:func:`sparktf.registry.write_version`: the ``.keras`` file, a TensorFlow SavedModel and
``metadata.json`` last), then moves ``champion.json`` only when the new model beats the current
champion by ``--min-improvement`` on ``--promotion-metric`` (:func:`sparktf.registry.promote`:
compare-and-swap, so two exports at once cannot leave the worse model as champion). Only like is
compared with like (:func:`sparktf.registry.comparable`): the same label names, input shape and
test split (the champion's recorded score is used; it is never re-scored on another split, which
may hold images it trained on). Otherwise the champion stays and the reason says why and what to
do; ``--champion-policy replace`` makes the new version the champion without comparing. With
``--promotion approve`` the champion is not moved here: the job only says whether it would move
(``awaiting_approval``), and the DAG's ``approve_promotion`` task asks a person. The result
says whether the champion moved and why (``promoted``, ``promotion_reason``). Exporting the same
tuning run again reuses its version (after checking its files), also when an earlier attempt died
before finishing it.

Usage::

    spark-submit --py-files sparktf.zip jobs/export_model.py \\
        --results-uri s3://bucket/runs/<run>/tuning/results.json \\
        --models-uri s3://bucket/models/ --model-name mnist-cnn --source-run <run id> \\
        --trained-at 2026-11-22T03:00:00+00:00
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any

import sparktf
from sparktf import backbones, dataset, executor, job, knobs, registry, storage

log = job.log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-uri", required=True, help="results.json written by the tuning job")
    parser.add_argument("--models-uri", required=True, help="S3 prefix of the model registry")
    parser.add_argument("--model-name", required=True, help="registered model name")
    parser.add_argument("--source-run", required=True, help="id of the Airflow run that trained it")
    parser.add_argument("--trained-at", required=True, help="when the run trained it (ISO 8601, from the caller; recorded in the metadata)")
    parser.add_argument("--result-uri", default=None, help="S3 URI for the job's JSON summary")
    knobs.add_arguments(parser, "export_model")
    return parser.parse_args(argv)


def export_version(args: argparse.Namespace, best: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Register the best trial's model (sha256-checked on the way) as a new version."""
    manifest = dataset.read_manifest(results["prepared_uri"])
    metadata = {
        "family": best["family"],
        "params": best["params"],
        "trial_id": best["trial_id"],
        "metrics": {k: best[k] for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss")},
        "epochs_run": best["epochs_run"],
        "input_shape": list(manifest["image_shape"]),
        "label_names": manifest["label_names"],
        "manifest_sha256": results["manifest_sha256"],
        "test_split_sha256": manifest.get("test_split_sha256"),
        "prepared_uri": results["prepared_uri"],
        "source_run": args.source_run,
        "results_uri": args.results_uri,
        "trained_at": args.trained_at,
        "code_version": sparktf.code_version(),
    }
    if results.get("backbone"):  # your own classes: one model, the backbone and the trained head
        return backbones.export_transfer(args.models_uri, args.model_name, best, results, metadata)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "model.keras")
        model = registry.load_verified_model(best["model_uri"], best["model_sha256"], keep_at=model_path)
        saved = os.path.join(tmp, "saved_model")
        model.export(saved, format="tf_saved_model", verbose=False)
        return registry.write_version(args.models_uri, args.model_name, model_path=model_path, metadata=metadata, saved_model_dir=saved)


def decide(args: argparse.Namespace, metadata: dict[str, Any]) -> tuple[registry.Promotion, bool]:
    """Move the champion (:func:`sparktf.registry.champion_decision`), or with ``--promotion approve``
    only decide whether it would move (nothing written: a person approves the move later).

    Returns:
        ``(the decision, whether a person's approval is awaited)``.
    """
    approve = args.promotion == "approve"
    decision = registry.champion_decision(
        args.models_uri,
        args.model_name,
        metadata,
        champion_policy=args.champion_policy,
        metric=args.promotion_metric,
        min_improvement=args.min_improvement,
        source_run=args.source_run,
        dry_run=approve,
    )
    if approve and decision.promoted:
        reason = f"awaiting a person's approval (promotion 'approve'): {decision.reason}"
        return dataclasses.replace(decision, promoted=False, reason=reason), True
    return decision, False


def run(args: argparse.Namespace) -> dict[str, Any]:
    executor.pin_threads(int(os.environ.get("SPARKTF_EXPORT_THREADS", "2")))
    results = storage.read_json(args.results_uri)
    by_id = {t["trial_id"]: t for t in results["trials"]}
    if not results.get("best_trial_id"):
        raise RuntimeError(f"{args.results_uri} has no successful trial to export")
    best = by_id[results["best_trial_id"]]

    metadata = registry.find_run_version(args.models_uri, args.model_name, args.source_run, best["trial_id"])
    reused = metadata is not None
    if reused:
        # Promote nothing whose files changed since it was written.
        registry.verify_artifact(metadata["model_uri"], metadata["model_sha256"])
        registry.verify_saved_model(metadata)
    else:
        metadata = export_version(args, best, results)

    decision, awaiting = decide(args, metadata)
    log.info("model %s v%s: promoted=%s (%s)", args.model_name, metadata["version"], decision.promoted, decision.reason)
    return {
        "model_name": args.model_name,
        "version": metadata["version"],
        "uri": metadata["uri"],
        "model_uri": metadata["model_uri"],
        "saved_model_uri": metadata["saved_model_uri"],
        "trial_id": best["trial_id"],
        "params": best["params"],
        "metrics": metadata["metrics"],
        "promoted": decision.promoted,
        "promotion_reason": decision.reason,
        "awaiting_approval": awaiting,
        "champion_score": decision.champion_score,
        "champion_version": decision.champion_version,
        "promotion_attempts": decision.attempts,
        "reused_version": reused,
    }


def main(argv: list[str] | None = None) -> int:
    return job.run_driver_job("export_model", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
