"""Throughput of the batch inference job against its ceiling, the seed's per-image pattern and
``pyspark.ml.functions.predict_batch_udf``, on the same images, side by side in one run.

Setup: the first ``--images`` MNIST t10k digits (``../shared/datasets/mnist``, or
``SPARKTF_MNIST_DIR``) uploaded as PNG files to a private moto S3 server on 127.0.0.1 (free port),
under ``incoming/<date>/``; a registered ``--family`` model (default ``mnist_cnn``, the seed's
network with 1024 hidden units; weights untrained: the cost of a forward pass does not depend on
them). Each measurement runs in a fresh interpreter (own TensorFlow thread settings, own JVM):

* ``ceiling``: (a) raw concurrent GET rate: ``--slots`` processes x ``--fetch-threads`` threads of
  GETs through ``sparktf.storage`` over all images (bytes only), and (b) in-process batched model calls
  (``model(batch)``, batches of ``--batch-size``) on the already decoded arrays, TensorFlow on
  ``--slots`` threads. Ceiling = min(a, b).
* ``seed``: the seed's per-image pattern on a sample (``--seed-sample``): for every image, GET,
  decode, deserialize the ``.keras`` model, ``model.predict`` on one image; extrapolated.
* ``job``: ``sparktf.jobs.batch_inference``'s ``run(spark, args)`` in ``local[1]`` and ``local[2]``,
  twice each in the same SparkSession: ``cold`` (Python workers start, import TensorFlow and load
  the model) and ``warm`` (reused workers with the model cached). Images/s = images / wall time
  of ``run`` (listing, scoring, Parquet parts, publish).
* ``predict_batch_udf``: the same images in ``local[2]``: a pandas UDF fetches and decodes with the
  same concurrent fetch helper, then ``predict_batch_udf`` (model loaded per worker by its
  ``make_predict_fn``) scores ``--batch-size`` images per call; results collected. Cold and warm.

Prints ratios: job (warm, local[2]) / ceiling (goal >= 0.8), job / seed pattern (goal >= 20x),
job / predict_batch_udf (goal >= 1.0), local[2] / local[1] (scaling). Nothing is asserted.

Usage (from the repository root, with the project's venv active: ``source scripts/env.sh``)::

    python bench/bench_inference.py --json-out bench-results/inference.json   # 5,000 images, mnist_cnn
    python bench/bench_inference.py --images 500 --seed-sample 20 --family mlp   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _harness  # bench/ is importable: Python puts the running script's folder first on the import path

from sparktf_dev import testing

DATE = "2026-11-20"
MODEL_NAME = "bench-digits"
BUCKET = "sparktf-bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000, help="MNIST t10k digits uploaded as PNG")
    p.add_argument("--family", default="mnist_cnn", choices=("mnist_cnn", "mlp"), help="model family")
    p.add_argument("--hidden-units", type=int, default=1024, help="hidden units of the model")
    p.add_argument("--slots", type=int, default=2, help="task slots of the main configuration")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call")
    p.add_argument("--fetch-threads", type=int, default=16, help="concurrent GETs per task/process")
    p.add_argument("--seed-sample", type=int, default=100, help="images timed with the per-image pattern")
    p.add_argument("--json-out", default=None, help="also write every measurement to this JSON file")
    # Internal: one step in a fresh interpreter.
    p.add_argument("--worker", choices=("setup", "ceiling", "seed", "job", "pbudf"), help=argparse.SUPPRESS)
    p.add_argument("--ws", help=argparse.SUPPRESS)
    p.add_argument("--worker-slots", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def incoming_keys(ws: str) -> tuple[str, list[str]]:
    return _harness.incoming_keys(ws, DATE)


def model_metadata(ws: str) -> dict:
    return _harness.champion_metadata(ws, MODEL_NAME)


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def worker_setup(args) -> dict:
    """Build the model and register it through the registry (version 1, champion)."""
    import tempfile

    from sparktf import executor, models, registry

    executor.pin_threads(1)
    import keras

    keras.utils.set_random_seed(0)
    model = models.build_model(args.family, (28, 28, 1), 10, hidden_units=args.hidden_units)
    models_uri = args.ws + "/models/"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        model_bytes = os.path.getsize(path)
        metadata = registry.write_version(
            models_uri,
            MODEL_NAME,
            model_path=path,
            version=1,
            metadata={
                "family": args.family,
                "params": {"hidden_units": args.hidden_units},
                "trained": False,
                "input_shape": [28, 28, 1],
                "label_names": testing.LABEL_NAMES,
            },
        )
    registry.set_champion(models_uri, MODEL_NAME, registry.champion_pointer(metadata))
    return {"model_bytes": model_bytes, "params": int(model.count_params()), "version": metadata["version"]}


def _get_share(payload: tuple[str, list[str], int]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from sparktf import storage

    bucket, keys, threads = payload
    s3 = storage.client()
    with ThreadPoolExecutor(threads) as pool:
        return sum(len(b) for b in pool.map(lambda k: storage.read_bytes(storage.object_uri(bucket, k), s3), keys))


def worker_ceiling(args) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    bucket, keys = incoming_keys(args.ws)
    out = {}
    for procs in sorted({1, args.worker_slots}):
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_get_share, [(bucket, keys[i:200:procs], 4) for i in range(procs)]))  # warm up
            started = time.perf_counter()
            total = sum(pool.map(_get_share, [(bucket, keys[i::procs], args.fetch_threads) for i in range(procs)]))
            seconds = time.perf_counter() - started
        out[f"get_rate_{procs}proc"] = len(keys) / seconds
        out["bytes"] = total

    from sparktf import executor, fetch, registry, scoring

    executor.pin_threads(args.worker_slots)
    meta = model_metadata(args.ws)
    model = registry.load_version_model(meta)
    arrays = np.stack(
        [
            a
            for _k, a, _r, _d in fetch.fetch_decoded(
                bucket, keys, height=28, width=28, channels=1, max_pixels=40_000_000, fetch_threads=args.fetch_threads
            )
        ]
    )
    scoring.predict_batch(model, arrays[: args.batch_size])  # warm up
    started = time.perf_counter()
    for start in range(0, len(arrays), args.batch_size):
        scoring.predict_batch(model, arrays[start : start + args.batch_size])
    out["model_rate"] = len(arrays) / (time.perf_counter() - started)
    out["get_rate"] = max(v for k, v in out.items() if k.startswith("get_rate_"))
    out["ceiling"] = min(out["get_rate"], out["model_rate"])
    return out


def worker_seed(args) -> dict:
    """The seed's pattern: per image, GET + decode + deserialize the model + model.predict."""
    import tempfile

    from sparktf import executor, storage
    from sparktf.images import decode_image

    executor.pin_threads(args.worker_slots)
    import keras

    bucket, keys = incoming_keys(args.ws)
    meta = model_metadata(args.ws)
    sample = keys[: args.seed_sample]
    s3 = storage.client()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        storage.download_file(meta["model_uri"], path, s3)
        started = time.perf_counter()
        for key in sample:
            pixels = decode_image(storage.read_bytes(storage.object_uri(bucket, key), s3))
            model = keras.saving.load_model(path, compile=False)
            model.predict(pixels[None], verbose=0)
        seconds = time.perf_counter() - started
    return {"images": len(sample), "seconds": seconds, "rate": len(sample) / seconds, "extrapolated_seconds": seconds / len(sample) * len(keys)}


