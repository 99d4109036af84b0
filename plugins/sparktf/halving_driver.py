"""The driver side of successive halving: keep every Spark task slot busy with rung steps.

Each rung step (:func:`sparktf.rungs.train_rung`) is a one-task Spark job, submitted from a pool of
driver threads, one per task slot. Whenever a step finishes, the scheduler (:func:`sparktf.halving.next_step`)
hands its slot the next promotable configuration or a new one, so no slot waits for a rung to
fill while work remains. Before the first step, the rung records already published with this
run's fingerprint are read back: a cleared or retried run resumes each configuration from its last
completed rung and trains no epoch twice.

Slot utilisation is busy slot-seconds (each step task's own duration) over available slot-seconds
(slots x the wall time of the steps), in the job's summary (XCom) and ``results.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from sparktf import executor, features, halving, rungs, storage, trials

log = logging.getLogger("sparktf.halving")
# Test-only: name -> callable(**info) ("after_step": the driver got a step's record), to cut a run
# after a given number of steps deterministically (a cleared run then resumes). Never set elsewhere.
TEST_HOOKS: dict[str, Callable[..., None]] = {}


def halving_fingerprint(fingerprint: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The trial fingerprint plus the rung settings (a rung's checkpoint depends on where the cuts fall)."""
    return {**fingerprint, "search": "halving", "halving_min_epochs": args.halving_min_epochs, "halving_factor": args.halving_factor}


def task_slots(sc, max_parallel: int = 0) -> int:
    """Concurrent tasks the cluster runs (cores / ``spark.task.cpus``), capped by ``max_parallel`` when > 0."""
    slots = max(1, sc.defaultParallelism // max(1, int(sc.getConf().get("spark.task.cpus", "1"))))
    return min(slots, max_parallel) if max_parallel > 0 else slots


def published_steps(trial_list: list[dict], context: dict[str, Any]) -> list[dict[str, Any]]:
    """The rung records an earlier run (or an earlier attempt of this job) already published and this run may reuse."""
    found = []
    for trial in trial_list:
        for rung, epochs in enumerate(context["rungs"]):
            record = storage.read_json_if_exists(rungs.record_uri(context["trials_uri"], trial["trial_id"], epochs))
            if not rungs.reusable(record, context["fingerprint"], context["job_id"]):
                break  # a rung above a missing one cannot be reused (it was trained from another checkpoint)
            found.append({**record, "reused": True, "epochs_trained": 0, "task_seconds": 0.0, "rung": rung})
    return found


def step_runner(spark, data_source, context: dict[str, Any]):
    """A function that runs one rung step as a one-task Spark job and returns its record (blocking)."""
    sc = spark.sparkContext

    def run_step(step: dict[str, Any]) -> dict[str, Any]:
        data = features.task_data(data_source)
        return rungs.train_rung(step, data, context=context, cpus=executor.task_cpus())

    def submit(step: dict[str, Any]) -> dict[str, Any]:
        sc.setJobDescription(f"halving: {step['trial_id']} to {context['rungs'][step['rung']]} epochs")
        return sc.parallelize([step], 1).map(run_step).collect()[0]

    return submit


def progress_line(record: dict[str, Any], done: int, num_rungs: int) -> None:
    """One line per finished rung step: which configuration, the rung it reached, its validation accuracy."""
    params = record["params"]
    outcome = f"val_accuracy {record['val_accuracy']:.4f}" if record["status"] == "ok" else f"failed: {record['reason']}"
    log.info(
        "tuning progress: step %d: %s (lr %g, hidden %s) reached rung %d of %d (%d epochs)%s: %s",
        done,
        record["trial_id"],
        params["learning_rate"],
        params["hidden_units"],
        record["rung"] + 1,
        num_rungs,
        record["epochs"],
        ", reused" if record.get("reused") else "",
        outcome,
    )


def schedule(trial_list: list[dict], records: list[dict], submit, *, slots: int, context: dict[str, Any]) -> list[dict]:
    """Fill ``slots`` with steps until the rule has nothing left; returns the records of the steps run here."""
    by_id = {t["trial_id"]: t for t in trial_list}
    config_ids = [t["trial_id"] for t in trial_list]
    factor, num_rungs = context["factor"], len(context["rungs"])
    new: list[dict] = []
    running: dict[Any, tuple[str, int]] = {}
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="halving-slot") as pool:
        try:
            while True:
                while len(running) < slots and (
                    step := halving.next_step(config_ids, records + new, running.values(), num_rungs=num_rungs, factor=factor)
                ):
                    config_id, rung = step
                    running[pool.submit(submit, {"trial_id": config_id, "params": by_id[config_id]["params"], "rung": rung})] = step
                if not running:
                    return new
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    record = future.result()
                    new.append(record)
                    hook = TEST_HOOKS.get("after_step")
                    if hook is not None:
                        hook(record=record, done=len(new))
                    progress_line(record, len(new), num_rungs)
        except BaseException:
            for future in running:
                future.cancel()
            raise


