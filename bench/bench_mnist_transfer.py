"""Transfer on full MNIST: a backbone learned on digits 0-4, heads tuned for digits 5-9 (Keras' old transfer example).

The protocol (issue 17, point 5), every step one of the project's jobs in one local SparkSession:

1. **Source.** The digits 0-4 of MNIST's training file (and of t10k as the test set) are written
   as IDX files to the bench's store and prepared with the prepare_data job; the tune job trains
   the reference network (``mnist_cnn``, its defaults: 1024 hidden units, learning rate 1e-3,
   dropout 0.5, batch 128, adam, no augmentation) for ``--source-epochs``; export_model registers
   it, and register_model imports that ``.keras`` file (``--source keras_file``, label map
   ``"0".."4"``) as the backbone ``mnist-cnn-0-4``. Its features are the input of its last Dense
   layer: the 1024 hidden units.
2. **Target.** For each budget of ``--labels-per-class`` (``10,100,all``), the digits 5-9 keep
   their label names ``"5".."9"`` (prepare_data reads IDX labels as names). ``k`` images per class
   are drawn from the 5-9 training images (seeded, stratified: :func:`labels_per_class`), written
   as IDX files with all the 5-9 t10k images as the test set, and prepared once with
   ``--backbone``. The **budget counts every labelled image a run sees**: prepare_data's
   stratified split takes ``--validation-fraction`` of each class for validation out of those
   ``k`` (with 10 per class and the default 0.1: 9 to train, 1 to validate per class). Selecting
   on a larger labelled validation set would spend labels the budget says the user does not
   have; both arms select on the same small validation set, so the comparison stays fair, but
   with 10 per class the selection among heads is noisy (5 validation images).
3. On each prepared set, (a) the backbone's features are computed once (the tune job's own
   :func:`sparktf.features.prepare_transfer`, timed: "featurize s"), then the tune job with
   ``--backbone`` trains a grid of heads on them (it reuses those features: 0 images featurized,
   checked; "head grid s" includes reading the features back). The default grid is 8 heads:
   learning rates 1e-3 and 1e-2 x hidden units 0 (linear) and 256 x dropout 0 and 0.5, batch 64,
   adam, up to ``--head-epochs`` 30 with patience 5 (``--head-*`` flags change it). And (b) the
   tune job trains ``mnist_cnn`` from scratch on the same prepared set (one trial, the reference
   network's defaults, ``--scratch-epochs`` with ``--scratch-patience``; "scratch s").

Selection is by validation accuracy; the accuracies are the selected trial's on the 5-9 test
digits. Prints a table per budget and the issue's goals as PASS/MISS with the figures (with 100
labels per class: transfer >= 95 % and >= 5 points above scratch; with all labels: transfer >=
99.0 %; featurize + a head grid of >= 8 configurations in less wall time than the from-scratch
trial on all labels), and saves everything with the provenance to ``<out-dir>/results.json``.

Commands are run from the repository root with the project's venv active
(``source scripts/env.sh``). The full protocol (an estimate of 30-60 minutes on 2 cores: not run yet)::

    mkdir -p bench-results
    nohup python bench/bench_mnist_transfer.py --out-dir bench-results/mnist-transfer \\
        > bench-results/bench_mnist_transfer.log 2>&1 &

Smoke run (a few minutes)::

    python bench/bench_mnist_transfer.py --train-limit 3000 --test-limit 500 --source-epochs 1 \\
        --labels-per-class 10,all --head-epochs 1 --scratch-epochs 1 --out-dir bench-results/mnist-transfer-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import _harness  # bench/ is importable: Python puts the running script's folder first on the import path
import bench_mnist_accuracy  # the reference network's tune arguments and the export, as the accuracy bench runs them

from sparktf_dev import testing

BUCKET = "sparktf-bench-mnist-transfer"
SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
BACKBONE_NAME = "mnist-cnn-0-4"
GOAL_100_ACCURACY, GOAL_100_POINTS, GOAL_ALL_ACCURACY, GOAL_MIN_CONFIGS = 0.95, 5.0, 0.99, 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mnist-dir", default=str(_harness.MNIST_DIR), help="folder of the full MNIST IDX .gz files")
    p.add_argument("--labels-per-class", default="10,100,all", help="labelled 5-9 images per class, comma-separated (all = every one)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N of the 60k training images (smoke runs)")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N of the 10k test images (smoke runs)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="prepare_data's validation share of each class (out of the budget)")
    p.add_argument("--slots", type=int, default=2, help="Spark task slots (local[N])")
    p.add_argument("--source-epochs", type=int, default=3, help="epochs of the reference network on digits 0-4 (the backbone)")
    p.add_argument("--head-learning-rates", default="0.001,0.01", help="head grid: learning rates")
    p.add_argument("--head-hidden-units", default="0,256", help="head grid: hidden units (0 = a linear head)")
    p.add_argument("--head-dropouts", default="0.0,0.5", help="head grid: dropout rates")
    p.add_argument("--head-l2-weights", default="0.0", help="head grid: L2 weights")
    p.add_argument("--head-batch-sizes", default="64", help="head grid: batch sizes")
    p.add_argument(
        "--head-fine-tune-layers", default="0", help="head grid: backbone layers fine-tuned after the head (0 = frozen; > 0 trains on the images)"
    )
    p.add_argument("--head-epochs", type=int, default=30, help="head grid: maximum epochs")
    p.add_argument("--head-patience", type=int, default=5, help="head grid: early-stopping patience")
    p.add_argument("--scratch-epochs", type=int, default=12, help="from scratch: maximum epochs")
    p.add_argument("--scratch-patience", type=int, default=3, help="from scratch: early-stopping patience")
    p.add_argument("--seed", type=int, default=42, help="label draw, split, weights and shuffling seed")
    p.add_argument("--out-dir", default=str(_harness.RESULTS_DIR / "mnist-transfer"), help="local folder for the results")
    opts = p.parse_args(argv)
    try:
        opts.budgets = parse_budgets(opts.labels_per_class)
    except ValueError as err:
        p.error(f"--labels-per-class: {err}")
    return opts


# ---------------------------------------------------------------------------------------------
# Pure functions: the data sets, the grid, the goals
# ---------------------------------------------------------------------------------------------


def parse_budgets(text: str) -> list[int | None]:
    """``"10,100,all"`` -> ``[10, 100, None]`` (None = every labelled image)."""
    budgets: list[int | None] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "all":
            budgets.append(None)
        elif item.isdigit() and int(item) >= 2:
            budgets.append(int(item))
        else:
            raise ValueError(f"{item!r} is neither a number of images per class (>= 2) nor 'all'")
    if not budgets:
        raise ValueError("no budget given")
    return budgets


def budget_label(per_class: int | None) -> str:
    return "all" if per_class is None else str(per_class)


def digit_subset(images, labels, digits):
    """The images and labels (kept as they are: prepare_data names them) whose label is in ``digits``."""
    import numpy as np

    keep = np.isin(labels, np.asarray(digits, dtype=labels.dtype))
    return images[keep], labels[keep]


def labels_per_class(labels, per_class: int | None, seed: int):
    """Indices of ``per_class`` images of each label, drawn with ``seed`` (stratified), in their original order.

    ``None`` keeps every index. A class with fewer images than asked is an error (a smaller
    budget, not a silently unbalanced one).
    """
    import numpy as np

    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"label {label} has {len(members)} images, fewer than {per_class} per class")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def grid_size(opts: argparse.Namespace) -> int:
    """How many head configurations the grid has (the product of the head dimensions)."""
    size = 1
    dimensions = (opts.head_learning_rates, opts.head_hidden_units, opts.head_dropouts, opts.head_l2_weights, opts.head_batch_sizes)
    for values in (*dimensions, opts.head_fine_tune_layers):
        size *= len([v for v in values.split(",") if v.strip()])
    return size


def row_of(
    per_class: int | None, transfer: dict[str, Any], scratch: dict[str, Any], featurize_seconds: float, head_seconds: float, scratch_seconds: float
):
    """One row of the table from the tune job's results of both arms (its ``best`` and ``succeeded``)."""
    transfer_acc, scratch_acc = transfer["best"]["test_accuracy"], scratch["best"]["test_accuracy"]
    return {
        "labels_per_class": budget_label(per_class),
        "transfer_test_accuracy": transfer_acc,
        "scratch_test_accuracy": scratch_acc,
        "points": 100 * (transfer_acc - scratch_acc),
        "featurize_seconds": featurize_seconds,
        "head_grid_seconds": head_seconds,
        "configurations": transfer["trials"],
        "succeeded": transfer["succeeded"],
        "scratch_seconds": scratch_seconds,
        "transfer_params": transfer["best"]["params"],
    }