def worker_job(args) -> dict:
    from sparktf.jobs import batch_inference

    spark = testing.local_spark(args.worker_slots, "bench-inference-job", conf=_harness.SPARK_CONF)
    try:
        runs = {}
        for label in ("cold", "warm"):
            job_args = batch_inference.parse_args(
                [
                    "--incoming-uri",
                    args.ws + "/incoming/",
                    "--output-uri",
                    args.ws + f"/predictions-{args.worker_slots}/",
                    "--date",
                    DATE,
                    "--models-uri",
                    args.ws + "/models/",
                    "--model-name",
                    MODEL_NAME,
                    "--batch-size",
                    str(args.batch_size),
                    "--fetch-threads",
                    str(args.fetch_threads),
                ]
            )
            started = time.perf_counter()
            result = batch_inference.run(spark, job_args)
            seconds = time.perf_counter() - started
            runs[label] = {
                "seconds": seconds,
                "rate": result["listed"] / seconds,
                "stage_rate": result["images_per_second"],
                "scored": result["scored"],
                "tasks": result["tasks"],
                "model_loads": result["model_loads"],
                "model_seconds": result["model_seconds"],
            }
        return runs
    finally:
        spark.stop()


def worker_pbudf(args) -> dict:
    return _harness.predict_batch_udf_runs(
        args.ws,
        DATE,
        MODEL_NAME,
        slots=args.worker_slots,
        batch_size=args.batch_size,
        fetch_threads=args.fetch_threads,
        conf=_harness.SPARK_CONF,
        app_name="bench-inference-pbudf",
    )


