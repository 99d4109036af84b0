"""Accuracy on full MNIST: the seed's default network against a tuned grid, through the tune job.

Prepares MNIST with the prepare_data job (``sparktf.jobs.prepare_data``: 60k training images ->
stratified train/validation split, the official 10k t10k images as the test set), then runs the
tune job (``sparktf.jobs.tune``) twice in one local SparkSession:

* ``default``: the seed's configuration alone (mnist_cnn, 1024 hidden units, learning rate 1e-3,
  dropout 0.5, batch 128, adam, no augmentation, early stopping on validation accuracy);
* ``tuned grid``: learning rates x hidden units with augmentation (random shifts/rotations),
  more epochs and more patience.

By default both jobs run at the same time (the default's single task is submitted first; the
grid's tasks fill the other slot and then every slot), so no slot idles; ``--sequential`` runs
them one after the other. Selection is by validation accuracy; the test accuracy reported is the
selected trial's. Prints a table (config, test accuracy, test error, wall time) and the grid, and
saves the figure (test error vs learning rate) and the full results under ``--out-dir``.

Commands are run from the repository root with the project's venv active
(``source scripts/env.sh``). Full run (about an hour or more on 2 cores)::

    mkdir -p bench-results
    nohup nice -n 10 python bench/bench_mnist_accuracy.py --out-dir bench-results/mnist \\
        > bench-results/bench_mnist.log 2>&1 &

Smoke run (a minute or two)::

    python bench/bench_mnist_accuracy.py --train-limit 1500 --test-limit 300 --epochs 1 \\
        --default-epochs 1 --hidden-units 32,64 --learning-rates 0.001,0.002 --out-dir bench-results/mnist-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import _harness  # bench/ is importable: Python puts the running script's folder first on the import path

from sparktf import testing

BUCKET = "sparktf-bench-mnist"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-limit", type=int, default=None, help="use the first N of the 60k training images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N of the 10k test images")
    p.add_argument("--slots", type=int, default=2, help="Spark task slots (local[N])")
    p.add_argument("--learning-rates", default="0.0005,0.001,0.002", help="tuned grid: learning rates")
    p.add_argument("--hidden-units", default="512,1024", help="tuned grid: hidden units")
    p.add_argument("--augment", type=float, default=0.1, help="tuned grid: random shift fraction")
    p.add_argument("--epochs", type=int, default=14, help="tuned grid: maximum epochs")
    p.add_argument("--patience", type=int, default=3, help="tuned grid: early-stopping patience")
    p.add_argument("--lr-decay-patience", type=int, default=0,
                   help="tuned grid: halve the learning rate after N epochs without improvement (0 = off)")
    p.add_argument("--default-epochs", type=int, default=12, help="default config: maximum epochs")
    p.add_argument("--default-patience", type=int, default=2, help="default config: early-stopping patience")
    p.add_argument("--seed", type=int, default=42, help="split, weights and shuffling seed")
    p.add_argument("--sequential", action="store_true", help="run the default job, then the grid")
    p.add_argument("--out-dir", default=str(_harness.RESULTS_DIR / "mnist"),
                   help="local folder for figure and results (default: bench-results/mnist in the repository)")
    return p.parse_args(argv)


def tune_args(prepared_uri: str, output_uri: str, *, learning_rates: str, hidden_units: str, augment: float,
              epochs: int, patience: int, seed: int, lr_decay_patience: int = 0) -> argparse.Namespace:
    from sparktf.jobs import tune

    return tune.parse_args([
        "--prepared-uri", prepared_uri, "--output-uri", output_uri, "--model-family", "mnist_cnn",
        "--learning-rates", learning_rates, "--hidden-units", hidden_units, "--batch-sizes", "128",
        "--dropouts", "0.5", "--optimizer", "adam", "--augment", str(augment), "--epochs", str(epochs),
        "--patience", str(patience), "--seed", str(seed), "--lr-decay-patience", str(lr_decay_patience),
    ])


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.makedirs(opts.out_dir, exist_ok=True)
    started = time.perf_counter()
    print(f"machine: {_harness.machine()}; load average at start: {_harness.load_average()}", flush=True)
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

            jobs = {
                "default": tune_args(prepared["prepared_uri"], f"{base}/default/", learning_rates="0.001",
                                     hidden_units="1024", augment=0.0, epochs=opts.default_epochs,
                                     patience=opts.default_patience, seed=opts.seed),
                "tuned grid": tune_args(prepared["prepared_uri"], f"{base}/grid/", learning_rates=opts.learning_rates,
                                        hidden_units=opts.hidden_units, augment=opts.augment, epochs=opts.epochs,
                                        patience=opts.patience, seed=opts.seed,
                                        lr_decay_patience=opts.lr_decay_patience),
            }
            results, walls, errors = {}, {}, {}

            def run_job(name: str) -> None:
                t = time.perf_counter()
                try:
                    results[name] = tune.run(spark, jobs[name])
                except BaseException as err:  # noqa: BLE001 - reported by the main thread
                    errors[name] = err
                walls[name] = time.perf_counter() - t
                print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {walls[name]:.0f} s "
                      f"(load average {_harness.load_average()})", flush=True)

            t0 = time.perf_counter()
            if opts.sequential:
                for name in jobs:
                    run_job(name)
            else:
                threads = [threading.Thread(target=run_job, args=(name,), name=name) for name in jobs]
                threads[0].start()
                # Let the default's one task take a slot first; the grid then fills the others.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not spark.sparkContext.statusTracker().getActiveStageIds():
                    time.sleep(0.5)
                time.sleep(2)
                threads[1].start()
                for thread in threads:
                    thread.join()
            tuning_seconds = time.perf_counter() - t0
            if errors:
                raise RuntimeError(f"tune failed: {errors}")

            full = {name: storage.read_json(res["results_uri"]) for name, res in results.items()}
            figure = storage.read_bytes(results["tuned grid"]["figure_uri"])
        finally:
            spark.stop()

    figure_path = os.path.join(opts.out_dir, "error_vs_learning_rate.png")
    with open(figure_path, "wb") as fh:
        fh.write(figure)
    with open(os.path.join(opts.out_dir, "results.json"), "w") as fh:
        json.dump({"options": vars(opts), "prepared": prepared, "prepare_seconds": prepare_seconds,
                   "walls": walls, "tuning_seconds": tuning_seconds, "results": full}, fh, indent=2, default=str)
    report(opts, prepared, prepare_seconds, full, walls, tuning_seconds, time.perf_counter() - started, figure_path)
    return 0


def report(opts, prepared, prepare_seconds, full, walls, tuning_seconds, total_seconds, figure_path) -> None:
    counts = prepared["counts"]
    print()
    print(f"data: train {counts['train']}, validation {counts['validation']}, test {counts['test']} "
          f"(prepare_data {prepare_seconds:.0f} s); slots: local[{opts.slots}]; "
          f"jobs {'one after the other' if opts.sequential else 'concurrent'}")
    print()
    print("| config | trials | selected (by val acc) | epochs run | val acc | test acc | test error "
          "| trial train s | job wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, res in full.items():
        best = next(t for t in res["trials"] if t["trial_id"] == res["best_trial_id"])
        p = best["params"]
        label = (f"lr {p['learning_rate']:g}, hidden {p['hidden_units']}, augment {p['augment']:g}, "
                 f"max {res['epochs']} epochs")
        print(f"| {name} | {len(res['trials'])} | {label} | {best['epochs_run']} | {best['val_accuracy']:.4f} "
              f"| {best['test_accuracy']:.4f} | {100 * best['test_error']:.2f}% | {best['train_seconds']:.0f} "
              f"| {walls[name]:.0f} |")
    print()
    grid = full["tuned grid"]
    print(f"tuned grid (augment {opts.augment:g}, max {opts.epochs} epochs, patience {opts.patience}, "
          f"lr decay patience {opts.lr_decay_patience}):")
    print("| learning rate | hidden units | status | epochs run | val acc | test acc | test error | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for t in sorted(grid["trials"], key=lambda t: (t["params"]["hidden_units"], t["params"]["learning_rate"])):
        p = t["params"]
        if t["status"] == "ok":
            print(f"| {p['learning_rate']:g} | {p['hidden_units']} | ok{' (selected)' if t['trial_id'] == grid['best_trial_id'] else ''} "
                  f"| {t['epochs_run']} | {t['val_accuracy']:.4f} | {t['test_accuracy']:.4f} "
                  f"| {100 * t['test_error']:.2f}% | {t['train_seconds']:.0f} |")
        else:
            print(f"| {p['learning_rate']:g} | {p['hidden_units']} | failed: {t['reason']} | | | | | |")
    print()
    print(f"tuning wall time {tuning_seconds:.0f} s; total wall time {total_seconds:.0f} s; "
          f"load average at end: {_harness.load_average()}")
    print(f"figure: {figure_path}; results: {os.path.join(opts.out_dir, 'results.json')}")


if __name__ == "__main__":
    sys.exit(main())