def check_goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, each ``{goal, status: PASS|MISS|not run, figures}`` (a budget not run cannot pass)."""
    by_budget = {row["labels_per_class"]: row for row in rows}
    goals = []
    r100, rall = by_budget.get("100"), by_budget.get("all")

    def goal(text: str, row, passed, figures) -> None:
        status = "not run" if row is None else ("PASS" if passed(row) else "MISS")
        goals.append({"goal": text, "status": status, "figures": figures(row) if row else "budget not in --labels-per-class"})

    goal(
        "100 labels/class: transfer >= 95 %",
        r100,
        lambda r: r["transfer_test_accuracy"] >= GOAL_100_ACCURACY,
        lambda r: f"transfer {100 * r['transfer_test_accuracy']:.2f} %",
    )
    goal(
        "100 labels/class: transfer >= 5 points above scratch",
        r100,
        lambda r: r["points"] >= GOAL_100_POINTS,
        lambda r: f"{100 * r['transfer_test_accuracy']:.2f} % vs {100 * r['scratch_test_accuracy']:.2f} %: {r['points']:+.2f} points",
    )
    goal(
        "all labels: transfer >= 99.0 %",
        rall,
        lambda r: r["transfer_test_accuracy"] >= GOAL_ALL_ACCURACY,
        lambda r: f"transfer {100 * r['transfer_test_accuracy']:.2f} %",
    )
    goal(
        "all labels: featurize + head grid (>= 8 configs) < one from-scratch trial",
        rall,
        lambda r: r["configurations"] >= GOAL_MIN_CONFIGS and r["featurize_seconds"] + r["head_grid_seconds"] < r["scratch_seconds"],
        lambda r: (
            f"{r['featurize_seconds']:.0f} s + {r['head_grid_seconds']:.0f} s ({r['configurations']} configs) = "
            f"{r['featurize_seconds'] + r['head_grid_seconds']:.0f} s vs {r['scratch_seconds']:.0f} s"
        ),
    )
    return goals


def format_report(rows: list[dict[str, Any]], goals: list[dict[str, Any]]) -> str:
    """The table and the goals, as printed (markdown)."""
    lines = [
        "| labels/class | transfer test acc | scratch test acc | points | featurize s | head grid s | configs | scratch s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['labels_per_class']} | {100 * r['transfer_test_accuracy']:.2f} % | {100 * r['scratch_test_accuracy']:.2f} % "
            f"| {r['points']:+.2f} | {r['featurize_seconds']:.1f} | {r['head_grid_seconds']:.1f} | {r['configurations']} "
            f"| {r['scratch_seconds']:.1f} |"
        )
    lines.append("")
    lines.extend(f"{g['status']}: {g['goal']} ({g['figures']})" for g in goals)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The jobs
# ---------------------------------------------------------------------------------------------


def upload_digits(prefix: str, arrays, digits, *, per_class: int | None, seed: int) -> dict[str, Any]:
    """Write the ``digits`` of MNIST as IDX pairs under ``prefix`` (training images: ``per_class`` of each)."""
    train_x, train_y, test_x, test_y = arrays
    train_x, train_y = digit_subset(train_x, train_y, digits)
    chosen = labels_per_class(train_y, per_class, seed)
    test_x, test_y = digit_subset(test_x, test_y, digits)
    return testing.upload_mnist(prefix, (train_x[chosen], train_y[chosen], test_x, test_y))


def train_backbone(spark, opts: argparse.Namespace, arrays, base: str) -> dict[str, Any]:
    """Train the reference network on digits 0-4, export it and import it as the backbone; the steps' results."""
    from sparktf import storage
    from sparktf.jobs import register_model, tune

    uploaded = upload_digits(f"{base}/source/raw/", arrays, SOURCE_DIGITS, per_class=None, seed=opts.seed)
    prepared = testing.prepare(spark, f"{base}/source/raw/", f"{base}/source/prepared/", "--seed", str(opts.seed))
    print(f"source (digits 0-4): uploaded {uploaded}, prepared {prepared['counts']}", flush=True)
    started = time.perf_counter()
    source_args = bench_mnist_accuracy.seed_args(
        prepared["prepared_uri"],
        f"{base}/source/tuning/",
        epochs=opts.source_epochs,
        patience=opts.source_epochs,
        seed=opts.seed,
    )
    trained = tune.run(spark, source_args)
    exported = bench_mnist_accuracy.export_best(trained["results_uri"], f"{base}/source-models/")
    label_map_uri = f"{base}/uploads/digits-0-4.json"
    storage.write_json(label_map_uri, [str(d) for d in SOURCE_DIGITS])
    model = ["--models-uri", f"{base}/models/", "--model-name", BACKBONE_NAME, "--source", "keras_file", "--model-uri", exported["model_uri"]]
    labels = ["--labels", "label_map", "--label-map-uri", label_map_uri, "--resize-policy", "resize", "--promote", "true"]
    run = ["--source-run", "bench_mnist_transfer", "--registered-at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
    registered = register_model.run(register_model.parse_args([*model, *labels, *run]))
    if not registered["registered"]:
        raise RuntimeError(f"register_model refused the 0-4 network: {registered['refused']}")
    seconds = time.perf_counter() - started
    print(
        f"backbone {BACKBONE_NAME}@{registered['version']}: source test accuracy {trained['best']['test_accuracy']:.4f} ({seconds:.0f} s)", flush=True
    )
    return {"prepared": prepared, "tuned": trained, "exported": exported, "registered": registered, "seconds": seconds}


def head_args(opts: argparse.Namespace, prepared_uri: str, base: str, budget: str, backbone: str) -> argparse.Namespace:
    """The tune job's arguments for the head grid on ``backbone``."""
    from sparktf.jobs import tune

    where = ["--prepared-uri", prepared_uri, "--output-uri", f"{base}/target-{budget}/heads/", "--features-uri", f"{base}/features/"]
    what = ["--backbone", backbone, "--models-uri", f"{base}/models/", "--optimizer", "adam", "--seed", str(opts.seed)]
    grid = ["--learning-rates", opts.head_learning_rates, "--hidden-units", opts.head_hidden_units, "--dropouts", opts.head_dropouts]
    grid += ["--l2-weights", opts.head_l2_weights, "--batch-sizes", opts.head_batch_sizes, "--fine-tune-layers", opts.head_fine_tune_layers]
    return tune.parse_args([*where, *what, *grid, "--epochs", str(opts.head_epochs), "--patience", str(opts.head_patience)])


def featurize(spark, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Compute the backbone's features of the prepared set as the tune job does; ``(what it did, seconds)``."""
    from sparktf import dataset, features

    started = time.perf_counter()
    transfer = features.prepare_transfer(spark, args, dataset.read_manifest(args.prepared_uri))
    seconds = time.perf_counter() - started
    if transfer["data_source"][0] == "broadcast":
        transfer["data_source"][1].destroy()  # the head grid's own run broadcasts them again
    return {k: transfer[k] for k in ("features_uri", "featurized", "images", "feature_dim")}, seconds


def run_budget(spark, opts: argparse.Namespace, arrays, base: str, per_class: int | None, backbone: str) -> dict[str, Any]:
    """Prepare the 5-9 set for one budget; featurize, tune the heads, train from scratch. The row and the details."""
    from sparktf import storage
    from sparktf.jobs import tune

    budget = budget_label(per_class)
    raw = f"{base}/target-{budget}/raw/"
    uploaded = upload_digits(raw, arrays, TARGET_DIGITS, per_class=per_class, seed=opts.seed)
    flags = [
        "--seed",
        str(opts.seed),
        "--validation-fraction",
        str(opts.validation_fraction),
        "--backbone",
        backbone,
        "--models-uri",
        f"{base}/models/",
    ]
    prepared = testing.prepare(spark, raw, f"{base}/target-{budget}/prepared/", *flags)  # decoded to the backbone's recorded input
    print(f"[{time.strftime('%H:%M:%S')}] {budget} labels/class: uploaded {uploaded}, prepared {prepared['counts']}", flush=True)
    featurized, featurize_seconds = featurize(spark, head_args(opts, prepared["prepared_uri"], base, budget, backbone))
    started = time.perf_counter()
    heads = tune.run(spark, head_args(opts, prepared["prepared_uri"], base, budget, backbone))
    head_seconds = time.perf_counter() - started
    if heads["featurized"] != 0:
        raise RuntimeError(f"the head grid featurized {heads['featurized']} images again: the featurize time would be counted twice")
    started = time.perf_counter()
    scratch = tune.run(
        spark,
        bench_mnist_accuracy.seed_args(
            prepared["prepared_uri"],
            f"{base}/target-{budget}/scratch/",
            epochs=opts.scratch_epochs,
            patience=opts.scratch_patience,
            seed=opts.seed,
        ),
    )
    scratch_seconds = time.perf_counter() - started
    row = row_of(per_class, heads, scratch, featurize_seconds, head_seconds, scratch_seconds)
    print(f"  {json.dumps(row, default=str)}", flush=True)
    details = {"prepared": prepared, "featurized": featurized, "heads": storage.read_json(heads["results_uri"])}
    return {"row": row, **details, "scratch": storage.read_json(scratch["results_uri"])}


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.makedirs(opts.out_dir, exist_ok=True)
    started = time.perf_counter()
    print(f"machine: {_harness.machine()}; load average at start: {_harness.load_average()}", flush=True)
    train_x, train_y, test_x, test_y = testing.read_mnist(_harness.check_mnist(opts.mnist_dir))
    arrays = (train_x[: opts.train_limit], train_y[: opts.train_limit], test_x[: opts.test_limit], test_y[: opts.test_limit])
    with testing.S3Server(log_path=_harness.log_file("mnist-transfer-moto")):
        from sparktf import storage

        storage.create_bucket(BUCKET)
        base = f"s3://{BUCKET}/mnist-transfer"
        spark = testing.local_spark(opts.slots, "bench-mnist-transfer", conf=_harness.SPARK_CONF)
        try:
            source = train_backbone(spark, opts, arrays, base)
            backbone = f"{BACKBONE_NAME}@{source['registered']['version']}"
            budgets = [run_budget(spark, opts, arrays, base, per_class, backbone) for per_class in opts.budgets]
        finally:
            spark.stop()
    rows = [b["row"] for b in budgets]
    goals = check_goals(rows)
    out = os.path.join(opts.out_dir, "results.json")
    _harness.write_json(out, {"options": vars(opts), "source": source, "budgets": budgets, "rows": rows, "goals": goals})
    print()
    print(f"backbone {backbone}: mnist_cnn on digits 0-4, {opts.source_epochs} epochs, test accuracy {source['tuned']['best']['test_accuracy']:.4f}")
    print(format_report(rows, goals))
    print(f"total wall time {time.perf_counter() - started:.0f} s; load average at end: {_harness.load_average()}; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
