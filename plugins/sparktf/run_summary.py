"""What a finished run means to a person: the facts behind a run note and the terminal summary.

Pure Python, no Airflow, no S3: the callers hand in the jobs' results (XCom values, or the tuning
job's ``results.json``) and render the facts as Markdown (:mod:`sparktf.airflow.run_notes`) or as
plain text (``scripts/print_summary.py``).

**The default configuration** is the reference network (``mnist_cnn`` defaults), the baseline the
project measures against (99.2 % on MNIST): model family ``mnist_cnn``, learning rate 0.001, 1024 hidden
units, batch size 128, dropout 0.5, optimizer adam, no augmentation. It is a fixed configuration,
not the knob table's defaults (those are a grid of a better family, chosen to beat it). When a
run's grid contains it, its test error is the baseline of the "default vs tuned" comparison; the
tuned model is the trial selected by validation accuracy. Budget settings (epochs, patience,
learning-rate decay) are the same for every trial of a run, so they are not part of the match.
"""

from __future__ import annotations

import math
from typing import Any

from sparktf import knobs

# The reference network (mnist_cnn defaults): the "default" of "default vs tuned".
DEFAULT_CONFIGURATION = {
    "model_family": "mnist_cnn",
    "learning_rate": 0.001,
    "hidden_units": 1024,
    "batch_size": 128,
    "dropout": 0.5,
    "optimizer": "adam",
    "augment": 0.0,
}
# Short column names of the search dimensions, for tables.
DIMENSION_LABELS = {"learning_rate": "lr", "hidden_units": "hidden", "batch_size": "batch", "dropout": "dropout"}


def default_configuration() -> dict[str, Any]:
    """The default configuration as one trial: family, search dimensions and fixed settings."""
    return dict(DEFAULT_CONFIGURATION)


def describe_configuration(config: dict[str, Any]) -> str:
    """``mnist_cnn, lr 0.001, hidden 1024, batch 128, dropout 0.5, adam, no augmentation``."""
    parts = [str(config["model_family"])] if "model_family" in config else []
    parts += [f"{DIMENSION_LABELS.get(k, k)} {format_value(config[k])}" for k in knobs.search_dimensions() if k in config]
    if "optimizer" in config:
        parts.append(str(config["optimizer"]))
    if "augment" in config:
        parts.append("no augmentation" if not config["augment"] else f"augment {format_value(config['augment'])}")
    return ", ".join(parts)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def find_default_row(rows: list[dict[str, Any]], *, model_family: str | None, fixed: dict[str, Any] | None) -> dict | None:
    """The leaderboard row of the default configuration, or None when the run did not train it.

    Args:
        rows: every successful trial's leaderboard row (``full_leaderboard``).
        model_family: the run's model family; fixed: the run's fixed settings (optimizer, augment).
    """
    default = default_configuration()
    run_settings = {"model_family": model_family, **(fixed or {})}
    for name in ("model_family", "optimizer", "augment"):
        if name in run_settings and run_settings[name] is not None and not _same(run_settings[name], default[name]):
            return None
    for row in rows:
        if all(_same(row.get(dim), default[dim]) for dim in knobs.search_dimensions()):
            return row
    return None


def error_reduction(default_accuracy: float, tuned_accuracy: float) -> float | None:
    """Relative test-error reduction of the tuned model over the default (0.29 = 29 % less error)."""
    default_error = 1.0 - default_accuracy
    if default_error <= 0:
        return None
    return (default_error - (1.0 - tuned_accuracy)) / default_error


def format_value(value: Any) -> str:
    """Hyperparameters as people write them: 0.001, 1024, 0.5."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def tuning_facts(tune: dict[str, Any] | None, results: dict[str, Any] | None = None, export: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a tuning run's summary says, from its jobs' results.

    Args:
        tune: the ``tune`` task's result (XCom), or None when it did not finish.
        results: the tuning job's ``results.json`` (every trial; optional: without it only the
            XCom's top rows are known).
        export: the ``export_best_model`` task's result (XCom), or None.

    Returns:
        ``trials``, ``succeeded``, ``failed`` (with reasons), ``rows`` (ranked, best first),
        ``varying`` and ``constant`` dimensions, ``default`` (the comparison, or why there is
        none), ``champion`` (the decision), ``backbone`` (:func:`backbone_used`), ``figure_uri`` and
        ``halving`` (:func:`halving_facts`, None unless the search was successive halving).
    """
    results = results or {}
    tune = tune or {}
    rows = list(results.get("leaderboard") or tune.get("leaderboard") or [])
    complete = bool(results.get("leaderboard")) or len(rows) == tune.get("succeeded", len(rows))
    dims = list(knobs.search_dimensions(rows[0] if rows else None))  # a head run has its own (l2_weight)
    values = {dim: {format_value(r.get(dim)) for r in rows} for dim in dims}
    varying = [d for d in dims if len(values[d]) > 1] or dims[:2]
    constant = {d: rows[0].get(d) for d in dims if d not in varying} if rows else {}
    failed = list(results.get("failed") or [])
    facts: dict[str, Any] = {
        "trials": tune.get("trials", len(results.get("trials") or []) or None),
        "succeeded": tune.get("succeeded", len(rows) if results else None),
        "failed": failed if failed else tune.get("failed", 0),
        "rows": rows,
        "rows_complete": complete,
        "varying": varying,
        "constant": constant,
        "fixed": results.get("fixed") or {},
        "model_family": results.get("model_family"),
        "selection_metric": tune.get("selection_metric", "val_accuracy"),
        "figure_uri": tune.get("figure_uri") or results.get("figure_uri"),
        "results_uri": tune.get("results_uri"),
        "wall_seconds": tune.get("wall_seconds"),
        "halving": halving_facts(tune, results),
        "backbone": backbone_used(tune),
    }
    default = default_configuration()
    comparison: dict[str, Any] = {"configuration": default, "description": describe_configuration(default)}
    default_row = find_default_row(rows, model_family=results.get("model_family"), fixed=results.get("fixed")) if complete else None
    if default_row is not None and rows:
        best = rows[0]
        comparison.update(
            present=True,
            default_row=default_row,
            best_row=best,
            default_error=1.0 - default_row["test_accuracy"],
            tuned_error=1.0 - best["test_accuracy"],
            reduction=error_reduction(default_row["test_accuracy"], best["test_accuracy"]),
            best_is_default=default_row.get("trial_id") == best.get("trial_id"),
        )
    else:
        comparison.update(present=False, why="not in this run's grid" if complete else "trial list incomplete")
    facts["default"] = comparison
    facts["champion"] = champion_decision(export)
    return facts


