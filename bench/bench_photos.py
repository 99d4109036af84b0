"""Throughput of the batch inference job on photos with InceptionV3 (compute-bound) against its
ceiling, ``pyspark.ml.functions.predict_batch_udf`` and the two task layouts, side by side in one run.

Setup: ``--images`` synthetic ``--width`` x ``--height`` photos (``sparktf_dev.testing.photo``: colour
gradient, shapes, grain), JPEG quality 90, uploaded to a private moto S3 server on 127.0.0.1 (free
port) under ``incoming/<date>/``. InceptionV3 is registered through the ``register_model`` job's own
code path (``keras.applications.InceptionV3(weights=None)`` + a ``.weights.h5`` file the caller
made, here ``sparktf_dev.testing.application_weights``: no pretrained weights can be downloaded, and
the cost of a forward pass does not depend on the weights' values). Every image is decoded and
centre-cropped to 299x299 as the job does (``resize_policy: center_crop``). Each measurement runs in
a fresh interpreter (own TensorFlow thread settings, own JVM):

* ``ceiling``: in-process batched model calls (``model(batch)``, batches of ``--batch-size``) on the
  already decoded arrays (the first ``--ceiling-images``: a steady rate needs a few batches only),
  with all cores: (a) one process, TensorFlow on ``--cores`` threads, and
  (b) ``--cores`` processes x 1 thread, each on its share, started together. Ceiling = the better
  of the two. Also printed: the GET + decode rate of the fetch pool (the job's input side).
* ``job``: ``sparktf.jobs.batch_inference``'s ``run(spark, args)`` in the two task layouts of one
  machine: ``tasks``: ``local[<cores>]`` with ``spark.task.cpus=1`` (``<cores>`` 1-thread tasks at a
  time, the job's default, ``SPARKTF_TASK_CPUS=1``) and ``one-task``: ``local[<cores>]`` with
  ``spark.task.cpus=<cores>`` (one ``<cores>``-thread task at a time). Each step runs the job twice
  in one SparkSession: ``cold`` (Python workers start, import TensorFlow and load the model) and
  ``warm`` (reused workers, model cached). Images/s = images / wall time of ``run`` (listing,
  scoring, Parquet parts, publish). The steps run in the order A B | B A over ``--rounds`` rounds
  (``2`` by default) so that a drifting machine load does not favour one layout.
* ``predict_batch_udf``: the same images in the default layout: a pandas UDF fetches and decodes
  with the same fetch pool (float pixels, as ``predict_batch_udf`` takes them; Arrow batches of
  ``--batch-size`` rows so that fetching overlaps scoring), then ``predict_batch_udf`` (model loaded
  per worker by its ``make_predict_fn``, the same verified ``.keras`` file) scores ``--batch-size``
  images per call; results collected. Cold and warm, run between the two job rounds.

Prints, from the one run: job (default layout, warm and cold) / ceiling (goal >= 0.8); job /
predict_batch_udf (goal >= 1.2); one-task / tasks per round (a layout wins when it is > 5 % faster
in every round). Nothing is asserted. The 1-minute load average is printed before and after the
run and before every step; ``--wait-load`` / ``--not-after`` hold the start until the shared machine
is quiet (polled every 30 s) or until a UTC time, whichever comes first.

Usage (from the repository root, with the project's venv active: ``source scripts/env.sh``)::

    python bench/bench_photos.py --images 500 --wait-load 1.5 --not-after 21:45 --json-out bench-results/photos.json
    python bench/bench_photos.py --smoke   # a handful of photos, one round: checks that every step runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import _harness  # bench/ is importable: Python puts the running script's folder first on the import path

from sparktf_dev import testing

DATE = "2026-11-20"
MODEL_NAME = "bench-inception-v3"
APPLICATION = "InceptionV3"
BUCKET = "sparktf-bench-photos"
LOAD_POLL_SECONDS = 30
LAYOUTS = ("tasks", "one-task")  # <cores> 1-thread tasks (the job's default) | one <cores>-thread task


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000, help="synthetic JPEG photos uploaded")
    p.add_argument("--width", type=int, default=640, help="photo width in pixels")
    p.add_argument("--height", type=int, default=480, help="photo height in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--fetch-threads", type=int, default=16, help="concurrent GETs per task/process")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores of the machine used by every variant")
    p.add_argument(
        "--ceiling-images", type=int, default=320, help="photos (the first ones) timed for the ceiling: a steady rate needs only a few batches"
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds of the two job layouts (order A B, then B A)")
    p.add_argument("--wait-load", type=float, default=None, help="before starting, wait until the 1-minute load average is below this")
    p.add_argument("--not-after", default=None, help="HH:MM (UTC): stop waiting for --wait-load at this time")
    p.add_argument("--smoke", action="store_true", help="tiny run (8 photos, batch 4, one round)")
    p.add_argument("--json-out", default=None, help="also write every measurement to this JSON file")
    # Internal: one step in a fresh interpreter.
    p.add_argument("--worker", choices=("setup", "ceiling", "job", "pbudf"), help=argparse.SUPPRESS)
    p.add_argument("--ws", help=argparse.SUPPRESS)
    p.add_argument("--layout", choices=LAYOUTS, default="tasks", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.fetch_threads, args.rounds = min(args.images, 8), 4, 4, 1
    args.ceiling_images = min(args.ceiling_images, args.images)
    return args


def incoming_keys(ws: str) -> tuple[str, list[str]]:
    return _harness.incoming_keys(ws, DATE)


def model_metadata(ws: str) -> dict:
    return _harness.champion_metadata(ws, MODEL_NAME)


def decoded_arrays(bucket: str, keys: list[str], meta: dict, fetch_threads: int):
    """The photos as the job feeds them to the model: ``(n, 299, 299, 3)`` uint8, centre-cropped."""
    import numpy as np

    from sparktf import fetch

    height, width, channels = meta["input_shape"]
    arrays = [
        a
        for _k, a, _r, _d in fetch.fetch_decoded(
            bucket,
            keys,
            height=height,
            width=width,
            channels=channels,
            max_pixels=40_000_000,
            fetch_threads=fetch_threads,
            resize_policy=meta["resize_policy"],
        )
    ]
    if any(a is None for a in arrays):
        raise RuntimeError("a generated photo did not decode")
    return np.stack(arrays)


def time_model_calls(model, arrays, batch_size: int) -> tuple[float, float]:
    """``(start, end)`` (``time.time()``) of batched model calls over every array, after a warm-up call."""
    from sparktf import scoring

    scoring.predict_batch(model, arrays[:batch_size])  # first call: TensorFlow allocates its kernels
    started = time.time()
    for start in range(0, len(arrays), batch_size):
        scoring.predict_batch(model, arrays[start : start + batch_size])
    return started, time.time()


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def worker_setup(args) -> dict:
    """Make a weights file, upload it and register InceptionV3 as the register_model job does."""
    import tempfile

    from sparktf import executor, storage

    executor.pin_threads(args.cores)
    from sparktf.jobs import register_model

    weights_uri = args.ws + "/uploads/inception_v3.weights.h5"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = testing.application_weights(APPLICATION, os.path.join(tmp, "inception_v3.weights.h5"))
        weights_bytes = os.path.getsize(path)
        storage.write_bytes(weights_uri, Path(path).read_bytes())
    weights_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = register_model.run(
        register_model.parse_args(
            [
                "--models-uri",
                args.ws + "/models/",
                "--model-name",
                MODEL_NAME,
                "--source",
                "keras_application",
                "--application",
                APPLICATION,
                "--weights-uri",
                weights_uri,
                "--labels",
                "imagenet",
                "--promote",
                "true",
                "--source-run",
                "bench-photos",
                "--registered-at",
                f"{DATE}T00:00:00+00:00",
            ]
        )
    )
    if not result["registered"] or not result["promoted"]:
        raise RuntimeError(f"InceptionV3 was not registered and promoted: {result}")
    return {
        "version": result["version"],
        "input_shape": result["input_shape"],
        "resize_policy": result["resize_policy"],
        "weights_bytes": weights_bytes,
        "model_bytes": storage.head(result["model_uri"])["size"],
        "weights_seconds": weights_seconds,
        "register_seconds": time.perf_counter() - started,
    }


def _ceiling_share(payload: tuple[str, int, int, int, int, int], barrier, results) -> None:
    """One of ``cores`` processes x 1 thread: decode its share, load the model, wait, time."""
    ws, index, processes, batch_size, fetch_threads, count = payload
    from sparktf import executor, registry

    executor.pin_threads(1)
    bucket, keys = incoming_keys(ws)
    keys = keys[:count]
    meta = model_metadata(ws)
    arrays = decoded_arrays(bucket, keys[index::processes], meta, fetch_threads)
    model = registry.load_version_model(meta)
    from sparktf import scoring

    scoring.predict_batch(model, arrays[:batch_size])  # warm up before the common start
    barrier.wait(timeout=900)
    started, ended = time_model_calls(model, arrays, batch_size)
    results.put((len(arrays), started, ended))


def worker_ceiling(args) -> dict:
    import multiprocessing
    import queue

    from sparktf import executor, registry

    executor.pin_threads(args.cores)
    bucket, keys = incoming_keys(args.ws)
    meta = model_metadata(args.ws)
    started = time.perf_counter()
    arrays = decoded_arrays(bucket, keys[: args.ceiling_images], meta, args.fetch_threads)
    out = {"fetch_decode_rate": len(arrays) / (time.perf_counter() - started), "images": len(arrays)}
    model = registry.load_version_model(meta)
    started, ended = time_model_calls(model, arrays, args.batch_size)
    out["model_rate_1proc"] = len(arrays) / (ended - started)
    del model, arrays

    # cores processes x 1 thread, started together (a barrier after each one's warm-up call).
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(args.cores), context.Queue()
    processes = [
        context.Process(
            target=_ceiling_share, args=((args.ws, i, args.cores, args.batch_size, args.fetch_threads, args.ceiling_images), barrier, results)
        )
        for i in range(args.cores)
    ]
    for process in processes:
        process.start()
    shares: list = []
    while len(shares) < len(processes):
        try:
            shares.append(results.get(timeout=5))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a ceiling process failed (exit codes {failed})") from None
    for process in processes:
        process.join()
    out[f"model_rate_{args.cores}proc"] = sum(n for n, _s, _e in shares) / (max(e for _n, _s, e in shares) - min(s for _n, s, _e in shares))
    out["ceiling"] = max(out["model_rate_1proc"], out[f"model_rate_{args.cores}proc"])
    return out


def layout_conf(layout: str, cores: int) -> dict[str, str]:
    return {**_harness.SPARK_CONF, "spark.task.cpus": "1" if layout == "tasks" else str(cores)}


def worker_job(args) -> dict:
    from sparktf.jobs import batch_inference

    spark = testing.local_spark(args.cores, f"bench-photos-job-{args.layout}", conf=layout_conf(args.layout, args.cores))
    try:
        runs: dict = {}
        for label in ("cold", "warm"):
            job_args = batch_inference.parse_args(
                [
                    "--incoming-uri",
                    args.ws + "/incoming/",
                    "--output-uri",
                    args.ws + f"/predictions-{args.layout}/",
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
            if result["scored"] != result["listed"]:
                raise RuntimeError(f"{result['set_aside']} photos set aside: {result['reasons']}")
            runs[label] = {
                "seconds": seconds,
                "rate": result["listed"] / seconds,
                "stage_rate": result["images_per_second"],
                "tasks": result["tasks"],
                "python_workers": result["python_workers"],
                "model_loads": result["model_loads"],
                "model_seconds": result["model_seconds"],
            }

        def probe(_items):
            import sparktf
            from sparktf import executor

            yield executor.task_cpus(), os.getpid(), sparktf.__file__

        seen = spark.sparkContext.parallelize(range(args.cores), args.cores).mapPartitions(probe).collect()
        runs["task_cpus"] = sorted({cpus for cpus, _pid, _file in seen})
        runs["sparktf_on_workers"] = sorted({file for _cpus, _pid, file in seen})
        return runs
    finally:
        spark.stop()


def worker_pbudf(args) -> dict:
    conf = {**layout_conf("tasks", args.cores), "spark.sql.execution.arrow.maxRecordsPerBatch": str(args.batch_size)}
    runs = _harness.predict_batch_udf_runs(
        args.ws,
        DATE,
        MODEL_NAME,
        slots=args.cores,
        batch_size=args.batch_size,
        fetch_threads=args.fetch_threads,
        conf=conf,
        app_name="bench-photos-pbudf",
    )
    for label, run in runs.items():
        if run["scored"] != run["listed"]:
            raise RuntimeError(f"predict_batch_udf ({label}) scored {run['scored']} of {run['listed']} photos")
    return runs


WORKERS = {"setup": worker_setup, "ceiling": worker_ceiling, "job": worker_job, "pbudf": worker_pbudf}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def wait_for_quiet(threshold: float | None, not_after: str | None) -> dict:
    """Poll the 1-minute load average every 30 s until it is below ``threshold`` or it is ``not_after``
    (HH:MM UTC, today; a time already past starts at once)."""
    deadline = None
    if not_after:
        hour, minute = (int(v) for v in not_after.split(":"))
        deadline = dt.datetime.now(dt.UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
    began = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        now = dt.datetime.now(dt.UTC)
        if threshold is None or load < threshold:
            reason = "no wait" if threshold is None else f"load {load:.2f} < {threshold}"
            break
        if deadline is not None and now >= deadline:
            reason = f"reached {not_after} UTC with load {load:.2f}"
            break
        print(f"{now:%H:%M:%S} UTC: load {load:.2f} >= {threshold}, waiting", flush=True)
        time.sleep(LOAD_POLL_SECONDS)
    return {"started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "reason": reason, "waited_seconds": round(time.monotonic() - began)}


def upload_photos(ws: str, count: int, width: int, height: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from sparktf import storage

    s3 = storage.client()

    def put(n: int) -> int:
        data = testing.encode(testing.photo(n, width, height), "JPEG", quality=90)
        storage.write_bytes(storage.join_uri(ws, "incoming", DATE, f"cam-{n % 4}", f"photo {n:05d}.jpg"), data, s3)
        return len(data)

    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(put, range(count)))
    return {"photos": count, "bytes": sum(sizes), "mean_bytes": sum(sizes) / max(1, count)}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def layout_verdict(ratios: list[float]) -> str:
    """Which layout wins: > 5 % in every round, else no clear winner."""
    if all(r > 1.05 for r in ratios):
        return "one-task wins"
    if all(r < 1 / 1.05 for r in ratios):
        return "tasks win"
    return "no clear winner (within 5 %, or rounds disagree)"


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
        "--cores",
        str(args.cores),
        "--ceiling-images",
        str(args.ceiling_images),
    ]
    me = str(Path(__file__).resolve())
    report: dict = {
        "machine": _harness.machine(),
        "images": args.images,
        "photo_size": [args.width, args.height],
        "application": APPLICATION,
        "batch_size": args.batch_size,
        "fetch_threads": args.fetch_threads,
        "cores": args.cores,
        "rounds": args.rounds,
        "ceiling_images": args.ceiling_images,
        "smoke": args.smoke,
        "load": {},
    }
    report["start"] = wait_for_quiet(args.wait_load, args.not_after)
    report["load"]["before"] = _harness.load_average()
    print(f"start: {report['start']}; load average before: {report['load']['before']}", flush=True)
    run_started = time.perf_counter()
    with testing.S3Server(log_path=_harness.log_file("photos-moto")):
        from sparktf import storage

        storage.create_bucket(BUCKET)
        ws = f"s3://{BUCKET}/ws"

        def step(name: str, layout: str = "tasks", tag: str = "") -> dict:
            label = f"{name}-{layout}{tag}" if name == "job" else name
            return _harness.run_step(
                label, [me, "--worker", name, "--ws", ws, "--layout", layout, *common], loads=report["load"], log_name=f"photos-{label}"
            )

        started = time.perf_counter()
        report["uploaded"] = upload_photos(ws, args.images, args.width, args.height)
        print(
            f"uploaded {args.images} {args.width}x{args.height} JPEGs "
            f"({report['uploaded']['mean_bytes'] / 1024:.0f} KiB each) in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        report["model"] = step("setup")
        report["ceiling"] = step("ceiling")
        report["job"] = {layout: [] for layout in LAYOUTS}
        for round_number in range(args.rounds):
            order = LAYOUTS if round_number % 2 == 0 else tuple(reversed(LAYOUTS))
            for layout in order:
                report["job"][layout].append(step("job", layout, f"-r{round_number + 1}"))
            if round_number == 0:
                report["pbudf"] = step("pbudf")
    report["seconds"] = time.perf_counter() - run_started
    report["load"]["after"] = _harness.load_average()

    jobs, c, pb = report["job"], report["ceiling"], report["pbudf"]
    job_warm, job_cold = mean(r["warm"]["rate"] for r in jobs["tasks"]), mean(r["cold"]["rate"] for r in jobs["tasks"])
    one_warm, one_cold = (mean(r["warm"]["rate"] for r in jobs["one-task"]), mean(r["cold"]["rate"] for r in jobs["one-task"]))
    layout_warm = [b["warm"]["rate"] / a["warm"]["rate"] for a, b in zip(jobs["tasks"], jobs["one-task"])]
    layout_cold = [b["cold"]["rate"] / a["cold"]["rate"] for a, b in zip(jobs["tasks"], jobs["one-task"])]
    ratios = {
        "job_warm_vs_ceiling": job_warm / c["ceiling"],
        "job_cold_vs_ceiling": job_cold / c["ceiling"],
        "one_task_warm_vs_ceiling": one_warm / c["ceiling"],
        "one_task_cold_vs_ceiling": one_cold / c["ceiling"],
        "job_vs_predict_batch_udf_warm": job_warm / pb["warm"]["rate"],
        "job_vs_predict_batch_udf_cold": job_cold / pb["cold"]["rate"],
        "one_task_vs_tasks_warm_per_round": layout_warm,
        "one_task_vs_tasks_cold_per_round": layout_cold,
        "ceiling_1proc_vs_nproc": c["model_rate_1proc"] / c[f"model_rate_{args.cores}proc"],
    }
    report["ratios"] = ratios
    report["layout_verdict_warm"] = layout_verdict(layout_warm)
    report["layout_verdict_cold"] = layout_verdict(layout_cold)

    n = args.cores
    print(
        f"\n{report['machine']}; {args.images} {args.width}x{args.height} JPEGs, {APPLICATION} "
        f"({report['model']['model_bytes'] / 2**20:.0f} MB .keras), batch {args.batch_size}, "
        f"{args.fetch_threads} GET threads per task; run took {report['seconds']:.0f} s"
    )
    print(
        f"ceiling: model calls 1 proc x {n} threads {c['model_rate_1proc']:.1f}/s, {n} procs x 1 thread "
        f"{c[f'model_rate_{n}proc']:.1f}/s -> {c['ceiling']:.1f} images/s "
        f"on {args.ceiling_images} decoded photos (GET + decode alone: {c['fetch_decode_rate']:.0f} images/s)"
    )
    names = {"tasks": f"job tasks: local[{n}], task.cpus=1", "one-task": f"job one-task: local[{n}], task.cpus={n}"}
    for layout in LAYOUTS:
        for i, r in enumerate(jobs[layout]):
            print(
                f"{names[layout]} round {i + 1}: cold {r['cold']['rate']:.1f} images/s ({r['cold']['seconds']:.1f} s), "
                f"warm {r['warm']['rate']:.1f} images/s ({r['warm']['seconds']:.1f} s); task cpus seen {r['task_cpus']}"
            )
    print(
        f"predict_batch_udf local[{n}], task.cpus=1: cold {pb['cold']['rate']:.1f} images/s "
        f"({pb['cold']['seconds']:.1f} s), warm {pb['warm']['rate']:.1f} images/s ({pb['warm']['seconds']:.1f} s)"
    )
    for name, value in ratios.items():
        shown = ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else f"{value:.3f}"
        print(f"  {name}: {shown}")
    print(
        f"  goal job/ceiling >= 0.8 (warm): {'met' if ratios['job_warm_vs_ceiling'] >= 0.8 else 'missed'}; "
        f"goal job/predict_batch_udf >= 1.2 (warm): "
        f"{'met' if ratios['job_vs_predict_batch_udf_warm'] >= 1.2 else 'missed'}"
    )
    print(f"  layout (warm): {report['layout_verdict_warm']}; (cold): {report['layout_verdict_cold']}")
    print(f"load average: before {report['load']['before']}, after {report['load']['after']}; per step {report['load']}")
    if args.json_out:
        _harness.write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
