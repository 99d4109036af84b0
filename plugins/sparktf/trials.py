"""One tuning trial: train a Keras model for one set of hyperparameters and record everything.

A trial that fails because of its own hyperparameters (loss diverging to NaN, out of memory)
returns a ``failed`` record with the reason instead of raising: Spark would otherwise retry the
task and then fail the whole job for one bad grid point. Anything else that goes wrong (a storage
error that outlived its retries while saving the model or publishing the record, a bug) is no
verdict on the trial: the attempt raises, and Spark retries the task.

Layout under ``<trials-uri>/<trial id>/``::

    attempts/<attempt id>/started.json   written before training: which job, executor, when
    attempts/<attempt id>/model.keras    this attempt's model: no other attempt writes this key
    attempts/<attempt id>/metrics.json   this attempt's record (present = the attempt finished)
    attempts/<attempt id>/raised.json    the attempt raised (the error): best effort, see below
    metrics.json                         the trial's record, published last, naming the model
                                         file and the sha256 it belongs to

An attempt id is unique per process and Spark task attempt, so a zombie or speculative attempt
of the same trial writes its own files and can never leave ``metrics.json`` naming a sha256 the
stored model does not have. A published record is reused only when its fingerprint is this
run's and its model file still has the recorded sha256 (else the trial is trained again).

**Raised or killed.** An attempt ends in one of three ways: it finishes (its record), it raises,
or its Python worker is killed (the OOM killer, a segfault) and writes nothing more. An attempt
that raises first writes a note on its machine's local disk (``<tmp>/sparktf-attempts/<job>/<trial>/``,
which does not depend on the store), then ``raised.json`` in the store, best effort: when the store
is what failed, that write may fail too. A retried task counts an earlier attempt of this job as
**killed** only when it started and there is no evidence that it ended otherwise: no record, no
``raised.json``, and no local note on this machine. So an attempt that raised is never taken for
a kill on its own machine, even when the store lost its marker; an attempt on another machine
whose marker the store lost is counted as killed, which alone never gives a verdict (below).

**Crashes.** If one killed attempt ran on this same executor (the executor survived, so its
Python worker crashed), or two were killed anywhere, the trial is recorded as ``failed`` with
reason ``crashed: ...`` instead of being trained again; a single attempt lost with another
executor (a lost node) is trained again. (A false verdict would take two attempts on other
machines raising while the store also refused both markers; the record lists the attempts, and a
later run tries the trial again, since failed records are reused only within their job.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from sparktf import executor, knobs, registry, storage

log = logging.getLogger("sparktf.trials")

RECORD_NAME = "metrics.json"
STARTED_NAME = "started.json"
RAISED_NAME = "raised.json"
# Test-only: a trial whose id, or whose params as sorted JSON, contains this variable's value
# SIGKILLs its own process before training, as the OOM killer would. Never set it elsewhere.
CRASH_TEST_ENV = "SPARKTF_TEST_CRASH_TRIAL"
# Test-only: name -> callable(**info) ("before_publish": the attempt's model and own record are
# written, the trial's record not yet), to interleave a duplicate attempt deterministically.
TEST_HOOKS: dict[str, Callable[..., None]] = {}


def _hook(point: str, **info: Any) -> None:
    hook = TEST_HOOKS.get(point)
    if hook is not None:
        hook(**info)


def trial_prefix(trials_uri: str, trial_id: str) -> str:
    return storage.join_uri(trials_uri, trial_id)


def attempt_uri(trials_uri: str, trial_id: str, attempt_id: str, name: str) -> str:
    return storage.join_uri(trials_uri, trial_id, "attempts", attempt_id, name)


def attempt_history(trials_uri: str, trial_id: str, s3=None) -> list[dict[str, Any]]:
    """Every attempt of a trial: ``{"attempt_id", "started": marker or None, "finished": bool, "raised": bool}``."""
    prefix = storage.join_uri(trials_uri, trial_id, "attempts") + "/"
    prefix_key = storage.parse_uri(prefix).key
    names: dict[str, set[str]] = {}
    for key in storage.list_keys(prefix, s3):
        attempt_id, _, name = key[len(prefix_key) :].partition("/")
        names.setdefault(attempt_id, set()).add(name)
    history = []
    for attempt_id, files in sorted(names.items()):
        started = storage.read_json_if_exists(attempt_uri(trials_uri, trial_id, attempt_id, STARTED_NAME), s3) if STARTED_NAME in files else None
        history.append({"attempt_id": attempt_id, "started": started, "finished": RECORD_NAME in files, "raised": RAISED_NAME in files})
    return history


def default_fingerprint(*, family: str, epochs: int, patience: int, lr_decay_patience: int, seed: int) -> dict[str, Any]:
    """What :func:`train_trial` itself knows changes a result (the tuning job adds the data's
    manifest hash and the code version: :func:`sparktf.jobs.tune.trial_fingerprint`)."""
    return {"model_family": family, "epochs": epochs, "patience": patience, "lr_decay_patience": lr_decay_patience, "seed": seed}


def stale_because(record: dict[str, Any], fingerprint: dict[str, Any], job_id: str | None) -> str | None:
    """Why a published record cannot be reused (None: reuse it).

    ``ok`` records are reused when their fingerprint matches and their model file still has the
    recorded sha256; ``failed`` ones only within the job that recorded them (a task re-run after
    its executor was lost), so a later run tries them again.
    """
    if record.get("fingerprint") != fingerprint:
        return "its fingerprint differs from this run's (other data, settings or code)"
    if record.get("status") == "ok":
        try:
            registry.verify_artifact(record["model_uri"], record["model_sha256"])
        except (registry.ModelNotFound, registry.ModelIntegrityError, KeyError) as err:
            return f"its model file does not match the record ({err})"
        return None
    if job_id and record.get("job_id") == job_id:
        return None
    return "it failed in an earlier run"


def is_storage_error(err: BaseException) -> bool:
    """True for the storage layer's errors and botocore's own (a refusal the retries do not cover).

    They say nothing about a trial's hyperparameters: the attempt raises and Spark retries it.
    """
    if isinstance(err, storage.StorageError):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(err, (BotoCoreError, ClientError))


def _executor_of(identity: dict[str, Any]) -> tuple[Any, Any]:
    return identity.get("host"), identity.get("executor_id")


def killed_attempts(history: list[dict[str, Any]], job_id: str, raised_here: set[str]) -> list[dict[str, Any]]:
    """The started markers of this job's attempts that started and neither finished nor raised.

    Args:
        history: :func:`attempt_history`.
        job_id: this run of the tuning job (earlier runs' attempts are not counted).
        raised_here: ids of attempts this machine's local notes say raised (:func:`raised_here`):
            they count as raised even when the store lost their marker.
    """
    return [
        a["started"]
        for a in history
        if a["started"] is not None
        and a["started"].get("job_id") == job_id
        and not a["finished"]
        and not a.get("raised")
        and a["attempt_id"] not in raised_here
    ]


def crash_verdict(killed: list[dict[str, Any]], identity: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``killed`` when it means the trial crashes its worker (one died on this executor, or two
    anywhere), else None: a single attempt lost with another executor is trained again."""
    on_this_executor = [k for k in killed if _executor_of(k["executor"]) == _executor_of(identity)]
    return killed if on_this_executor or len(killed) >= 2 else None


def crash_record(base: dict[str, Any], dead: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``failed`` record of a trial whose earlier attempts were killed (``dead``: their markers)."""
    numbers = sorted(int(d.get("attempt", 0)) for d in dead)
    label = f"attempt {numbers[0]}" if len(numbers) == 1 else f"attempts {', '.join(map(str, numbers))}"
    return {
        **base,
        "status": "failed",
        "epochs_run": 0,
        "train_seconds": None,
        "reason": f"crashed: the Python worker died during training ({label})",
        "crashed_attempts": dead,
    }


def local_notes_dir(job_id: str | None, trial_id: str) -> str:
    """This machine's folder of "attempt raised" notes for one trial of one job."""

    def safe(value: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]", "_", value)

    return os.path.join(tempfile.gettempdir(), "sparktf-attempts", safe(str(job_id)), safe(trial_id))


def raised_here(job_id: str | None, trial_id: str) -> set[str]:
    """Ids of this trial's attempts that this machine's local notes say raised."""
    try:
        names = os.listdir(local_notes_dir(job_id, trial_id))
    except OSError:
        return set()
    return {name[: -len(".json")] for name in names if name.endswith(".json")}


def crashed_attempts(trials_uri: str, trial_id: str, job_id: str, identity: dict[str, Any]) -> list[dict] | None:
    """This job's earlier attempts that were killed, when they mean a crash (see the module's rule)."""
    history = attempt_history(trials_uri, trial_id)
    return crash_verdict(killed_attempts(history, job_id, raised_here(job_id, trial_id)), identity)


def mark_raised(trials_uri: str, record: dict[str, Any], err: BaseException) -> None:
    """Say that this attempt raised: a local note (never depends on the store), then the store's
    marker, best effort (the store may be what failed; the error being raised is the one to report)."""
    trial_id, attempt_id = record["trial_id"], record["attempt_id"]
    note = {
        "trial_id": trial_id,
        "attempt_id": attempt_id,
        "attempt": record["attempt"],
        "job_id": record["job_id"],
        "executor": record["executor"],
        "error": f"{type(err).__name__}: {str(err)[:300]}",
        "raised_at": time.time(),
    }
    try:
        folder = local_notes_dir(record["job_id"], trial_id)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{attempt_id}.json"), "w") as fh:
            json.dump(note, fh, default=str)
    except OSError as note_err:
        log.warning("%s: could not write the local note of attempt %s: %s", trial_id, attempt_id, note_err)
    try:
        storage.write_json(attempt_uri(trials_uri, trial_id, attempt_id, RAISED_NAME), note)
    except Exception as marker_err:  # noqa: BLE001 - best effort, see the docstring
        log.warning("%s: attempt %s raised %s and its marker could not be stored either (%s)", trial_id, attempt_id, type(err).__name__, marker_err)


def crash_if_asked(trial_id: str, params: dict[str, Any]) -> None:
    """Test-only (see :data:`CRASH_TEST_ENV`): die like a process the OOM killer took."""
    pattern = os.environ.get(CRASH_TEST_ENV)
    if pattern and (pattern in trial_id or pattern in json.dumps(params, sort_keys=True)):
        os.kill(os.getpid(), signal.SIGKILL)


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
    fingerprint: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate and save one trial; never raises for the trial's own failures.

    Storage errors (and any other error that is not the trial's own) raise, after marking the
    attempt as raised (see the module's rule): Spark retries the task, which trains it again.

    Args:
        trial: ``{"trial_id", "params"}`` from :func:`sparktf.search.build_trials`.
        data: ``x_train, y_train, x_val, y_val, x_test, y_test`` arrays, ``input_shape``, ``num_classes``.
        family: model family name (see :data:`sparktf.models.MODEL_FAMILIES`).
        epochs: maximum epochs; early stopping on validation accuracy may stop sooner.
        patience: epochs without validation improvement before stopping.
        trials_uri: prefix under which ``<trial_id>/...`` is written (see the module's layout).
        seed: random seed for weights and shuffling.
        cpus: threads TensorFlow may use (the task's cores).
        lr_decay_patience: halve the learning rate after this many epochs without validation
            improvement (0 = constant learning rate).
        fingerprint: everything besides ``params`` that changes the result (recorded; a
            published record with another fingerprint is not reused). Default:
            :func:`default_fingerprint`.
        job_id: unique id of this run of the tuning job: its attempts' markers carry it, so a
            retried task can tell this job's crashed attempts from an earlier run's.

    Returns:
        The trial record (also published as ``<trial_id>/metrics.json``).
    """
    trial_id = trial["trial_id"]
    fingerprint = fingerprint or default_fingerprint(family=family, epochs=epochs, patience=patience, lr_decay_patience=lr_decay_patience, seed=seed)
    record_uri = storage.join_uri(trial_prefix(trials_uri, trial_id), RECORD_NAME)
    reusable, etag, retrained_because = published_record(record_uri, fingerprint, job_id)
    if reusable is not None:
        return {**reusable, "reused": True}  # a retried task (or a re-run of the same run) reuses the finished trial
    identity = executor.executor_identity()
    base = attempt_base(trial, family=family, fingerprint=fingerprint, job_id=job_id, identity=identity)
    if job_id and base["attempt"] > 0:
        dead = crashed_attempts(trials_uri, trial_id, job_id, identity)
        if dead is not None:
            return _publish_crash(crash_record(base, dead), record_uri, etag)
    record = attempt_record(
        base,
        f"{base['attempt']}-{uuid.uuid4().hex[:12]}",
        epochs=epochs,
        seed=seed,
        lr_decay_patience=lr_decay_patience,
        retrained_because=retrained_because,
    )
    return _run_attempt(record, data, trials_uri, patience=patience, cpus=cpus)


def published_record(record_uri: str, fingerprint: dict[str, Any], job_id: str | None) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """The trial's published record if it may be reused, its ETag, and why it is trained again otherwise.

    Returns:
        ``(record or None, etag or None, reason or None)``: a record only when :func:`stale_because`
        finds nothing against it; a reason only when a published record exists but is stale.
    """
    previous, etag = storage.read_json_with_etag(record_uri)
    retrained_because = None if previous is None else stale_because(previous, fingerprint, job_id)
    if previous is not None and retrained_because is None:
        return previous, etag, None
    if retrained_because:
        log.info("%s: training again: %s", record_uri, retrained_because)
    return None, etag, retrained_because


def attempt_base(trial: dict[str, Any], *, family: str, fingerprint: dict[str, Any], job_id: str | None, identity: dict[str, Any]) -> dict[str, Any]:
    """The fields every record of this attempt starts from: the trial, what it was trained under, where and which attempt."""
    return {
        "trial_id": trial["trial_id"],
        "params": trial["params"],
        "family": family,
        "fingerprint": fingerprint,
        "job_id": job_id,
        "executor": identity,
        "attempt": int(identity.get("attempt", 0)),
    }


def attempt_record(
    base: dict[str, Any], attempt_id: str, *, epochs: int, seed: int, lr_decay_patience: int, retrained_because: str | None
) -> dict[str, Any]:
    """A new attempt's record before training: ``failed`` with no reason until it ends."""
    record: dict[str, Any] = {
        **base,
        "attempt_id": attempt_id,
        "status": "failed",
        "reason": None,
        "epochs_run": 0,
        "train_seconds": None,
        "max_epochs": epochs,
        "seed": seed,
        "lr_decay_patience": lr_decay_patience,
    }
    if retrained_because:
        record["retrained_because"] = retrained_because
    return record


def _run_attempt(record: dict[str, Any], data: dict[str, Any], trials_uri: str, *, patience: int, cpus: int) -> dict[str, Any]:
    """Mark the attempt started, train, save and publish; mark it raised if anything raises."""
    storage.write_json(
        attempt_uri(trials_uri, record["trial_id"], record["attempt_id"], STARTED_NAME),
        {
            "trial_id": record["trial_id"],
            "attempt_id": record["attempt_id"],
            "attempt": record["attempt"],
            "job_id": record["job_id"],
            "executor": record["executor"],
            "started_at": time.time(),
        },
    )
    try:
        executor.pin_threads(cpus)
        import keras

        try:
            outcome = _fit_and_evaluate(record, data, patience=patience)
            if outcome is not None:
                model, metrics = outcome
                model_uri = attempt_uri(trials_uri, record["trial_id"], record["attempt_id"], "model.keras")
                record.update(status="ok", **metrics, model_uri=model_uri, model_sha256=save_model(model, model_uri))
        finally:
            keras.backend.clear_session()
        return _publish(record, trials_uri)
    except Exception as err:
        mark_raised(trials_uri, record, err)
        raise


def evaluate(model, data: dict[str, Any]) -> dict[str, float] | None:
    """Validation (selection) and test (reported only) metrics of a trained model, or None when one is not finite."""
    val_loss, val_accuracy = model.evaluate(data["x_val"], data["y_val"], batch_size=512, verbose=0)
    test_loss, test_accuracy = model.evaluate(data["x_test"], data["y_test"], batch_size=512, verbose=0)
    if not all(math.isfinite(v) for v in (val_loss, val_accuracy, test_loss, test_accuracy)):
        return None
    return {
        "val_loss": float(val_loss),
        "val_accuracy": float(val_accuracy),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "test_error": 1.0 - float(test_accuracy),
        "num_parameters": int(model.count_params()),
    }


def _callbacks(params: dict[str, Any], *, patience: int, lr_decay_patience: int) -> list:
    import keras

    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=patience, restore_best_weights=True, mode="max"),
    ]
    if lr_decay_patience > 0:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_accuracy", mode="max", factor=0.5, patience=lr_decay_patience, min_lr=float(params["learning_rate"]) / 64
            )
        )
    return callbacks


def _fit_and_evaluate(record: dict[str, Any], data: dict[str, Any], *, patience: int) -> tuple[Any, dict] | None:
    """Build, fit and evaluate the trial's model: ``(model, metrics)``, or None when the trial failed
    for its own reasons (diverged, out of memory, refused hyperparameters: the reason is in ``record``).

    Storage errors are never such a reason: they raise.
    """
    import keras
    import tensorflow as tf

    from sparktf.models import build_model, model_hyperparameters

    params, epochs = record["params"], record["max_epochs"]
    started = time.perf_counter()
    try:
        keras.utils.set_random_seed(record["seed"])
        model = build_model(record["family"], data["input_shape"], data["num_classes"], **model_hyperparameters(params))
        callbacks = _callbacks(params, patience=patience, lr_decay_patience=record["lr_decay_patience"])
        crash_if_asked(record["trial_id"], params)
        history = model.fit(
            data["x_train"],
            data["y_train"],
            batch_size=int(params["batch_size"]),
            epochs=epochs,
            validation_data=(data["x_val"], data["y_val"]),
            callbacks=callbacks,
            verbose=0,
            shuffle=True,
        )
        losses = history.history.get("loss", [])
        record["epochs_run"] = len(losses)
        record["history"] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        record["train_seconds"] = round(time.perf_counter() - started, 3)
        if not losses or any(not math.isfinite(v) for v in losses):
            bad_epoch = next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
            record["reason"] = f"diverged: training loss became NaN/inf in epoch {bad_epoch}"
            return None
        metrics = evaluate(model, data)
        if metrics is None:
            record["reason"] = "diverged: evaluation produced NaN/inf"
            return None
        if params.get("fine_tune_layers"):  # a last phase through the partly unfrozen backbone, on the images
            from sparktf import finetune

            return finetune.fine_tune(
                model, data, record, frozen=metrics, callbacks=_callbacks(params, patience=patience, lr_decay_patience=record["lr_decay_patience"])
            )
        return model, metrics
    except (tf.errors.ResourceExhaustedError, MemoryError) as err:
        record["reason"] = f"out_of_memory: {type(err).__name__}: {str(err)[:300]}"
    except Exception as err:
        if is_storage_error(err):
            raise
        record["reason"] = f"error: {type(err).__name__}: {str(err)[:300]}"  # recorded, the other trials go on
    finally:
        record["train_seconds"] = record["train_seconds"] or round(time.perf_counter() - started, 3)
    return None


def save_model(model, model_uri: str) -> str:
    """Save the model as ``.keras`` to ``model_uri``; returns its sha256 (storage errors raise)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as fh:
            blob = fh.read()
    storage.write_bytes(model_uri, blob)
    return storage.sha256_hex(blob)


def _publish(record: dict[str, Any], trials_uri: str) -> dict[str, Any]:
    """The attempt's own record, then the trial's (last: it names the model file and its sha256)."""
    storage.write_json(attempt_uri(trials_uri, record["trial_id"], record["attempt_id"], RECORD_NAME), record)
    _hook("before_publish", record=record)
    storage.write_json(storage.join_uri(trial_prefix(trials_uri, record["trial_id"]), RECORD_NAME), record)
    shutil.rmtree(local_notes_dir(record["job_id"], record["trial_id"]), ignore_errors=True)  # the trial has its record
    return record


def _publish_crash(record: dict[str, Any], record_uri: str, etag: str | None) -> dict[str, Any]:
    """Publish a crash record unless another attempt published a record meanwhile (then use it)."""
    try:
        storage.write_json(record_uri, record, if_match=etag, if_none_match=etag is None)
    except storage.PreconditionFailed:
        published = storage.read_json(record_uri)
        published["reused"] = True
        return published
    log.warning("%s: %s", record["trial_id"], record["reason"])
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
    ranked = rank_trials(records)
    failed = [r for r in records if r.get("status") != "ok"]
    rows = [
        {
            "rank": i + 1,
            "trial_id": r["trial_id"],
            **{k: r["params"][k] for k in knobs.search_dimensions(r["params"])},
            "val_accuracy": round(r["val_accuracy"], 5),
            "test_accuracy": round(r["test_accuracy"], 5),
            "epochs_run": r["epochs_run"],
            "train_seconds": r["train_seconds"],
        }
        for i, r in enumerate(ranked)
    ]
    return {
        "leaderboard": rows[:top],
        "full_leaderboard": rows,
        "failed": [{"trial_id": r["trial_id"], "params": r["params"], "reason": r["reason"]} for r in failed],
        "best": ranked[0] if ranked else None,
    }
