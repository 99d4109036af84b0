"""CPU cost of the batch inference job per image, against the sum of its stages' own CPU costs:
a speed figure that does not depend on how fast the local S3 server (moto) answers.

Setup: ``--images`` MNIST t10k digits from the demo subset (``data/demo/mnist``, repeated if
more are asked for) uploaded as PNG files to a private moto server on 127.0.0.1, under
``incoming/<date>/``; an untrained ``--family`` model registered as champion (the cost of a
forward pass does not depend on the weights).

* **job**: ``sparktf.jobs.batch_inference.run`` in ``local[--slots]`` in this process, twice in
  the same SparkSession: ``cold`` (Python workers start, import TensorFlow, load the model) and
  ``warm`` (reused workers, model cached). CPU = user + system seconds of this process (the
  PySpark driver) and of the Spark JVM with every process under it (the Python workers and
  their daemon), read with psutil before and after ``run``. The S3 server is a separate process
  outside that tree: its CPU is not counted.
* **stages**: the same work done by hand, one stage at a time, in this one process with
  TensorFlow on one thread: GET every object (boto3 client side), decode every image,
  call the model once per ``--batch-size`` batch, then top-k, Parquet encoding and the staged
  PUTs of the job's task groups. CPU = ``time.process_time`` of each stage. Loading the model
  once is reported apart.

Prints CPU seconds per image for the job (cold and warm) and for each stage, and the ratio
job (warm) / sum of stages: the share of CPU the job spends beyond the work itself (Spark
scheduling, serialization, JVM, thread pools). Nothing is asserted. Runs in under two minutes
with the defaults.

Usage::

    python bench/bench_inference_cpu.py                      # 2,000 images, mnist_cnn, local[2]
    python bench/bench_inference_cpu.py --images 500 --family mlp
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import tempfile
import time

from _harness import load_average, machine, write_json

from sparktf_dev import testing

DATE = "2026-11-20"
MODEL_NAME = "bench-cpu"
BUCKET = "sparktf-bench-cpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="digits uploaded as PNG")
    p.add_argument("--family", default="mnist_cnn", choices=("mnist_cnn", "mlp"), help="model family")
    p.add_argument("--hidden-units", type=int, default=1024, help="hidden units of the model")
    p.add_argument("--slots", type=int, default=2, help="Spark task slots (local[N])")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call")
    p.add_argument("--fetch-threads", type=int, default=16, help="concurrent GETs per task")
    p.add_argument("--json-out", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def cpu_seconds(process) -> float:
    """User + system CPU of a process, its reaped children included."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def tree_cpu(root_pid: int) -> dict[int, float]:
    """CPU seconds of a process and every process under it, by pid."""
    import psutil

    root = psutil.Process(root_pid)
    found = {}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            found[process.pid] = cpu_seconds(process)
    return found


def measured_job(spark, job_args) -> dict:
    """Run the job once; its wall time and the CPU of the driver and of the JVM tree."""
    import psutil

    from sparktf.jobs import batch_inference

    jvm_pid = spark.sparkContext._gateway.proc.pid
    me = psutil.Process()
    driver_before, tree_before = cpu_seconds(me), tree_cpu(jvm_pid)
    started = time.perf_counter()
    result = batch_inference.run(spark, job_args)
    wall = time.perf_counter() - started
    driver = cpu_seconds(me) - driver_before
    tree_after = tree_cpu(jvm_pid)
    # A process that started during the run counts whole; one that ended was reaped by its parent.
    jvm_tree = sum(after - tree_before.get(pid, 0.0) for pid, after in tree_after.items())
    return {
        "wall_seconds": wall,
        "driver_cpu": driver,
        "jvm_and_workers_cpu": jvm_tree,
        "cpu": driver + jvm_tree,
        "scored": result["scored"],
        "tasks": result["tasks"],
    }


def register_model(args, models_uri: str) -> None:
    from sparktf import executor, models, registry

    executor.pin_threads(1)
    import keras

    keras.utils.set_random_seed(0)
    model = models.build_model(args.family, (28, 28, 1), 10, hidden_units=args.hidden_units)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
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


