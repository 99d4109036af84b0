"""One tuning trial: train a Keras model for one set of hyperparameters and record everything.

A trial that fails because of its own hyperparameters (loss diverging to NaN, out of memory)
returns a ``failed`` record with the reason instead of raising: Spark would otherwise retry the
task four times and then fail the whole job for one bad grid point.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

from sparktf import executor, storage


def trial_prefix(trials_uri: str, trial_id: str) -> str:
    return storage.join_uri(trials_uri, trial_id)


def train_trial(
    trial: dict[str, Any],
    data: dict[str, Any],
    *,
    family: str,
    epochs: int,
    patience: int,
    trials_uri: str,
    seed: int,
    cpus: int = 1,
    lr_decay_patience: int = 0,
) -> dict[str, Any]:
    """Train, evaluate and save one trial; never raises for the trial's own failures.

    Args:
        trial: ``{"trial_id", "params"}`` from :func:`sparktf.search.build_trials`.
        data: ``x_train, y_train, x_val, y_val, x_test, y_test`` arrays, ``input_shape``, ``num_classes``.
        family: model family name (see :data:`sparktf.models.MODEL_FAMILIES`).
        epochs: maximum epochs; early stopping on validation accuracy may stop sooner.
        patience: epochs without validation improvement before stopping.
        trials_uri: prefix under which ``<trial_id>/model.keras`` and ``metrics.json`` are written.
        seed: random seed for weights and shuffling.
        cpus: threads TensorFlow may use (the task's cores).
        lr_decay_patience: halve the learning rate after this many epochs without validation
            improvement (0 = constant learning rate).

    Returns:
        The trial record (also written to ``<trial_id>/metrics.json``).
    """
    trial_id, params = trial["trial_id"], trial["params"]
    prefix = trial_prefix(trials_uri, trial_id)
    metrics_uri = storage.join_uri(prefix, "metrics.json")
    previous = storage.read_json_if_exists(metrics_uri)
    if previous is not None and previous.get("status") == "ok":
        # A retried task (or a re-run of the same run) reuses the finished trial instead of
        # training it again: trial outputs are idempotent.
        previous["reused"] = True
        return previous

    executor.pin_threads(cpus)
    import keras
    import tensorflow as tf

    from sparktf.models import build_model

    record: dict[str, Any] = {
        "trial_id": trial_id, "params": params, "family": family, "status": "failed", "reason": None,
        "executor": executor.executor_identity(), "epochs_run": 0, "train_seconds": None,
        "max_epochs": epochs, "seed": seed, "lr_decay_patience": lr_decay_patience,
    }
    started = time.perf_counter()
    try:
        keras.utils.set_random_seed(seed)
        hyper = {k: v for k, v in params.items() if k != "batch_size"}
        model = build_model(family, data["input_shape"], data["num_classes"], **hyper)
        callbacks = [
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=patience,
                                          restore_best_weights=True, mode="max"),
        ]
        if lr_decay_patience > 0:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor="val_accuracy", mode="max", factor=0.5, patience=lr_decay_patience,
                min_lr=float(params["learning_rate"]) / 64))
        history = model.fit(
            data["x_train"], data["y_train"], batch_size=int(params["batch_size"]), epochs=epochs,
            validation_data=(data["x_val"], data["y_val"]), callbacks=callbacks, verbose=0, shuffle=True,
        )
        losses = history.history.get("loss", [])
        record["epochs_run"] = len(losses)
        record["history"] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        record["train_seconds"] = round(time.perf_counter() - started, 3)
        if not losses or any(not math.isfinite(v) for v in losses):
            bad_epoch = next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
            record["reason"] = f"diverged: training loss became NaN/inf in epoch {bad_epoch}"
            return _finish(record, metrics_uri)
        val_loss, val_accuracy = model.evaluate(data["x_val"], data["y_val"], batch_size=512, verbose=0)
        test_loss, test_accuracy = model.evaluate(data["x_test"], data["y_test"], batch_size=512, verbose=0)
        if not all(math.isfinite(v) for v in (val_loss, val_accuracy, test_loss, test_accuracy)):
            record["reason"] = "diverged: evaluation produced NaN/inf"
            return _finish(record, metrics_uri)
        record.update(
            status="ok",
            val_loss=float(val_loss), val_accuracy=float(val_accuracy),
            test_loss=float(test_loss), test_accuracy=float(test_accuracy),
            test_error=1.0 - float(test_accuracy),
            num_parameters=int(model.count_params()),
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            with open(path, "rb") as fh:
                blob = fh.read()
        record["model_uri"] = storage.join_uri(prefix, "model.keras")
        record["model_sha256"] = storage.sha256_hex(blob)
        storage.write_bytes(record["model_uri"], blob)
    except (tf.errors.ResourceExhaustedError, MemoryError) as err:
        record["reason"] = f"out_of_memory: {type(err).__name__}: {str(err)[:300]}"
    except Exception as err:  # noqa: BLE001 - recorded, the other trials go on
        record["reason"] = f"error: {type(err).__name__}: {str(err)[:300]}"
    finally:
        record["train_seconds"] = record["train_seconds"] or round(time.perf_counter() - started, 3)
        keras.backend.clear_session()
    return _finish(record, metrics_uri)


def _finish(record: dict[str, Any], metrics_uri: str) -> dict[str, Any]:
    storage.write_json(metrics_uri, record)
    return record


def rank_trials(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Successful trials, best first: by validation accuracy, then validation loss, then id.

    Test metrics are reported but never used to choose.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    return sorted(ok, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["trial_id"]))


def leaderboard(records: list[dict[str, Any]], *, top: int = 5) -> dict[str, Any]:
    """The ranked successful trials (selection by validation accuracy), the failed ones and the best.

    Returns:
        ``{"leaderboard": top rows, "full_leaderboard": every row, "failed": [...], "best": record}``.
    """
    from sparktf.search import dimensions

    ranked = rank_trials(records)
    failed = [r for r in records if r.get("status") != "ok"]
    rows = [
        {"rank": i + 1, "trial_id": r["trial_id"], **{k: r["params"][k] for k in dimensions()},
         "val_accuracy": round(r["val_accuracy"], 5), "test_accuracy": round(r["test_accuracy"], 5),
         "epochs_run": r["epochs_run"], "train_seconds": r["train_seconds"]}
        for i, r in enumerate(ranked)
    ]
    return {"leaderboard": rows[:top], "full_leaderboard": rows,
            "failed": [{"trial_id": r["trial_id"], "params": r["params"], "reason": r["reason"]} for r in failed],
            "best": ranked[0] if ranked else None}
