"""Parallel efficiency of the tune job: the same equal trials as a plain loop, on 1 and on 2 slots.

One set of equal-cost trials (mnist_cnn, same hidden units, batch size and epochs; only the
learning rate differs, it stays constant (``--lr-decay-patience 0``), and early stopping cannot
trigger because patience >= epochs) on a fixed
MNIST subset, run three ways, each in a fresh interpreter (clean TensorFlow thread settings, a
fresh JVM, one SparkSession stopped before the next starts):

* ``loop``: a plain Python loop calling ``sparktf.trials.train_trial`` in one process, TF pinned
  to 1 thread (what one task slot does, without Spark);
* ``spark1``: the tune job's ``run(spark, args)`` (``sparktf.jobs.tune``) in ``local[1]`` (1 task slot);
* ``spark2``: the same in ``local[2]`` (2 task slots).

``T_loop`` is data loading plus the loop; ``T1``/``T2`` are ``tune.run`` (manifest, data
broadcast, trials, figure, results; SparkSession start-up is reported separately). Prints
efficiency = T1 / (2 * T2) (goal >= 0.9) and overhead = T1 / T_loop - 1 (goal <= 10 %), and
each trial's ``train_seconds``. Nothing is asserted: timings on a shared machine are noisy, so
run it more than once and read the load average it prints.

With ``--search-strategy halving`` the tune job runs successive halving instead
(``--halving-min-epochs``, ``--halving-factor``, rungs up to ``--epochs``): ``--trials``
configurations (default 9) whose learning rates are spread geometrically over
:data:`HALVING_LEARNING_RATES` (1e-4 to 1e-2, the ends included; everything else as above), so
the first rungs rank them clearly and promotion means something. Only ``spark1`` and ``spark2``
run: the plain loop has no halving counterpart, so ``T_loop`` and the overhead are "n/a". Per
variant it prints T, the trial-epochs trained and the slot utilisation (busy slot-seconds over
available) from the job's ``halving`` statistics, and where the time outside the trials' timers
goes: outside the rung steps (manifest, broadcast, figure, results), inside the step tasks but
outside their train timer (TensorFlow import, rung records; the timer covers checkpoint load,
fit, evaluation and checkpoint save) and idle slots (Spark's job submission per step, a slot
waiting for a rung to rank, the last rung's single configuration).
Efficiency T1 / (2 * T2) is only comparable when both variants trained the same trial-epochs (it
says so when they did not).

Usage (from the repository root, with the project's venv active: ``source scripts/env.sh``)::

    python bench/bench_tuning_scaling.py                 # 4 trials, 6,000 images, 2 epochs
    python bench/bench_tuning_scaling.py --repeats 2     # two rounds in one run
    python bench/bench_tuning_scaling.py --json-out bench-results/scaling.json
    python bench/bench_tuning_scaling.py --train-images 1000 --epochs 1 --hidden-units 64  # smoke
    python bench/bench_tuning_scaling.py --search-strategy halving --epochs 6   # 9 configurations, rungs 1, 3, 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import _harness  # bench/ is importable: Python puts the running script's folder first on the import path

from sparktf_dev import testing

VALIDATION_FRACTION = 0.1
BUCKET = "sparktf-bench-scaling"
DEFAULT_TRIALS = {"grid": 4, "halving": 9}
HALVING_LEARNING_RATES = (1e-4, 1e-2)  # lowest and highest learning rate of the halving configurations


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="grid: number of equal trials (an even number, default 4); halving: number of configurations (>= the factor, default 9)",
    )
    p.add_argument("--train-images", type=int, default=6000, help="training images per trial (after the split)")
    p.add_argument("--test-images", type=int, default=1000, help="test images (from t10k)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (fixed: patience = epochs)")
    p.add_argument("--hidden-units", type=int, default=1024, help="hidden units of every trial")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of every trial")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (loop, local[1], local[2])")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json-out", default=None, help="also write every measurement to this JSON file")
    p.add_argument(
        "--search-strategy", choices=("grid", "halving"), default="grid", help="the tune job's search: grid (equal trials) or halving (see above)"
    )
    p.add_argument("--halving-min-epochs", type=int, default=1, help="halving: the first rung in epochs")
    p.add_argument("--halving-factor", type=int, default=3, help="halving: only the best 1/factor continue at each rung")
    # Internal: one step in a fresh interpreter.
    p.add_argument("--worker", choices=("prepare", "loop", "spark"), help=argparse.SUPPRESS)
    p.add_argument("--slots", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--input-uri", help=argparse.SUPPRESS)
    p.add_argument("--prepared-uri", help=argparse.SUPPRESS)
    p.add_argument("--output-uri", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.trials is None:
        opts.trials = DEFAULT_TRIALS[opts.search_strategy]
    return opts


def option_problems(opts: argparse.Namespace) -> list[str]:
    """Why these options cannot be benchmarked (empty if fine): checked before anything starts."""
    from sparktf import halving

    if opts.search_strategy == "grid":
        return ["--trials must be even (equal work on 2 slots)"] if opts.trials % 2 else []
    problems = halving.settings_problems(opts.halving_min_epochs, opts.halving_factor, opts.epochs)
    if opts.trials < opts.halving_factor:
        problems.append(f"--trials ({opts.trials}) must be at least --halving-factor ({opts.halving_factor}), or no configuration is ever promoted")
    return problems


def learning_rates(opts: argparse.Namespace) -> str:
    """The trials' learning rates as the tune job takes them.

    grid: 1e-3, 1.1e-3, ... (same cost, close results); halving: geometric from the low to the
    high end of :data:`HALVING_LEARNING_RATES`, so the rungs rank them and cut the poor ones.
    """
    if opts.search_strategy == "grid":
        return ",".join(f"{0.001 * (1 + 0.1 * i):.5f}" for i in range(opts.trials))
    low, high = HALVING_LEARNING_RATES
    steps = max(1, opts.trials - 1)
    return ",".join(f"{low * (high / low) ** (i / steps):.6g}" for i in range(opts.trials))


def tune_args(opts: argparse.Namespace, output_uri: str) -> argparse.Namespace:
    """The tune job's arguments for the trials: learning rates from :func:`learning_rates`,
    constant during training (the job's default halves it on a plateau: switched off here)."""
    from sparktf.jobs import tune

    rates = learning_rates(opts)
    return tune.parse_args(
        [
            "--prepared-uri",
            opts.prepared_uri,
            "--output-uri",
            output_uri,
            "--model-family",
            "mnist_cnn",
            "--learning-rates",
            rates,
            "--hidden-units",
            str(opts.hidden_units),
            "--batch-sizes",
            str(opts.batch_size),
            "--dropouts",
            "0.5",
            "--optimizer",
            "adam",
            "--augment",
            "0",
            "--epochs",
            str(opts.epochs),
            "--patience",
            str(opts.epochs),
            "--lr-decay-patience",
            "0",
            "--seed",
            str(opts.seed),
            *halving_argv(opts),
        ]
    )


def halving_argv(opts: argparse.Namespace) -> list[str]:
    """The halving flags, for the tune job and for the workers (none in grid mode: its command lines stay as they were)."""
    if opts.search_strategy == "grid":
        return []
    return ["--search-strategy", "halving", "--halving-min-epochs", str(opts.halving_min_epochs), "--halving-factor", str(opts.halving_factor)]


def params_key(params: dict) -> str:
    """The key that matches one trial across the loop and the Spark runs: its hyperparameters only.

    Trial ids also cover the run's fingerprint (data manifest, code version: see
    ``sparktf.jobs.tune.trial_fingerprint``), which the plain loop does not build, so ids differ
    between the variants while the hyperparameters are the same.
    """
    from sparktf import search

    return search.trial_id(params)


def trial_rows(records: list[dict]) -> list[dict]:
    return [
        {
            "trial_id": r["trial_id"],
            "params_key": params_key(r["params"]),
            "learning_rate": r["params"]["learning_rate"],
            "status": r["status"],
            "epochs_run": r["epochs_run"],
            "train_seconds": r["train_seconds"],
            "executor": r["executor"].get("executor_id", r["executor"].get("pid")),
            "pid": r["executor"].get("pid"),
            "task_cpus": r["executor"].get("task_cpus"),
        }
        for r in records
    ]


# ---------------------------------------------------------------------------------------------
# Workers (each in its own interpreter)
# ---------------------------------------------------------------------------------------------


def worker_prepare(opts) -> dict:
    spark = testing.local_spark(2, "bench-scaling-prepare", conf=_harness.SPARK_CONF)
    try:
        result = testing.prepare(
            spark, opts.input_uri, opts.prepared_uri, "--seed", str(opts.seed), "--validation-fraction", str(VALIDATION_FRACTION)
        )
    finally:
        spark.stop()
    return result


def worker_loop(opts) -> dict:
    """The baseline: the same trials, one after the other, in this process, TF on 1 thread."""
    from sparktf import dataset, search, storage, trials
    from sparktf.executor import pin_threads

    pin_threads(1)  # before anything starts TensorFlow's thread pools (train_trial does it too)
    args = tune_args(opts, opts.output_uri)
    from sparktf.jobs import tune

    trial_list = search.build_trials(
        tune.search_space(args),
        strategy=args.search_strategy,
        num_samples=args.num_random_trials,
        seed=args.seed,
        fixed={"optimizer": args.optimizer, "augment": args.augment},
    )
    t0 = time.perf_counter()
    data = dataset.load_arrays(args.prepared_uri)
    data_seconds = time.perf_counter() - t0
    trials_uri = storage.join_uri(args.output_uri, "trials")
    records = [
        trials.train_trial(
            trial,
            data,
            family=args.model_family,
            epochs=args.epochs,
            patience=args.patience,
            trials_uri=trials_uri,
            seed=args.seed,
            cpus=1,
            lr_decay_patience=args.lr_decay_patience,
        )
        for trial in trial_list
    ]
    total = time.perf_counter() - t0
    return {"variant": "loop", "seconds": total, "data_seconds": data_seconds, "trials": trial_rows(records), "train_images": len(data["y_train"])}


def worker_spark(opts) -> dict:
    """The tune job's run path (``sparktf.jobs.tune.run``) in ``local[slots]``."""
    from sparktf import storage
    from sparktf.jobs import tune

    t0 = time.perf_counter()
    spark = testing.local_spark(opts.slots, f"bench-scaling-local{opts.slots}", conf=_harness.SPARK_CONF)
    startup = time.perf_counter() - t0
    try:
        args = tune_args(opts, opts.output_uri)
        t0 = time.perf_counter()
        result = tune.run(spark, args)
        seconds = time.perf_counter() - t0
        records = storage.read_json(result["results_uri"])["trials"]
    finally:
        spark.stop()
    out = {
        "variant": f"local[{opts.slots}]",
        "seconds": seconds,
        "session_startup_seconds": startup,
        "trials": trial_rows(records),
        "executors": result["executors"],
    }
    if "halving" in result:
        out["halving"] = result["halving"]  # trial-epochs, slot utilisation, the steps' wall time
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def common_argv(opts) -> list[str]:
    return [
        str(Path(__file__).resolve()),
        "--trials",
        str(opts.trials),
        "--epochs",
        str(opts.epochs),
        "--hidden-units",
        str(opts.hidden_units),
        "--batch-size",
        str(opts.batch_size),
        "--seed",
        str(opts.seed),
        *halving_argv(opts),
    ]


def round_steps(strategy: str) -> list[tuple[str, list[str]]]:
    """The variants of one round and their worker flags: halving has no plain-loop counterpart, so no ``loop``."""
    steps = [("loop", ["--worker", "loop"]), ("spark1", ["--worker", "spark", "--slots", "1"]), ("spark2", ["--worker", "spark", "--slots", "2"])]
    return steps if strategy == "grid" else steps[1:]


def run_round(opts, prepared_uri: str, base: str, index: int) -> dict:
    results = {}
    for name, extra in round_steps(opts.search_strategy):
        load_before = _harness.load_average()
        argv = common_argv(opts) + extra + ["--prepared-uri", prepared_uri, "--output-uri", f"{base}/round{index}/{name}/"]
        results[name] = _harness.run_worker(argv, log_path=_harness.log_file(f"scaling-{os.getpid()}-r{index}-{name}"))
        results[name]["load_before"] = load_before
        results[name]["load_after"] = _harness.load_average()
        print(
            f"  round {index} {name}: {results[name]['seconds']:.1f} s (load average before {load_before}, after {results[name]['load_after']})",
            flush=True,
        )
    return results


VARIANTS = ("loop", "spark1", "spark2")


def matched_trials(res: dict, variants: tuple[str, ...] = VARIANTS, field: str = "train_seconds") -> dict[str, dict]:
    """Each trial's ``field`` in every variant, matched by hyperparameters (:func:`params_key`).

    Returns:
        ``params_key -> {"learning_rate", <variant>: value, ...}`` in the first variant's trial order.

    Raises:
        ValueError: when a variant lacks a trial of the first, or has one the first lacks (the
            variants did not run the same trials: nothing to compare).
    """
    first = variants[0]
    by_key = {name: {t["params_key"]: t for t in res[name]["trials"]} for name in variants}
    for name in variants[1:]:
        if set(by_key[name]) != set(by_key[first]):
            what = "the loop" if first == "loop" else first
            raise ValueError(f"{name} ran other trials than {what}: {sorted(set(by_key[name]) ^ set(by_key[first]))}")
    return {
        key: {"learning_rate": trial["learning_rate"], **{name: by_key[name][key][field] for name in variants}}
        for key, trial in by_key[first].items()
    }


def report_round(index: int, res: dict) -> dict:
    t_loop, t1, t2 = res["loop"]["seconds"], res["spark1"]["seconds"], res["spark2"]["seconds"]
    efficiency = t1 / (2 * t2)
    overhead = t1 / t_loop - 1
    print(f"\nround {index}:")
    print(
        f"  T_loop = {t_loop:7.1f} s  (data load {res['loop']['data_seconds']:.1f} s, "
        f"sum of train_seconds {sum(t['train_seconds'] for t in res['loop']['trials']):.1f} s)"
    )
    for name in ("spark1", "spark2"):
        r = res[name]
        print(
            f"  T{name[-1]}     = {r['seconds']:7.1f} s  ({r['variant']}; sum of train_seconds "
            f"{sum(t['train_seconds'] for t in r['trials']):.1f} s; SparkSession start-up "
            f"{r['session_startup_seconds']:.1f} s, not included; Python workers {sorted({t['pid'] for t in r['trials']})})"
        )
    fixed = {
        name: res[name]["seconds"] - sum(t["train_seconds"] for t in res[name]["trials"]) / (2 if name == "spark2" else 1)
        for name in ("loop", "spark1", "spark2")
    }
    print(
        f"  time outside train_trial's timer (TF import, model save/upload, data load/broadcast, Python workers, "
        f"figure): loop {fixed['loop']:.1f} s, local[1] {fixed['spark1']:.1f} s, local[2] ~{fixed['spark2']:.1f} s"
    )
    print(f"  efficiency = T1 / (2*T2) = {efficiency:.3f}   (goal >= 0.9)")
    print(f"  overhead   = T1 / T_loop - 1 = {100 * overhead:+.1f} %   (goal <= 10 %)")
    print("  per-trial train_seconds:")
    print("    | learning rate | loop | local[1] | local[2] |")
    print("    |---|---|---|---|")
    by_key = matched_trials(res)
    for row in by_key.values():
        print(f"    | {row['learning_rate']:g} | {row['loop']:.1f} | {row['spark1']:.1f} | {row['spark2']:.1f} |")
    statuses = {t["status"] for name in VARIANTS for t in res[name]["trials"]}
    epochs = {t["epochs_run"] for name in VARIANTS for t in res[name]["trials"]}
    print(f"    trial statuses {sorted(statuses)}, epochs run {sorted(epochs)} (all equal: fixed cost)")
    return {"t_loop": t_loop, "t1": t1, "t2": t2, "efficiency": efficiency, "overhead": overhead, "raw": res}


HALVING_VARIANTS = ("spark1", "spark2")


def halving_time_split(r: dict) -> dict[str, float]:
    """Where one halving variant's T goes, in seconds of wall time (they add up to T).

    ``outside_steps``: before and after the rung steps (manifest, data broadcast, figure, results);
    then the steps' wall time split by slot-seconds over the slots: ``training`` (the steps' train
    timer: checkpoint load, fit, evaluate, checkpoint save), ``in_tasks_outside_training`` (TensorFlow
    import, rung records) and ``idle_slots`` (Spark's job submission per step, a slot with nothing
    promotable yet, the last rung's single configuration).
    """
    stats = r["halving"]
    slots, wall = stats["slots"], stats["steps_wall_seconds"]
    train = sum(t["train_seconds"] for t in r["trials"])
    busy = (stats["slot_utilisation"] or 0.0) * slots * wall
    return {
        "outside_steps": r["seconds"] - wall,
        "training": train / slots,
        "in_tasks_outside_training": (busy - train) / slots,
        "idle_slots": (slots * wall - busy) / slots,
    }


def print_halving_variant(name: str, r: dict) -> None:
    stats, split = r["halving"], halving_time_split(r)
    available = stats["slots"] * stats["steps_wall_seconds"]
    print(
        f"  T{name[-1]}     = {r['seconds']:7.1f} s  ({r['variant']}; sum of train_seconds "
        f"{sum(t['train_seconds'] for t in r['trials']):.1f} s; SparkSession start-up "
        f"{r['session_startup_seconds']:.1f} s, not included; Python workers {sorted({t['pid'] for t in r['trials']})})"
    )
    print(
        f"           trial-epochs {stats['trial_epochs']} in {stats['rung_steps']} rung steps; slot utilisation "
        f"{stats['slot_utilisation']} ({(stats['slot_utilisation'] or 0.0) * available:.1f} busy slot-s of {available:.1f} available)"
    )
    print(
        f"           time outside the steps' train timer: outside the rung steps (manifest, data broadcast, figure, results) "
        f"{split['outside_steps']:.1f} s, in the step tasks outside training (TF import, rung records) ~{split['in_tasks_outside_training']:.1f} s, "
        f"idle slots (job submission per step, waiting on a rung) ~{split['idle_slots']:.1f} s; training ~{split['training']:.1f} s"
    )


def report_halving_round(index: int, res: dict) -> dict:
    """:func:`report_round` for ``--search-strategy halving``: spark1 and spark2 only (no plain loop, no overhead)."""
    t1, t2 = res["spark1"]["seconds"], res["spark2"]["seconds"]
    efficiency = t1 / (2 * t2)
    stats = {name: res[name]["halving"] for name in HALVING_VARIANTS}
    print(f"\nround {index} (halving: rungs {stats['spark1']['rungs']} epochs, factor {stats['spark1']['factor']}):")
    print("  T_loop = n/a      (halving has no plain-loop counterpart: not run)")
    for name in HALVING_VARIANTS:
        print_halving_variant(name, res[name])
    print(f"  efficiency = T1 / (2*T2) = {efficiency:.3f}   (goal >= 0.9)")
    print("  overhead   = n/a   (no plain loop)")
    if stats["spark1"]["trial_epochs"] != stats["spark2"]["trial_epochs"]:
        print(
            f"  NOTE: local[1] trained {stats['spark1']['trial_epochs']} trial-epochs, local[2] {stats['spark2']['trial_epochs']}: "
            "the rungs promoted differently, so the efficiency compares unequal work"
        )
    epochs = matched_trials(res, HALVING_VARIANTS, "epochs_run")
    seconds = matched_trials(res, HALVING_VARIANTS)
    print("  per-configuration epochs reached and train_seconds:")
    print("    | learning rate | epochs local[1] | epochs local[2] | local[1] s | local[2] s |")
    print("    |---|---|---|---|---|")
    for key, row in epochs.items():
        print(f"    | {row['learning_rate']:g} | {row['spark1']} | {row['spark2']} | {seconds[key]['spark1']:.1f} | {seconds[key]['spark2']:.1f} |")
    statuses = {t["status"] for name in HALVING_VARIANTS for t in res[name]["trials"]}
    print(f"    trial statuses {sorted(statuses)}")
    return {
        "t_loop": None,
        "t1": t1,
        "t2": t2,
        "efficiency": efficiency,
        "overhead": None,
        **{f"utilisation{name[-1]}": stats[name]["slot_utilisation"] for name in HALVING_VARIANTS},
        **{f"trial_epochs{name[-1]}": stats[name]["trial_epochs"] for name in HALVING_VARIANTS},
        "raw": res,
    }


def summary_keys(strategy: str) -> tuple[str, ...]:
    """The figures the "all rounds" table shows (halving has no ``t_loop`` or overhead)."""
    return ("t_loop", "t1", "t2", "efficiency", "overhead") if strategy == "grid" else ("t1", "t2", "efficiency", "utilisation1", "utilisation2")


def print_header(opts) -> None:
    print(f"machine: {_harness.machine()}; load average at start: {_harness.load_average()}", flush=True)
    if opts.search_strategy == "grid":
        print(
            f"trials: {opts.trials} x mnist_cnn (hidden {opts.hidden_units}, batch {opts.batch_size}, "
            f"{opts.epochs} epochs, patience {opts.epochs}: no early stop), ~{opts.train_images} training images",
            flush=True,
        )
        return
    from sparktf import halving

    print(
        f"halving: {opts.trials} configurations of mnist_cnn (hidden {opts.hidden_units}, batch {opts.batch_size}, learning rates "
        f"{learning_rates(opts)}), rungs {halving.rung_epochs(opts.halving_min_epochs, opts.halving_factor, opts.epochs)} epochs, "
        f"factor {opts.halving_factor}, ~{opts.train_images} training images; no plain loop",
        flush=True,
    )


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.worker:
        handler = {"prepare": worker_prepare, "loop": worker_loop, "spark": worker_spark}[opts.worker]
        _harness.emit_result(handler(opts))
        return 0
    problems = option_problems(opts)
    if problems:
        sys.exit("; ".join(problems))
    started = time.perf_counter()
    print_header(opts)
    report = report_round if opts.search_strategy == "grid" else report_halving_round
    summaries = []
    mnist = testing.read_mnist(_harness.check_mnist())
    with testing.S3Server(log_path=_harness.log_file("scaling-moto")):
        from sparktf import storage

        storage.create_bucket(BUCKET)
        base = f"s3://{BUCKET}/scaling"
        train_limit = round(opts.train_images / (1 - VALIDATION_FRACTION))
        testing.upload_mnist(f"{base}/raw/", mnist, train_limit=train_limit, test_limit=opts.test_images)
        del mnist
        prepared = _harness.run_worker(
            [*common_argv(opts), "--worker", "prepare", "--input-uri", f"{base}/raw/", "--prepared-uri", f"{base}/prepared/"],
            log_path=_harness.log_file(f"scaling-{os.getpid()}-prepare"),
        )
        print(f"prepared: {prepared['counts']}", flush=True)
        for index in range(1, opts.repeats + 1):
            summaries.append(report(index, run_round(opts, prepared["prepared_uri"], base, index)))
    if len(summaries) > 1:
        print("\nall rounds:")
        for key in summary_keys(opts.search_strategy):
            values = [s[key] for s in summaries]
            print(f"  {key:10s} " + "  ".join(f"{v:.3f}" for v in values) + f"   median {statistics.median(values):.3f}")
    if opts.json_out:
        _harness.write_json(opts.json_out, {"options": vars(opts), "rounds": summaries})
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; load average at end: {_harness.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
