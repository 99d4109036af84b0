"""Prepare a labelled image data set for tuning: decode, normalise, split, write shards + manifest.

Reads raw labelled images from object storage in either layout (both may be mixed):

* ImageFolder: ``<input>/<label>/<any/nested/file>`` (PNG, JPEG, ...: content decides);
* MNIST IDX pairs: ``<stem>-images-idx3-ubyte[.gz]`` + ``<stem>-labels-idx1-ubyte[.gz]``. A
  pair whose stem says ``t10k``/``test`` keeps its role as the test set (MNIST's official split).

Decoding happens on the executors. The split is stratified and deterministic for a seed. Corrupt
images are listed in the manifest with their reason; they do not fail the job. Only content
decides "corrupt": a file the store fails to serve (after the storage layer's retries) fails the
task, and the job if Spark's retries fail too, so a lost ``t10k`` file can never turn into a test
set carved out of the training images.

Usage::

    spark-submit --py-files sparktf.zip jobs/prepare_data.py \\
        --input-uri s3://bucket/datasets/mnist-demo/ \\
        --output-uri s3://bucket/runs/<run>/prepared/ \\
        --result-uri s3://bucket/runs/<run>/_results/prepare_data.json
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections.abc import Iterator
from typing import Any

from sparktf import backbones, dataset, fetch, idx, job, knobs, storage

log = job.log
IDX_CHUNK = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input-uri", required=True, help="S3 prefix of the raw data set")
    parser.add_argument("--output-uri", required=True, help="S3 prefix to write the prepared data set to")
    parser.add_argument("--result-uri", default=None, help="S3 URI for the job's JSON summary")
    knobs.add_arguments(parser, "prepare_data")
    parser.add_argument("--image-height", type=int, default=28, help="height images are resized to")
    parser.add_argument("--image-width", type=int, default=28, help="width images are resized to")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 (grayscale) or 3 (RGB)")
    parser.add_argument("--rows-per-shard", type=int, default=20_000, help="target rows per Parquet shard")
    parser.add_argument("--fetch-threads", type=int, default=16, help="concurrent GETs per task")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="decompression-bomb limit per image")
    parser.add_argument("--resize-policy", default="resize", choices=("resize", "center_crop"), help="how images of another size are brought to it")
    parser.add_argument("--models-uri", default="", help="S3 prefix of the model registry (with --backbone: decode to its recorded input)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Planning (driver): which objects make up the data set
# ---------------------------------------------------------------------------------------------


def plan_units(input_uri: str, keys: list[str], s3=None) -> tuple[list[dict], list[dict]]:
    """Turn the listed keys into work units for the executors.

    Returns:
        ``(units, skipped)``: units are ``{"kind": "image"|"idx", ...}``; skipped are keys that are
        neither an image under a label folder nor part of an IDX pair, with the reason.
    """
    prefix = storage.parse_uri(input_uri).as_prefix().key
    pairs, unpaired = idx.pair_idx_keys([k for k in keys if idx.is_idx_key(k)])
    units: list[dict] = []
    skipped = [{"key": k, "reason": "idx_unpaired"} for k in unpaired]
    bucket = storage.parse_uri(input_uri).bucket
    for stem, images_key, labels_key in pairs:
        name = stem.rsplit("/", 1)[-1].lower()
        source_split = "test" if ("t10k" in name or "test" in name) else None
        try:
            labels = read_idx(bucket, labels_key, s3)
        except idx.IdxError as err:
            skipped.append({"key": labels_key, "reason": f"corrupt_idx: {err}"})
            continue
        for start in range(0, len(labels), IDX_CHUNK):
            units.append(
                {
                    "kind": "idx",
                    "bucket": bucket,
                    "images_key": images_key,
                    "labels_key": labels_key,
                    "start": start,
                    "stop": min(len(labels), start + IDX_CHUNK),
                    "source_split": source_split,
                }
            )
    for key in keys:
        if idx.is_idx_key(key) or key.endswith("/"):
            continue
        rel = key[len(prefix) :]
        parts = rel.split("/")
        if len(parts) < 2 or not parts[0]:
            skipped.append({"key": key, "reason": "not_in_label_folder"})
            continue
        if parts[-1].startswith(".") or parts[-1].startswith("_"):
            continue  # hidden or marker files (e.g. _SUCCESS, .DS_Store)
        units.append({"kind": "image", "bucket": bucket, "key": key, "label_name": parts[0]})
    return units, skipped


# ---------------------------------------------------------------------------------------------
# Decoding (executors)
# ---------------------------------------------------------------------------------------------


def decode_units(
    units: Iterator[dict], *, height: int, width: int, channels: int, fetch_threads: int, max_pixels: int, resize_policy: str = "resize"
) -> Iterator[dict]:
    """Decode a partition's units into rows ``{id, label_name, pixels, source_split, error}``."""
    units = list(units)
    s3 = storage.client()
    images = [u for u in units if u["kind"] == "image"]
    label_of = {u["key"]: u["label_name"] for u in images}
    for bucket in sorted({u["bucket"] for u in images}):
        keys = [u["key"] for u in images if u["bucket"] == bucket]
        for key, array, reason, detail in fetch.fetch_decoded(
            bucket,
            keys,
            height=height,
            width=width,
            channels=channels,
            max_pixels=max_pixels,
            fetch_threads=fetch_threads,
            resize_policy=resize_policy,
            s3=s3,
        ):
            yield {
                "id": key,
                "label_name": label_of[key],
                "source_split": None,
                "pixels": None if array is None else array.tobytes(),
                "error": None if array is not None else (f"{reason}: {detail}" if detail else reason),
            }

    for unit in (u for u in units if u["kind"] == "idx"):
        yield from _decode_idx_unit(unit, s3, height=height, width=width, channels=channels)