def halving_facts(tune: dict[str, Any] | None, results: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A successive-halving run's rungs, slot utilisation and trial-epochs; None for a grid or random search.

    Args:
        tune: the ``tune`` task's result (XCom): its ``halving`` summary comes first.
        results: the tuning job's ``results.json`` (the same summary, when the XCom is missing).

    Returns:
        ``rungs`` (epochs of each rung), ``factor``, ``slots``, ``slot_utilisation`` (0-1 or None),
        ``epochs_trained_this_run``, ``trial_epochs`` (the search's cost, whichever run trained
        them) and ``in_full`` (every configuration trained to the last rung; None when unknown).
    """
    summary = (tune or {}).get("halving") or (results or {}).get("halving")
    if not summary:
        return None
    rungs = list(summary.get("rungs") or [])
    configurations = (tune or {}).get("trials") or len((results or {}).get("trials") or [])
    return {
        "rungs": rungs,
        "factor": summary.get("factor"),
        "slots": summary.get("slots"),
        "slot_utilisation": summary.get("slot_utilisation"),
        "epochs_trained_this_run": summary.get("epochs_trained_this_run"),
        "trial_epochs": summary.get("trial_epochs"),
        "in_full": configurations * rungs[-1] if configurations and rungs else None,
    }


def rung_reached(row: dict[str, Any], halving: dict[str, Any] | None) -> str:
    """The rung a configuration reached, counted from 1 (its row holds the rung's index): ``2/4``, or ``""`` without one."""
    if not isinstance(row.get("rung"), int):
        return ""
    total = len(halving["rungs"]) if halving and halving.get("rungs") else None
    return f"{row['rung'] + 1}/{total}" if total else str(row["rung"] + 1)


def backbone_used(tune: dict[str, Any]) -> dict[str, Any] | None:
    """The backbone of a head-tuning run (the ``tune`` XCom's ``backbone``, ``name@version``) and
    how many images its features were computed for now: ``{name, version, featurized}``; None for
    a from-scratch run."""
    if not tune.get("backbone"):
        return None
    name, _, version = str(tune["backbone"]).rpartition("@")
    featurized = tune.get("featurized")
    return {"name": name, "version": version, "featurized": featurized}


def champion_decision(export: dict[str, Any] | None) -> dict[str, Any] | None:
    """The export step's decision: version, promoted or not, and why."""
    if not export:
        return None
    return {
        "model_name": export.get("model_name"),
        "version": export.get("version"),
        "promoted": bool(export.get("promoted")),
        "reason": export.get("promotion_reason") or "",
        "champion_version": export.get("champion_version"),
        "metrics": export.get("metrics") or {},
        "reused_version": export.get("reused_version"),
        "awaiting_approval": bool(export.get("awaiting_approval")),
    }


def nightly_facts(found: dict[str, Any] | None, result: dict[str, Any] | None) -> dict[str, Any]:
    """A nightly run's counts, reasons, label histogram and model version.

    Args:
        found: the ``find_new_images`` result (date, images listed; a skip reason on an empty night).
        result: the ``publish`` summary or the ``batch_inference`` job's result: both use the job's
            keys (``listed``, ``scored``, ``set_aside``, ``reasons``, ``label_histogram``...).
    """
    found = found or {}
    result = result or {}
    listed = result.get("listed")
    return {
        "date": result.get("date") or found.get("date"),
        "listed": found.get("images") if listed is None else listed,
        "scored": result.get("scored"),
        "set_aside": result.get("set_aside"),
        "reasons": dict(result.get("reasons") or {}),
        "labels": dict(result.get("label_histogram") or {}),
        "model_name": result.get("model_name"),
        "model_version": result.get("model_version"),
        "output_uri": result.get("output_uri"),
        "images_per_second": result.get("images_per_second"),
        "failure_ratio_exceeded": bool(result.get("failure_ratio_exceeded")),
        "skipped_reason": found.get("skipped_reason"),
        "incoming_uri": found.get("incoming_uri"),
    }


def format_percent(fraction: float | None, digits: int = 2) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.{digits}f} %"