def run_halving(
    spark, args: argparse.Namespace, trial_list: list[dict], *, data_source, trials_uri: str, fingerprint: dict[str, Any]
) -> tuple[list[dict], dict[str, Any]]:
    """Run successive halving over ``trial_list``; returns one trial-like record per configuration and the run's halving summary."""
    sc = spark.sparkContext
    context = {
        "family": args.model_family,
        "rungs": halving.rung_epochs(args.halving_min_epochs, args.halving_factor, args.epochs),
        "factor": args.halving_factor,
        "trials_uri": trials_uri,
        "seed": args.seed,
        "fingerprint": halving_fingerprint(fingerprint, args),
        "job_id": f"{sc.applicationId}-{uuid.uuid4().hex[:8]}",
    }
    reused = published_steps(trial_list, context)
    slots = task_slots(sc, args.max_parallel_trials)
    log.info(
        "halving: %d configurations, rungs %s epochs, factor %d, %d slots, %d rung steps reused",
        len(trial_list),
        context["rungs"],
        context["factor"],
        slots,
        len(reused),
    )
    started = time.perf_counter()
    new = schedule(trial_list, reused, step_runner(spark, data_source, context), slots=slots, context=context)
    wall = time.perf_counter() - started
    steps = reused + new
    stats = {
        "rungs": context["rungs"],
        "factor": context["factor"],
        "slots": slots,
        "rung_steps": len(new),
        "rung_steps_reused": len(reused) + sum(1 for r in new if r.get("reused")),
        "trial_epochs": halving.search_epochs(steps),
        "epochs_trained_this_run": sum(r["epochs_trained"] for r in new),
        "slot_utilisation": halving.utilisation([r["task_seconds"] for r in new], slots, wall),
        "steps_wall_seconds": round(wall, 2),
    }
    return config_records(trial_list, steps), stats


def config_records(trial_list: list[dict], steps: list[dict]) -> list[dict]:
    """One record per configuration, at the highest rung it reached, shaped like a trial record (for the leaderboard, figure and export)."""
    highest = halving.highest_rungs(steps)
    records = []
    for trial in trial_list:
        top = highest[trial["trial_id"]]
        mine = [s for s in steps if s["config_id"] == trial["trial_id"]]
        record = {
            **top,
            "epochs_run": top["epochs"] if top["status"] == "ok" else top["from_epochs"],
            "train_seconds": round(sum(s.get("train_seconds") or 0.0 for s in mine), 3),
            "rung_history": [
                {k: s.get(k) for k in ("rung", "epochs", "status", "val_accuracy", "reused")} for s in sorted(mine, key=lambda s: s["rung"])
            ],
        }
        if top["status"] == "ok":
            record.update(model_uri=top["checkpoint_uri"], model_sha256=top["checkpoint_sha256"])
        records.append(record)
    return records


def leaderboard(records: list[dict], *, top: int = 5) -> dict[str, Any]:
    """:func:`sparktf.trials.leaderboard` ranked by rung reached first, then validation accuracy: the best is chosen at the highest rung."""
    summary = trials.leaderboard(records, top=len(records))
    rung_of = {r["trial_id"]: r["rung"] for r in records}
    rows = sorted(summary["full_leaderboard"], key=lambda row: (-rung_of[row["trial_id"]], row["rank"]))
    rows = [{**row, "rank": i + 1, "rung": rung_of[row["trial_id"]]} for i, row in enumerate(rows)]
    by_id = {r["trial_id"]: r for r in records}
    failed = [{**f, "rung": rung_of[f["trial_id"]]} for f in summary["failed"]]
    return {"leaderboard": rows[:top], "full_leaderboard": rows, "failed": failed, "best": by_id[rows[0]["trial_id"]] if rows else None}