def read_idx(bucket: str, key: str, s3=None):
    """An IDX file's array.

    Raises:
        idx.IdxError: the content is not a valid IDX file (the only reason to call it corrupt).
        storage.StorageError: the store failed to serve it (after every retry): never "corrupt";
            the task fails (Spark retries it) and, if it keeps failing, the job.
    """
    uri = storage.object_uri(bucket, key)
    try:
        data = storage.read_bytes(uri, s3)
    except storage.StorageError as err:
        raise type(err)(
            f"{uri} could not be read ({err}); a file the store fails to serve is not set aside as corrupt: check the store and run the job again"
        ) from err
    return idx.parse_idx(data)


def _decode_idx_unit(unit: dict, s3, *, height: int, width: int, channels: int) -> Iterator[dict]:
    import numpy as np
    from PIL import Image

    try:
        images = read_idx(unit["bucket"], unit["images_key"], s3)
        labels = read_idx(unit["bucket"], unit["labels_key"], s3)
        if images.ndim != 3 or len(images) != len(labels):
            raise idx.IdxError(f"images {images.shape} do not match labels {labels.shape}")
    except idx.IdxError as err:  # content only: the whole pair is set aside, with its reason
        yield {"id": unit["images_key"], "label_name": "", "source_split": None, "pixels": None, "error": f"corrupt_idx: {err}"}
        return
    for index in range(unit["start"], unit["stop"]):
        image = images[index]
        if image.shape != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        if channels == 3:
            image = np.repeat(image[:, :, None], 3, axis=2)
        yield {
            "id": f"{unit['images_key']}#{index:06d}",
            "label_name": str(int(labels[index])),
            "source_split": unit["source_split"],
            "pixels": np.ascontiguousarray(image, np.uint8).tobytes(),
            "error": None,
        }


# ---------------------------------------------------------------------------------------------
# Pure DataFrame transforms
# ---------------------------------------------------------------------------------------------


def sort_label_names(names: list[str]) -> list[str]:
    """Numeric label names sort as numbers ("2" < "10"), others alphabetically."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def transform_split(df, *, validation_fraction: float, test_fraction: float, seed: int):
    """Add a ``split`` column: a stratified, deterministic train/validation/test assignment.

    Within each class, rows are ordered by a seeded hash of their id; the first
    ``round(n * test_fraction)`` go to test, the next ``round(n * validation_fraction)`` to
    validation, the rest to train. Rows whose source marks them as test (MNIST's t10k files) stay
    in test, and the other rows of such a data set are split into train and validation only.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    has_source_test = df.where(F.col("source_split") == "test").limit(1).count() > 0
    pool = df.where(F.col("source_split").isNull() | (F.col("source_split") != "test"))
    window = Window.partitionBy("label").orderBy(F.xxhash64(F.col("id"), F.lit(seed)), F.col("id"))
    counted = pool.withColumn("_rank", F.row_number().over(window) - 1).withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy("label")))
    test_n = F.lit(0) if has_source_test else F.round(F.col("_n") * F.lit(test_fraction))
    val_n = F.round(F.col("_n") * F.lit(validation_fraction))
    split = F.when(F.col("_rank") < test_n, F.lit("test")).when(F.col("_rank") < test_n + val_n, F.lit("validation")).otherwise(F.lit("train"))
    assigned = counted.withColumn("split", split).drop("_rank", "_n")
    source_test = df.where(F.col("source_split") == "test").withColumn("split", F.lit("test"))
    return assigned.unionByName(source_test)


