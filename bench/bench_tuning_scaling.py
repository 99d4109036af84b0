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

Usage (from the repository root, with the project's venv active: ``source scripts/env.sh``)::

    python bench/bench_tuning_scaling.py                 # 4 trials, 6,000 images, 2 epochs
    python bench/bench_tuning_scaling.py --repeats 2     # two rounds in one run
    python bench/bench_tuning_scaling.py --json-out bench-results/scaling.json
    python bench/bench_tuning_scaling.py --train-images 1000 --epochs 1 --hidden-units 64  # smoke
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=4, help="number of equal trials (an even number)")
    p.add_argument("--train-images", type=int, default=6000, help="training images per trial (after the split)")
    p.add_argument("--test-images", type=int, default=1000, help="test images (from t10k)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (fixed: patience = epochs)")
    p.add_argument("--hidden-units", type=int, default=1024, help="hidden units of every trial")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of every trial")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (loop, local[1], local[2])")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json-out", default=None, help="also write every measurement to this JSON file")
    # Internal: one step in a fresh interpreter.
    p.add_argument("--worker", choices=("prepare", "loop", "spark"), help=argparse.SUPPRESS)
    p.add_argument("--slots", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--input-uri", help=argparse.SUPPRESS)
    p.add_argument("--prepared-uri", help=argparse.SUPPRESS)
    p.add_argument("--output-uri", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def tune_args(opts: argparse.Namespace, output_uri: str) -> argparse.Namespace:
    """The tune job's arguments for the equal trials: learning rates 1e-3, 1.1e-3, ... (same cost),
    constant during training (the job's default halves it on a plateau: switched off here)."""
    from sparktf.jobs import tune

    rates = ",".join(f"{0.001 * (1 + 0.1 * i):.5f}" for i in range(opts.trials))
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
        ]
    )


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
    return {
        "variant": f"local[{opts.slots}]",
        "seconds": seconds,
        "session_startup_seconds": startup,
        "trials": trial_rows(records),
        "executors": result["executors"],
    }


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
    ]


def run_round(opts, prepared_uri: str, base: str, index: int) -> dict:
    results = {}
    steps = [("loop", ["--worker", "loop"]), ("spark1", ["--worker", "spark", "--slots", "1"]), ("spark2", ["--worker", "spark", "--slots", "2"])]
    for name, extra in steps:
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


def matched_trials(res: dict) -> dict[str, dict]:
    """Each trial's ``train_seconds`` in every variant, matched by hyperparameters (:func:`params_key`).

    Returns:
        ``params_key -> {"learning_rate", "loop", "spark1", "spark2"}`` in the loop's trial order.

    Raises:
        ValueError: when a variant lacks a trial of the loop, or has one the loop lacks (the
            variants did not run the same trials: nothing to compare).
    """
    by_key = {name: {t["params_key"]: t for t in res[name]["trials"]} for name in VARIANTS}
    for name in VARIANTS[1:]:
        if set(by_key[name]) != set(by_key["loop"]):
            raise ValueError(f"{name} ran other trials than the loop: {sorted(set(by_key[name]) ^ set(by_key['loop']))}")
    return {
        key: {"learning_rate": trial["learning_rate"], **{name: by_key[name][key]["train_seconds"] for name in VARIANTS}}
        for key, trial in by_key["loop"].items()
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


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.worker:
        handler = {"prepare": worker_prepare, "loop": worker_loop, "spark": worker_spark}[opts.worker]
        _harness.emit_result(handler(opts))
        return 0
    if opts.trials % 2:
        sys.exit("--trials must be even (equal work on 2 slots)")
    started = time.perf_counter()
    print(f"machine: {_harness.machine()}; load average at start: {_harness.load_average()}", flush=True)
    print(
        f"trials: {opts.trials} x mnist_cnn (hidden {opts.hidden_units}, batch {opts.batch_size}, "
        f"{opts.epochs} epochs, patience {opts.epochs}: no early stop), ~{opts.train_images} training images",
        flush=True,
    )
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
            summaries.append(report_round(index, run_round(opts, prepared["prepared_uri"], base, index)))
    if len(summaries) > 1:
        print("\nall rounds:")
        for key in ("t_loop", "t1", "t2", "efficiency", "overhead"):
            values = [s[key] for s in summaries]
            print(f"  {key:10s} " + "  ".join(f"{v:.3f}" for v in values) + f"   median {statistics.median(values):.3f}")
    if opts.json_out:
        _harness.write_json(opts.json_out, {"options": vars(opts), "rounds": summaries})
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; load average at end: {_harness.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
