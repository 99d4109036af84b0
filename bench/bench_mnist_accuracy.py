"""Accuracy on full MNIST: the reference network, the DAG's default Params, and a hand-tuned grid.

Prepares MNIST with the prepare_data job (``sparktf.jobs.prepare_data``: 60k training images ->
stratified train/validation split, the official 10k t10k images as the test set), then runs the
tune job (``sparktf.jobs.tune``) in one local SparkSession for each of these runs (``--runs``):

* ``dag-defaults`` ("DAG defaults"): the tune job with no knob flags at all, i.e. the knob
  table's defaults, which are also the tuning DAG's default Params (``tests/jobs/test_knobs.py``
  checks that the DAG's rendered defaults parse to the job's), followed by the export_model job
  into a fresh registry: what the weekly run does with an untouched Trigger form. It runs first
  and alone, since its wall time (prepare + tune + export) is measured against a two-hour budget;
* ``default``: the reference recipe's configuration alone (mnist_cnn, 1024 hidden units, learning rate 1e-3,
  dropout 0.5, batch 128, adam, no augmentation, constant learning rate, early stopping on
  validation accuracy): the baseline of the error reduction;
* ``tuned-grid``: a hand-picked grid of the reference network (learning rates x hidden units with
  augmentation, more epochs and more patience, ``--lr-decay-patience``).

After ``dag-defaults``, the other runs go at the same time (the default's single task is
submitted first; the grid's tasks fill the other slot and then every slot), so no slot idles;
``--sequential`` runs them one after the other. Selection is by validation accuracy; the test
accuracy reported is the selected trial's. Prints a table (run, test accuracy, test error, wall
time), each grid, and the error reduction of each run over the reference recipe's default, and saves each
grid's figure (test error vs learning rate) and the full results under ``--out-dir``.

Commands are run from the repository root with the project's venv active
(``source scripts/env.sh``). DAG defaults and the reference recipe's default (about 1-1.5 hours on 2 cores)::

    mkdir -p bench-results
    nohup python bench/bench_mnist_accuracy.py --out-dir bench-results/mnist \\
        > bench-results/bench_mnist.log 2>&1 &

The hand-tuned grid of run C in BENCHMARKS.md: add ``--runs default,tuned-grid --hidden-units
1024,2048 --learning-rates 0.001,0.002 --epochs 30 --patience 5 --lr-decay-patience 1``.

Smoke run (a few minutes)::

    python bench/bench_mnist_accuracy.py --train-limit 1500 --test-limit 300 --epochs 1 \\
        --default-epochs 1 --dag-defaults-args='--epochs 1 --hidden-units 32' --runs dag-defaults,default,tuned-grid \\
        --hidden-units 32,64 --learning-rates 0.001,0.002 --out-dir bench-results/mnist-smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import _harness  # bench/ is importable: Python puts the running script's folder first on the import path

from sparktf_dev import testing

BUCKET = "sparktf-bench-mnist"


RUNS = {"dag-defaults": "DAG defaults", "default": "default", "tuned-grid": "tuned grid"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="dag-defaults,default", help=f"comma-separated runs among {', '.join(RUNS)} (default: dag-defaults,default)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N of the 60k training images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N of the 10k test images")
    p.add_argument("--slots", type=int, default=2, help="Spark task slots (local[N])")
    p.add_argument("--dag-defaults-args", default="", help="extra tune flags for dag-defaults (smoke runs only: the figures are for none)")
    p.add_argument("--learning-rates", default="0.0005,0.001,0.002", help="tuned grid: learning rates")
    p.add_argument("--hidden-units", default="512,1024", help="tuned grid: hidden units")
    p.add_argument("--augment", type=float, default=0.1, help="tuned grid: random shift fraction")
    p.add_argument("--epochs", type=int, default=14, help="tuned grid: maximum epochs")
    p.add_argument("--patience", type=int, default=3, help="tuned grid: early-stopping patience")
    p.add_argument(
        "--lr-decay-patience", type=int, default=0, help="tuned grid: halve the learning rate after N epochs without improvement (0 = off)"
    )
    p.add_argument("--default-epochs", type=int, default=12, help="default config: maximum epochs")
    p.add_argument("--default-patience", type=int, default=2, help="default config: early-stopping patience")
    p.add_argument("--seed", type=int, default=42, help="split, weights and shuffling seed")
    p.add_argument("--sequential", action="store_true", help="run the default job, then the grid")
    p.add_argument(
        "--out-dir",
        default=str(_harness.RESULTS_DIR / "mnist"),
        help="local folder for figure and results (default: bench-results/mnist in the repository)",
    )
    opts = p.parse_args(argv)
    opts.run_keys = [key.strip() for key in opts.runs.split(",") if key.strip()]
    unknown = [key for key in opts.run_keys if key not in RUNS]
    if unknown or not opts.run_keys:
        p.error(f"--runs: unknown {unknown}; choose among {', '.join(RUNS)}")
    return opts


def seed_args(
    prepared_uri: str,
    output_uri: str,
    *,
    epochs: int,
    patience: int,
    seed: int,
    learning_rates: str = "0.001",
    hidden_units: str = "1024",
    augment: float = 0.0,
    lr_decay_patience: int = 0,
) -> argparse.Namespace:
    """The tune job's arguments for the reference network (mnist_cnn, dropout 0.5, batch 128, adam);
    by default its own configuration (learning rate 1e-3, 1024 hidden units, no augmentation)."""
    from sparktf.jobs import tune

    return tune.parse_args(
        [
            "--prepared-uri",
            prepared_uri,
            "--output-uri",
            output_uri,
            "--model-family",
            "mnist_cnn",
            "--learning-rates",
            learning_rates,
            "--hidden-units",
            hidden_units,
            "--batch-sizes",
            "128",
            "--dropouts",
            "0.5",
            "--optimizer",
            "adam",
            "--augment",
            str(augment),
            "--epochs",
            str(epochs),
            "--patience",
            str(patience),
            "--seed",
            str(seed),
            "--lr-decay-patience",
            str(lr_decay_patience),
        ]
    )


def job_arguments(opts: argparse.Namespace, prepared_uri: str, base: str) -> dict[str, argparse.Namespace]:
    """Each selected run's tune-job arguments, by run key."""
    from sparktf.jobs import tune

    every = {
        # No knob flag: the job's defaults are the knob table's, which the DAG's Params render.
        "dag-defaults": lambda: tune.parse_args(
            ["--prepared-uri", prepared_uri, "--output-uri", f"{base}/dag-defaults/", *opts.dag_defaults_args.split()]
        ),
        "default": lambda: seed_args(
            prepared_uri,
            f"{base}/default/",
            epochs=opts.default_epochs,
            patience=opts.default_patience,
            seed=opts.seed,
        ),
        "tuned-grid": lambda: seed_args(
            prepared_uri,
            f"{base}/grid/",
            learning_rates=opts.learning_rates,
            hidden_units=opts.hidden_units,
            augment=opts.augment,
            epochs=opts.epochs,
            patience=opts.patience,
            seed=opts.seed,
            lr_decay_patience=opts.lr_decay_patience,
        ),
    }
    return {key: every[key]() for key in opts.run_keys}