def stage_costs(args, ws: str) -> dict:
    """CPU seconds of each stage of the job's work, done by hand in this process."""
    import numpy as np

    from sparktf import images, incoming, predictions, registry, scoring, storage

    objects = incoming.list_partition(ws + "/incoming/", DATE)
    uris = [storage.object_uri(BUCKET, o["key"]) for o in objects]
    s3 = storage.client()
    costs: dict[str, float] = {}

    started = time.process_time()
    payloads = [storage.read_bytes(uri, s3) for uri in uris]
    costs["get"] = time.process_time() - started

    started = time.process_time()
    arrays = [images.decode_image(data) for data in payloads]
    costs["decode"] = time.process_time() - started

    metadata = registry.resolve(ws + "/models/", MODEL_NAME)
    started = time.process_time()
    model = registry.load_verified_model(metadata["model_uri"], metadata["model_sha256"])
    costs["model_load_once"] = time.process_time() - started
    batches = [np.stack(arrays[i : i + args.batch_size]) for i in range(0, len(arrays), args.batch_size)]
    scoring.predict_batch(model, batches[0])  # the first call traces the graph: not per-image work
    started = time.process_time()
    probabilities = np.concatenate([scoring.predict_batch(model, batch) for batch in batches])
    costs["model"] = time.process_time() - started

    keys = [o["key"] for o in objects]
    groups = incoming.assign_keys(keys, incoming.plan_tasks(len(keys), args.slots, 2000))
    row_of = {key: i for i, key in enumerate(keys)}
    stamp = dt.datetime(2026, 11, 21, tzinfo=dt.UTC)
    started = time.process_time()
    for index, group in enumerate(groups):
        order, scores = scoring.top_k(probabilities[[row_of[k] for k in group]], 5)
        rows = [
            {
                "key": key,
                "predicted_label": str(order[r, 0]),
                "score": float(scores[r, 0]),
                "top_k": [{"label": str(c), "score": float(s)} for c, s in zip(order[r], scores[r])],
            }
            for r, key in enumerate(group)
        ]
        part = predictions.predictions_parquet(rows, model_name=MODEL_NAME, model_version=1, partition_date=DATE, processed_at=stamp)
        storage.write_bytes(f"s3://{BUCKET}/stages/part-{index:05d}.parquet", part, s3)
        storage.write_bytes(f"s3://{BUCKET}/stages/_errors/part-{index:05d}.parquet", predictions.errors_parquet([], partition_date=DATE), s3)
    costs["output"] = time.process_time() - started
    return costs


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine()}; load average at start: {load_average()}", flush=True)
    with testing.S3Server(log_path=os.path.join(tempfile.gettempdir(), "sparktf-bench-cpu-moto.log")):
        from sparktf import images, storage
        from sparktf.jobs import batch_inference

        storage.create_bucket(BUCKET)
        ws = f"s3://{BUCKET}/ws"
        _tx, _ty, test_x, _test_y = testing.read_mnist()
        for n in range(args.images):
            storage.write_bytes(f"{ws}/incoming/{DATE}/img-{n:06d}.png", images.encode_png(test_x[n % len(test_x)]))
        register_model(args, ws + "/models/")

        spark = testing.local_spark(args.slots, "sparktf-bench-cpu")
        job = {}
        try:
            for run in ("cold", "warm"):
                job_args = batch_inference.parse_args(
                    [
                        "--incoming-uri",
                        ws + "/incoming/",
                        "--output-uri",
                        ws + "/predictions/",
                        "--date",
                        DATE,
                        "--models-uri",
                        ws + "/models/",
                        "--model-name",
                        MODEL_NAME,
                        "--attempt-id",
                        run,
                        "--batch-size",
                        str(args.batch_size),
                        "--fetch-threads",
                        str(args.fetch_threads),
                    ]
                )
                job[run] = measured_job(spark, job_args)
                print(
                    f"job {run}: {job[run]['wall_seconds']:.1f} s wall, {job[run]['cpu']:.1f} CPU s "
                    f"(driver {job[run]['driver_cpu']:.1f}, JVM + Python workers "
                    f"{job[run]['jvm_and_workers_cpu']:.1f})",
                    flush=True,
                )
        finally:
            spark.stop()
        stages = stage_costs(args, ws)

    n = args.images
    per_image = {name: seconds / n * 1e3 for name, seconds in stages.items() if name != "model_load_once"}
    floor = sum(per_image.values())
    print(f"\nCPU milliseconds per image ({n} images, {args.family}, local[{args.slots}], batch {args.batch_size}):")
    for run in ("cold", "warm"):
        print(f"  job {run:<5}                 {job[run]['cpu'] / n * 1e3:8.3f}")
    for name, ms in per_image.items():
        print(f"  stage {name:<19} {ms:8.3f}")
    print(f"  sum of stages             {floor:8.3f}   (+ {stages['model_load_once']:.2f} CPU s per model load)")
    print(f"job (warm) / sum of stages: {job['warm']['cpu'] / n * 1e3 / floor:.2f}")
    if args.json_out:
        write_json(args.json_out, {"images": n, "family": args.family, "slots": args.slots, "job": job, "stage_cpu_seconds": stages})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