WORKERS = {"setup": worker_setup, "ceiling": worker_ceiling, "seed": worker_seed, "job": worker_job, "pbudf": worker_pbudf}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def upload_images(ws: str, count: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from sparktf import storage
    from sparktf.images import encode_png

    _train_x, _train_y, test_x, _test_y = testing.read_mnist(_harness.check_mnist())
    digits = test_x[:count]
    s3 = storage.client()

    def put(n: int) -> None:
        uri = storage.join_uri(ws, "incoming", DATE, f"cam-{n % 4}", f"digit {n:05d}.png")
        storage.write_bytes(uri, encode_png(digits[n]), s3)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(len(digits))))
    return len(digits)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _harness.emit_result(WORKERS[args.worker](args))
        return 0

    common = [
        "--batch-size",
        str(args.batch_size),
        "--fetch-threads",
        str(args.fetch_threads),
        "--family",
        args.family,
        "--hidden-units",
        str(args.hidden_units),
        "--seed-sample",
        str(args.seed_sample),
    ]
    me = str(Path(__file__).resolve())
    report: dict = {
        "machine": _harness.machine(),
        "images": args.images,
        "family": args.family,
        "batch_size": args.batch_size,
        "fetch_threads": args.fetch_threads,
        "load": {},
    }
    with testing.S3Server(log_path=_harness.log_file("inference-moto")):
        from sparktf import storage

        storage.create_bucket(BUCKET)
        ws = f"s3://{BUCKET}/ws"

        def step(name: str, slots: int = 1) -> dict:
            return _harness.run_step(
                f"{name}-{slots}",
                [me, "--worker", name, "--ws", ws, "--worker-slots", str(slots), *common],
                loads=report["load"],
                log_name=f"inference-{name}-{slots}",
            )

        started = time.perf_counter()
        report["uploaded"] = upload_images(ws, args.images)
        print(f"uploaded {report['uploaded']} PNG digits in {time.perf_counter() - started:.1f} s", flush=True)
        report["model"] = step("setup")
        report["ceiling"] = step("ceiling", args.slots)
        report["seed"] = step("seed", 1)
        report["job_1"] = step("job", 1)
        report["job_n"] = step("job", args.slots)
        report["pbudf"] = step("pbudf", args.slots)

    job = report["job_n"]["warm"]["rate"]
    ratios = {
        "job_warm_vs_ceiling": job / report["ceiling"]["ceiling"],
        "job_cold_vs_ceiling": report["job_n"]["cold"]["rate"] / report["ceiling"]["ceiling"],
        "job_vs_seed_pattern": job / report["seed"]["rate"],
        "job_vs_predict_batch_udf_warm": job / report["pbudf"]["warm"]["rate"],
        "job_vs_predict_batch_udf_cold": report["job_n"]["cold"]["rate"] / report["pbudf"]["cold"]["rate"],
        "scaling_warm": job / report["job_1"]["warm"]["rate"],
        "scaling_cold": report["job_n"]["cold"]["rate"] / report["job_1"]["cold"]["rate"],
    }
    report["ratios"] = ratios
    c = report["ceiling"]
    print(f"\n{report['machine']}; {args.images} images, {args.family}, batch {args.batch_size}, {args.fetch_threads} GET threads per task")
    print(
        f"ceiling: GETs {c['get_rate']:.0f}/s (1 proc {c['get_rate_1proc']:.0f}/s), model calls "
        f"{c['model_rate']:.0f}/s on {args.slots} threads -> {c['ceiling']:.0f} images/s"
    )
    print(
        f"seed per-image pattern: {report['seed']['rate']:.2f} images/s "
        f"({report['seed']['images']} timed; {report['seed']['extrapolated_seconds']:.0f} s extrapolated)"
    )
    for name, key in (("job local[1]", "job_1"), (f"job local[{args.slots}]", "job_n"), (f"predict_batch_udf local[{args.slots}]", "pbudf")):
        r = report[key]
        print(
            f"{name}: cold {r['cold']['rate']:.0f} images/s ({r['cold']['seconds']:.1f} s), "
            f"warm {r['warm']['rate']:.0f} images/s ({r['warm']['seconds']:.1f} s)"
        )
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    print(f"load average per step: {report['load']}")
    if args.json_out:
        _harness.write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