def export_best(results_uri: str, models_uri: str) -> dict:
    """The export_model job as the DAG runs it, into a fresh registry (so the best trial is promoted)."""
    from sparktf.jobs import export_model

    args = export_model.parse_args(
        [
            "--results-uri",
            results_uri,
            "--models-uri",
            models_uri,
            "--model-name",
            "digits",
            "--source-run",
            "bench_mnist_accuracy",
            "--trained-at",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ]
    )
    return export_model.run(args)


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.makedirs(opts.out_dir, exist_ok=True)
    started = time.perf_counter()
    print(f"machine: {_harness.machine()}; load average at start: {_harness.load_average()}; runs: {', '.join(opts.run_keys)}", flush=True)
    mnist = testing.read_mnist(_harness.check_mnist())
    with testing.S3Server(log_path=_harness.log_file("mnist-moto")):
        from sparktf import storage
        from sparktf.jobs import tune

        storage.create_bucket(BUCKET)
        base = f"s3://{BUCKET}/mnist-accuracy"
        uploaded = testing.upload_mnist(f"{base}/raw/", mnist, train_limit=opts.train_limit, test_limit=opts.test_limit)
        del mnist
        print(f"uploaded MNIST IDX: {uploaded}", flush=True)
        spark = testing.local_spark(opts.slots, "bench-mnist-accuracy", conf=_harness.SPARK_CONF)
        try:
            t0 = time.perf_counter()
            prepared = testing.prepare(spark, f"{base}/raw/", f"{base}/prepared/", "--seed", str(opts.seed))
            prepare_seconds = time.perf_counter() - t0
            print(f"prepared {prepared['counts']} in {prepare_seconds:.1f} s", flush=True)

            jobs = job_arguments(opts, prepared["prepared_uri"], base)
            results, walls, errors, exported = {}, {}, {}, {}

            def run_job(key: str) -> None:
                t = time.perf_counter()
                try:
                    results[key] = tune.run(spark, jobs[key])
                    if key == "dag-defaults":
                        exported[key] = export_best(results[key]["results_uri"], f"{base}/dag-defaults-models/")
                except BaseException as err:  # noqa: BLE001 - reported by the main thread
                    errors[key] = err
                walls[key] = time.perf_counter() - t
                print(f"[{time.strftime('%H:%M:%S')}] {RUNS[key]}: done in {walls[key]:.0f} s (load average {_harness.load_average()})", flush=True)

            t0 = time.perf_counter()
            rest = [key for key in jobs if key != "dag-defaults"]
            if "dag-defaults" in jobs:
                run_job("dag-defaults")  # alone: its wall time is measured against the two-hour budget
            if opts.sequential or len(rest) < 2:
                for key in rest:
                    run_job(key)
            else:
                threads = [threading.Thread(target=run_job, args=(key,), name=key) for key in rest]
                threads[0].start()
                # Let the default's one task take a slot first; the grid then fills the others.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not spark.sparkContext.statusTracker().getActiveStageIds():
                    time.sleep(0.5)
                time.sleep(2)
                for thread in threads[1:]:
                    thread.start()
                for thread in threads:
                    thread.join()
            tuning_seconds = time.perf_counter() - t0
            if errors:
                raise RuntimeError(f"tune failed: {errors}")

            full = {key: storage.read_json(res["results_uri"]) for key, res in results.items()}
            figures = {key: storage.read_bytes(res["figure_uri"]) for key, res in results.items() if len(full[key]["trials"]) > 1}
        finally:
            spark.stop()

    figure_paths = {}
    for key, figure in figures.items():
        figure_paths[key] = os.path.join(opts.out_dir, f"{key}_error_vs_learning_rate.png")
        with open(figure_paths[key], "wb") as fh:
            fh.write(figure)
    _harness.write_json(
        os.path.join(opts.out_dir, "results.json"),
        {
            "options": vars(opts),
            "prepared": prepared,
            "prepare_seconds": prepare_seconds,
            "walls": walls,
            "tuning_seconds": tuning_seconds,
            "exported": exported,
            "results": full,
        },
    )
    report(opts, prepared, prepare_seconds, full, walls, exported, tuning_seconds, time.perf_counter() - started, figure_paths)
    return 0