def transform_shards(df, shards_per_split: dict[str, int]):
    """Add a ``shard`` column: a hash of the id modulo the split's shard count (deterministic)."""
    from pyspark.sql import functions as F

    expr = F.lit(0)
    for split, count in shards_per_split.items():
        expr = F.when(F.col("split") == split, F.pmod(F.xxhash64("id"), F.lit(max(1, count)))).otherwise(expr)
    return df.withColumn("shard", expr.cast("int"))


# ---------------------------------------------------------------------------------------------
# Writing (executors write their shards; the driver writes the manifest last)
# ---------------------------------------------------------------------------------------------


def _write_partition(output_uri: str):
    def write(rows: Iterator) -> Iterator[dict]:
        groups: dict[tuple[str, int], list[dict]] = {}
        for row in rows:
            groups.setdefault((row["split"], row["shard"]), []).append(row.asDict())
        s3 = storage.client()
        for (split, shard), members in sorted(groups.items()):
            members.sort(key=lambda r: r["id"])
            name = f"{split}/part-{shard:05d}.parquet"
            storage.write_bytes(storage.join_uri(output_uri, name), dataset.shard_bytes(members), s3)
            yield {"split": split, "shard": name, "count": len(members)}

    return write


def split_sha256(digests: list, split: str, label_names: list[str]) -> str:
    """A split's identity by content: the sha256 of its sorted ``label name, pixels' sha1`` lines.

    The same images with the same labels give the same hash whatever their keys, the seed or the
    other splits (MNIST's t10k file stays one test split); another draw of the split does not.

    Args:
        digests: rows with ``label`` (index into ``label_names``), ``split`` and ``d`` (pixels' sha1).
    """
    lines = sorted(f"{label_names[row['label']]}\t{row['d']}\n" for row in digests if row["split"] == split)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def run(spark, args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the data set; returns the job result (also summarised in the manifest)."""
    from pyspark.sql import functions as F

    s3 = storage.client()
    backbone = backbones.apply_backbone_input(args, s3) if args.backbone else None  # its input size, channels, resize policy
    units, skipped = list_units(args.input_uri, s3)
    rows = decode_rows(spark, units, args).cache()
    rejected = [{"key": r["id"], "reason": r["error"]} for r in rows.where(F.col("error").isNotNull()).select("id", "error").orderBy("id").collect()]
    valid = rows.where(F.col("error").isNull()).drop("error")
    label_names = sort_label_names([r[0] for r in valid.select("label_name").distinct().collect()])
    if len(label_names) < 2:
        raise ValueError(f"need at least 2 classes, found {label_names} under {args.input_uri}")
    label_index = spark.createDataFrame([(n, i) for i, n in enumerate(label_names)], "label_name string, label int")
    labelled = valid.join(F.broadcast(label_index), "label_name").drop("label_name")
    split = transform_split(labelled, validation_fraction=args.validation_fraction, test_fraction=args.test_fraction, seed=args.seed).cache()

    counts = {(r["split"], r["label"]): r["count"] for r in split.groupBy("split", "label").count().collect()}
    split_totals, shards_per_split = plan_shards(counts, args.rows_per_shard)
    storage.delete_prefix(storage.parse_uri(args.output_uri).as_prefix().uri, s3)  # re-runs start clean
    written = (
        transform_shards(split, shards_per_split)
        .repartition(sum(shards_per_split.values()), "split", "shard")
        .rdd.mapPartitions(_write_partition(args.output_uri))
        .collect()
    )
    digests = sorted(split.select("id", "label", "split", F.sha1("pixels").alias("d")).collect())

    manifest = build_manifest(
        args, label_names, counts, split_totals, written, content_sha256(digests), split_sha256(digests, "test", label_names), rejected, skipped
    )
    manifest.update(resize_policy=args.resize_policy, backbone=backbone)
    manifest_uri = storage.join_uri(args.output_uri, dataset.MANIFEST_NAME)
    storage.write_json(manifest_uri, manifest, s3)
    return job_result(args.output_uri, manifest_uri, manifest)


def list_units(input_uri: str, s3=None) -> tuple[list[dict], list[dict]]:
    """List the raw data set and plan its work units (:func:`plan_units`); refuse an unusable one."""
    keys = storage.list_keys(storage.parse_uri(input_uri).as_prefix().uri, s3)
    if not keys:
        raise FileNotFoundError(f"no objects under {input_uri}: upload the raw data set first")
    units, skipped = plan_units(input_uri, keys, s3)
    if not units:
        raise ValueError(f"nothing usable under {input_uri}: expected <label>/<image> files or MNIST IDX pairs; skipped {skipped[:5]}")
    log.info("preparing %d work units from %d objects", len(units), len(keys))
    return units, skipped


def decode_rows(spark, units: list[dict], args: argparse.Namespace):
    """The decoded rows ``id, label_name, source_split, pixels, error``, decoded on the executors."""
    from pyspark.sql import types as T

    sc = spark.sparkContext
    num_slices = max(1, min(len(units), sc.defaultParallelism * 4))
    decoded = sc.parallelize(units, num_slices).mapPartitions(
        lambda part: decode_units(
            part,
            height=args.image_height,
            width=args.image_width,
            channels=args.channels,
            fetch_threads=args.fetch_threads,
            max_pixels=args.max_pixels,
            resize_policy=args.resize_policy,
        )
    )
    schema = T.StructType(
        [
            T.StructField("id", T.StringType(), False),
            T.StructField("label_name", T.StringType(), True),
            T.StructField("source_split", T.StringType(), True),
            T.StructField("pixels", T.BinaryType(), True),
            T.StructField("error", T.StringType(), True),
        ]
    )
    return spark.createDataFrame(decoded.map(lambda r: (r["id"], r["label_name"], r["source_split"], r["pixels"], r["error"])), schema)


def plan_shards(counts: dict[tuple[str, int], int], rows_per_shard: int) -> tuple[dict[str, int], dict[str, int]]:
    """``(rows per split, shards per split)`` from the rows per ``(split, label)``."""
    split_totals = {s: sum(c for (sp, _), c in counts.items() if sp == s) for s in dataset.SPLITS}
    return split_totals, {s: max(1, math.ceil(n / rows_per_shard)) for s, n in split_totals.items()}


def content_sha256(digests: list) -> str:
    """The data set's identity: sha256 over its sorted ``(id, label, split, sha1 of pixels)`` rows."""
    content = hashlib.sha256()
    for row in digests:
        content.update(f"{row['id']}\t{row['label']}\t{row['split']}\t{row['d']}\n".encode())
    return content.hexdigest()


def build_manifest(
    args: argparse.Namespace,
    label_names: list[str],
    counts: dict[tuple[str, int], int],
    split_totals: dict[str, int],
    written: list[dict],
    content: str,
    test_split: str,
    rejected: list[dict],
    skipped: list[dict],
) -> dict[str, Any]:
    """The prepared data set's manifest (written last, after every shard). ``content`` is
    :func:`content_sha256`, ``test_split`` the test split's :func:`split_sha256`."""
    return {
        "format": dataset.MANIFEST_FORMAT,
        "source_uri": args.input_uri,
        "image_shape": [args.image_height, args.image_width, args.channels],
        "label_names": label_names,
        "num_classes": len(label_names),
        "seed": args.seed,
        "fractions": {"validation": args.validation_fraction, "test": args.test_fraction},
        "splits": {
            s: {
                "count": split_totals[s],
                "per_class": {label_names[label]: c for (sp, label), c in sorted(counts.items()) if sp == s},
                "shards": sorted(w["shard"] for w in written if w["split"] == s),
            }
            for s in dataset.SPLITS
        },
        "content_sha256": content,
        "test_split_sha256": test_split,
        "rejected": rejected,
        "skipped": skipped,
    }


def job_result(output_uri: str, manifest_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The job's JSON result: where the data set is and what it holds."""
    return {
        "prepared_uri": storage.parse_uri(output_uri).as_prefix().uri,
        "manifest_uri": manifest_uri,
        "counts": {s: manifest["splits"][s]["count"] for s in dataset.SPLITS},
        "num_classes": manifest["num_classes"],
        "image_shape": manifest["image_shape"],
        "rejected": len(manifest["rejected"]),
        "skipped": len(manifest["skipped"]),
        "content_sha256": manifest["content_sha256"],
    }


def main(argv: list[str] | None = None) -> int:
    return job.run_spark_job("prepare_data", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
