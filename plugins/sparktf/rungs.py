"""One rung step of successive halving: train a configuration from its last rung's checkpoint to the next rung.

A step is one Spark task. It loads the configuration's checkpoint of the rung below (weights and
optimizer state, a ``.keras`` file: no step trains from scratch except the first), trains the epochs
between the two rungs, evaluates, saves its own checkpoint and publishes the rung's record. Layout
next to the trial's records (:mod:`sparktf.trials`), under ``<trials-uri>/<trial id>/rungs/<epochs>/``::

    attempts/<attempt id>/started.json     written before training (which job, executor, when)
    attempts/<attempt id>/checkpoint.keras this attempt's checkpoint: no other attempt writes this key
    attempts/<attempt id>/metrics.json     this attempt's record
    metrics.json                           the rung's record, published last, naming the checkpoint and its sha256

A published record with this run's fingerprint is reused (a retried task, a cleared run): the
step trains nothing, so no epoch is trained twice. ``failed`` records (NaN loss, out of memory,
a worker that crashed twice: :func:`sparktf.trials.crash_verdict`) are reused only within their job.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
from typing import Any

from sparktf import executor, storage, trials

log = logging.getLogger("sparktf.rungs")


def rung_key(trial_id: str, epochs: int) -> str:
    """The rung's folder below the trials' prefix, used where :mod:`sparktf.trials` takes a trial id."""
    return f"{trial_id}/rungs/{epochs:04d}"


def record_uri(trials_uri: str, trial_id: str, epochs: int) -> str:
    return storage.join_uri(trials_uri, rung_key(trial_id, epochs), trials.RECORD_NAME)


def reusable(record: dict[str, Any] | None, fingerprint: dict[str, Any], job_id: str | None) -> bool:
    """A published rung record this run may use instead of training (see the module's rule)."""
    if record is None or record.get("fingerprint") != fingerprint:
        return False
    if record.get("status") == "ok":
        try:
            return storage.sha256_hex(storage.read_bytes(record["checkpoint_uri"])) == record["checkpoint_sha256"]
        except (storage.ObjectNotFound, KeyError):
            return False
    return bool(job_id) and record.get("job_id") == job_id


def train_rung(step: dict[str, Any], data: dict[str, Any], *, context: dict[str, Any], cpus: int = 1) -> dict[str, Any]:
    """Train one configuration from the rung below to ``step["rung"]``; never raises for the trial's own failures.

    Args:
        step: ``{"trial_id", "params", "rung"}`` (rung: index into ``context["rungs"]``).
        data: the prepared arrays (:func:`sparktf.dataset.load_arrays`).
        context: ``{"family", "rungs" (epochs per rung), "trials_uri", "seed", "fingerprint", "job_id"}``.
        cpus: threads TensorFlow may use.

    Returns:
        The rung record (``reused`` when it was published before; ``epochs_trained`` 0 then).
    """
    started = time.perf_counter()
    trial_id, rung, rungs = step["trial_id"], step["rung"], context["rungs"]
    uri = record_uri(context["trials_uri"], trial_id, rungs[rung])
    previous = storage.read_json_if_exists(uri)
    if reusable(previous, context["fingerprint"], context["job_id"]):
        return {**previous, "reused": True, "epochs_trained": 0, "task_seconds": round(time.perf_counter() - started, 3)}
    identity = executor.executor_identity()
    record = base_record(step, context, identity)
    key = rung_key(trial_id, rungs[rung])
    if record["attempt"] > 0 and context["job_id"]:
        dead = trials.crashed_attempts(context["trials_uri"], key, context["job_id"], identity)
        if dead is not None:
            record = {**trials.crash_record(record, dead), "epochs_trained": 0, "val_accuracy": None}
            return publish(record, context["trials_uri"], uri, started)
    storage.write_json(
        storage.join_uri(context["trials_uri"], key, "attempts", record["attempt_id"], trials.STARTED_NAME),
        {k: record[k] for k in ("trial_id", "attempt_id", "attempt", "job_id", "executor")} | {"started_at": time.time()},
    )
    try:
        _fit_step(record, data, context, cpus=cpus)
        return publish(record, context["trials_uri"], uri, started)
    except Exception as err:
        trials.mark_raised(context["trials_uri"], {**record, "trial_id": key}, err)
        raise


def base_record(step: dict[str, Any], context: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """A new attempt's record before training: ``failed`` with no reason until it ends."""
    rung, rungs = step["rung"], context["rungs"]
    attempt = int(identity.get("attempt", 0))
    return {
        "trial_id": step["trial_id"],
        "config_id": step["trial_id"],
        "params": step["params"],
        "family": context["family"],
        "rung": rung,
        "epochs": rungs[rung],
        "from_epochs": rungs[rung - 1] if rung else 0,
        "epochs_trained": 0,
        "fingerprint": context["fingerprint"],
        "job_id": context["job_id"],
        "executor": identity,
        "attempt": attempt,
        "attempt_id": f"{attempt}-{uuid.uuid4().hex[:12]}",
        "status": "failed",
        "reason": None,
        "val_accuracy": None,
    }


def _start_model(record: dict[str, Any], data: dict[str, Any], context: dict[str, Any]):
    """The rung below's checkpoint (weights and optimizer state), or a new model at the first rung."""
    import keras

    from sparktf.models import build_model, model_hyperparameters

    if record["rung"] == 0:
        keras.utils.set_random_seed(context["seed"])
        return build_model(record["family"], data["input_shape"], data["num_classes"], **model_hyperparameters(record["params"]))
    below = storage.read_json(record_uri(context["trials_uri"], record["trial_id"], record["from_epochs"]))
    blob = storage.read_bytes(below["checkpoint_uri"])
    if storage.sha256_hex(blob) != below["checkpoint_sha256"]:
        raise storage.StorageError(f"{below['checkpoint_uri']}: checkpoint does not match its record's sha256")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.keras")
        with open(path, "wb") as fh:
            fh.write(blob)
        model = keras.models.load_model(path)
    keras.utils.set_random_seed(context["seed"] + record["rung"])  # this step's shuffling, the same on a retry
    return model


def _fit_step(record: dict[str, Any], data: dict[str, Any], context: dict[str, Any], *, cpus: int) -> None:
    """Train the epochs between the rungs, evaluate and save the checkpoint; the trial's own failures go in ``record``."""
    executor.pin_threads(cpus)
    import keras
    import tensorflow as tf

    started = time.perf_counter()
    try:
        model = _start_model(record, data, context)
        # The test switch of trials, matched against the rung's folder too ("<trial id>/rungs/<epochs>").
        trials.crash_if_asked(rung_key(record["trial_id"], record["epochs"]), record["params"])
        history = model.fit(
            data["x_train"],
            data["y_train"],
            batch_size=int(record["params"]["batch_size"]),
            initial_epoch=record["from_epochs"],
            epochs=record["epochs"],
            validation_data=(data["x_val"], data["y_val"]),
            callbacks=[keras.callbacks.TerminateOnNaN()],
            verbose=0,
            shuffle=True,
        )
        losses = history.history.get("loss", [])
        record["epochs_trained"] = len(losses)
        record["history"] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        if len(losses) < record["epochs"] - record["from_epochs"] or any(not math.isfinite(v) for v in losses):
            record["reason"] = "diverged: training loss became NaN/inf"
            return
        metrics = trials.evaluate(model, data)
        if metrics is None:
            record["reason"] = "diverged: evaluation produced NaN/inf"
            return
        checkpoint_uri = storage.join_uri(
            context["trials_uri"], rung_key(record["trial_id"], record["epochs"]), "attempts", record["attempt_id"], "checkpoint.keras"
        )
        record.update(status="ok", **metrics, checkpoint_uri=checkpoint_uri, checkpoint_sha256=trials.save_model(model, checkpoint_uri))
    except (tf.errors.ResourceExhaustedError, MemoryError) as err:
        record["reason"] = f"out_of_memory: {type(err).__name__}: {str(err)[:300]}"
    except Exception as err:
        if trials.is_storage_error(err):
            raise
        record["reason"] = f"error: {type(err).__name__}: {str(err)[:300]}"
    finally:
        record["train_seconds"] = round(time.perf_counter() - started, 3)
        keras.backend.clear_session()


def publish(record: dict[str, Any], trials_uri: str, uri: str, started: float) -> dict[str, Any]:
    """The attempt's own record, then the rung's (last: it names the checkpoint and its sha256)."""
    record["task_seconds"] = round(time.perf_counter() - started, 3)
    key = rung_key(record["trial_id"], record["epochs"])
    storage.write_json(storage.join_uri(trials_uri, key, "attempts", record["attempt_id"], trials.RECORD_NAME), record)
    storage.write_json(uri, record)
    if record["status"] != "ok":
        log.warning("%s rung %d (%d epochs): %s", record["trial_id"], record["rung"], record["epochs"], record["reason"])
    return record