def describe_run(res: dict) -> str:
    fixed, fingerprint = res.get("fixed") or {}, res.get("fingerprint") or {}
    return (
        f"{res.get('model_family')}, augment {fixed.get('augment', 0):g}, max {res['epochs']} epochs, "
        f"patience {fingerprint.get('patience')}, lr decay patience {fingerprint.get('lr_decay_patience', 0)}"
    )


def report(opts, prepared, prepare_seconds, full, walls, exported, tuning_seconds, total_seconds, figure_paths) -> None:
    counts = prepared["counts"]
    print()
    print(
        f"data: train {counts['train']}, validation {counts['validation']}, test {counts['test']} "
        f"(prepare_data {prepare_seconds:.0f} s); slots: local[{opts.slots}]; "
        f"after DAG defaults (alone), "
        f"{'one after the other' if opts.sequential or len(full) - ('dag-defaults' in full) < 2 else 'concurrent'}"
    )
    print()
    print("| run | settings | trials | selected (by val acc) | epochs run | val acc | test acc | test error | trial train s | job wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, res in full.items():
        best = next(t for t in res["trials"] if t["trial_id"] == res["best_trial_id"])
        p = best["params"]
        label = f"lr {p['learning_rate']:g}, hidden {p['hidden_units']}"
        print(
            f"| {RUNS[key]} | {describe_run(res)} | {len(res['trials'])} | {label} | {best['epochs_run']} "
            f"| {best['val_accuracy']:.4f} | {best['test_accuracy']:.4f} | {100 * best['test_error']:.2f}% "
            f"| {best['train_seconds']:.0f} | {walls[key]:.0f} |"
        )
    print()
    for key, res in full.items():
        if len(res["trials"]) < 2:
            continue
        print(f"{RUNS[key]} ({describe_run(res)}):")
        print("| learning rate | hidden units | status | epochs run | val acc | test acc | test error | train s |")
        print("|---|---|---|---|---|---|---|---|")
        for t in sorted(res["trials"], key=lambda t: (t["params"]["hidden_units"], t["params"]["learning_rate"])):
            p = t["params"]
            if t["status"] == "ok":
                selected = " (selected)" if t["trial_id"] == res["best_trial_id"] else ""
                print(
                    f"| {p['learning_rate']:g} | {p['hidden_units']} | ok{selected} | {t['epochs_run']} "
                    f"| {t['val_accuracy']:.4f} | {t['test_accuracy']:.4f} | {100 * t['test_error']:.2f}% "
                    f"| {t['train_seconds']:.0f} |"
                )
            else:
                print(f"| {p['learning_rate']:g} | {p['hidden_units']} | failed: {t['reason']} | | | | | |")
        print()
    if "default" in full:
        seed = full["default"]
        seed_best = next(t for t in seed["trials"] if t["trial_id"] == seed["best_trial_id"])
        for key, res in full.items():
            if key == "default":
                continue
            best = next(t for t in res["trials"] if t["trial_id"] == res["best_trial_id"])
            reduction = (seed_best["test_error"] - best["test_error"]) / seed_best["test_error"]
            print(
                f"{RUNS[key]} vs the reference recipe's default: test error {100 * seed_best['test_error']:.2f}% -> "
                f"{100 * best['test_error']:.2f}%: {100 * reduction:.0f}% less error"
            )
    if "dag-defaults" in exported:
        export = exported["dag-defaults"]
        print(
            f"DAG defaults: prepare {prepare_seconds:.0f} s + tune and export {walls['dag-defaults']:.0f} s = "
            f"{prepare_seconds + walls['dag-defaults']:.0f} s (budget 7200 s); exported version "
            f"{export.get('version')}, promoted {export.get('promoted')}"
        )
    print(f"wall time of the runs {tuning_seconds:.0f} s; total wall time {total_seconds:.0f} s; load average at end: {_harness.load_average()}")
    print(f"figures: {figure_paths}; results: {os.path.join(opts.out_dir, 'results.json')}")


if __name__ == "__main__":
    sys.exit(main())
