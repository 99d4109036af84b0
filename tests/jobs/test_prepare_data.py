"""prepare_data job with a local SparkSession and the S3 server: layouts, split, manifest, bad images."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pytest
from PIL import Image

from sparktf import dataset, idx, storage
from sparktf.jobs import prepare_data
from sparktf_dev.faults import FaultProxy, FaultRule, route_storage
from sparktf_dev.testing import upload_mnist

PER_CLASS = 20


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_image_folder(prefix: str, images: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """Upload PER_CLASS digits of each class as <prefix>/<label>/..., plus corrupt files."""
    client = storage.client()
    written = {}
    for label in range(10):
        for n, index in enumerate(np.flatnonzero(labels == label)[:PER_CLASS]):
            # Nested folders, a space and non-ASCII characters in names are all fine.
            name = f"{label}/batch {n % 2}/chiffre-é-{n:03d}.png"
            storage.write_bytes(storage.join_uri(prefix, name), png(images[index]), client)
            written[name] = label
    good = png(images[0])
    storage.write_bytes(storage.join_uri(prefix, "3/truncated.png"), good[: len(good) // 2], client)
    storage.write_bytes(storage.join_uri(prefix, "4/notes.png"), b"not an image at all", client)
    storage.write_bytes(storage.join_uri(prefix, "5/empty.png"), b"", client)
    storage.write_bytes(storage.join_uri(prefix, "README.txt"), b"top-level files are not in a class", client)
    return written


def args_for(input_uri: str, output_uri: str, **overrides) -> object:
    argv = ["--input-uri", input_uri, "--output-uri", output_uri, "--rows-per-shard", "60"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return prepare_data.parse_args(argv)


@pytest.fixture(scope="module")
def image_folder_run(spark, bucket, mnist_subset):
    images, labels = mnist_subset[0], mnist_subset[1]
    raw = f"s3://{bucket}/prepare-folder/raw"
    upload_image_folder(raw, images, labels)
    out = f"s3://{bucket}/prepare-folder/prepared/"
    result = prepare_data.run(spark, args_for(raw, out, validation_fraction=0.2, test_fraction=0.1))
    return raw, out, result, images, labels


def test_counts_and_stratified_split(image_folder_run):
    _raw, out, result, _images, _labels = image_folder_run
    manifest = dataset.read_manifest(out)
    assert result["counts"] == {"train": 140, "validation": 40, "test": 20}
    assert manifest["label_names"] == [str(i) for i in range(10)]
    assert manifest["image_shape"] == [28, 28, 1]
    for split, per_class in (("train", 14), ("validation", 4), ("test", 2)):
        assert manifest["splits"][split]["per_class"] == {str(i): per_class for i in range(10)}
    assert len(manifest["splits"]["train"]["shards"]) == 3  # 140 rows / 60 per shard


def test_corrupt_images_are_listed_not_fatal(image_folder_run):
    _raw, out, result, _images, _labels = image_folder_run
    manifest = dataset.read_manifest(out)
    reasons = {r["key"].rsplit("/", 1)[-1]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"truncated.png", "notes.png", "empty.png"}
    assert reasons["empty.png"].startswith("empty")
    assert reasons["notes.png"].startswith("not_an_image")
    assert reasons["truncated.png"].startswith(("truncated", "corrupt"))
    assert result["rejected"] == 3
    assert [s["reason"] for s in manifest["skipped"]] == ["not_in_label_folder"]


def test_shards_hold_the_decoded_pixels(image_folder_run):
    _raw, out, _result, images, labels = image_folder_run
    x, y = dataset.read_split(out, "test")
    assert x.shape == (20, 28, 28, 1)
    assert sorted(np.bincount(y).tolist()) == [2] * 10
    # Every stored image is byte-identical to one of the source digits of its class.
    for image, label in zip(x, y):
        candidates = images[labels == label][:PER_CLASS]
        assert any(np.array_equal(image[:, :, 0], c) for c in candidates)


def test_rerun_is_deterministic_and_replaces_output(spark, image_folder_run):
    raw, out, result, _images, _labels = image_folder_run
    storage.write_bytes(storage.join_uri(out, "train/stale-part.parquet"), b"left over", storage.client())
    again = prepare_data.run(spark, args_for(raw, out, validation_fraction=0.2, test_fraction=0.1))
    assert again["content_sha256"] == result["content_sha256"]
    assert storage.head(storage.join_uri(out, "train/stale-part.parquet")) is None
    other_seed = prepare_data.run(spark, args_for(raw, out + "seed7/", validation_fraction=0.2, test_fraction=0.1, seed=7))
    assert other_seed["counts"] == result["counts"]
    assert other_seed["content_sha256"] != result["content_sha256"]


def test_mnist_idx_pairs_keep_the_official_test_set(spark, s3_prefix, mnist_subset):
    train_x, train_y, _test_x, test_y = mnist_subset
    client = storage.client()
    raw = s3_prefix + "/mnist"
    upload_mnist(raw, mnist_subset, train_limit=300, test_limit=100)
    # An unpaired and a corrupt pair are reported, not fatal.
    storage.write_bytes(storage.join_uri(raw, "extra-images-idx3-ubyte"), idx.encode_idx(train_x[:5]), client)
    storage.write_bytes(storage.join_uri(raw, "bad-images-idx3-ubyte"), b"\x00\x00\x08\x03garbage", client)
    storage.write_bytes(storage.join_uri(raw, "bad-labels-idx1-ubyte"), idx.encode_idx(train_y[:5]), client)
    out = s3_prefix + "/prepared/"
    result = prepare_data.run(spark, args_for(raw, out, validation_fraction=0.1))
    assert result["counts"]["test"] == 100
    assert result["counts"]["train"] + result["counts"]["validation"] == 300
    assert 25 <= result["counts"]["validation"] <= 35
    x_test, y_test = dataset.read_split(out, "test")
    order = np.argsort(y_test, kind="stable")
    assert sorted(y_test.tolist()) == sorted(test_y[:100].tolist())
    assert x_test.shape == (100, 28, 28, 1)
    assert order.size == 100
    manifest = dataset.read_manifest(out)
    assert any(r["reason"].startswith("corrupt_idx") for r in manifest["rejected"])
    assert any(s["reason"] == "idx_unpaired" for s in manifest["skipped"])


def test_empty_input_fails_with_clear_message(spark, s3_prefix):
    with pytest.raises(FileNotFoundError, match="no objects under"):
        prepare_data.run(spark, args_for(s3_prefix + "/nothing/", s3_prefix + "/out/"))


def test_transform_split_is_stratified_and_seeded(spark):
    from pyspark.sql import functions as F
    from pyspark.testing import assertDataFrameEqual

    rows = [(f"img-{label}-{n:03d}", label, None) for label in range(3) for n in range(50)]
    df = spark.createDataFrame(rows, "id string, label int, source_split string")
    split = prepare_data.transform_split(df, validation_fraction=0.2, test_fraction=0.1, seed=1)
    counts = split.groupBy("label", "split").count()
    expected = spark.createDataFrame(
        [(label, name, n) for label in range(3) for name, n in (("train", 35), ("validation", 10), ("test", 5))],
        "label int, split string, count long",
    )
    assertDataFrameEqual(counts, expected)
    assertDataFrameEqual(split, prepare_data.transform_split(df, validation_fraction=0.2, test_fraction=0.1, seed=1))
    other = prepare_data.transform_split(df, validation_fraction=0.2, test_fraction=0.1, seed=2)

    def test_ids(frame):
        return {row["id"] for row in frame.where(F.col("split") == "test").select("id").collect()}

    assert test_ids(split) != test_ids(other)
    assert len(test_ids(other)) == 15


def test_an_idx_file_the_store_fails_to_serve_fails_the_job_not_the_data(spark, s3_prefix, s3_server, mnist_subset):
    """Every GET of the t10k images is cut mid-body: the job fails, instead of setting the file aside
    as corrupt_idx and carving a test set out of the training images."""
    raw, out = s3_prefix + "/mnist", s3_prefix + "/prepared/"
    upload_mnist(raw, mnist_subset, train_limit=300, test_limit=100)
    images_key = storage.parse_uri(storage.join_uri(raw, "t10k-images-idx3-ubyte.gz")).key
    rule = FaultRule("reset", method="GET", key=f"^{re.escape(images_key)}$")
    with (
        FaultProxy(s3_server.endpoint, rules=[rule]) as proxy,
        route_storage(proxy.settings(s3_server.settings()), spark),
        pytest.raises(Exception, match="TransientStorageError") as failed,
    ):
        prepare_data.run(spark, args_for(raw, out))
    assert "could not be read" in str(failed.value)
    assert "still failing after 5 attempts" in str(failed.value)
    assert proxy.requested[("GET", images_key)] >= storage.READ_ATTEMPTS
    assert storage.head(out + dataset.MANIFEST_NAME) is None  # nothing published


def test_shard_planning_manifest_and_result_are_pure_summaries():
    counts = {("train", 0): 70, ("train", 1): 50, ("validation", 0): 10, ("test", 1): 5}
    totals, shards = prepare_data.plan_shards(counts, rows_per_shard=60)
    assert totals == {"train": 120, "validation": 10, "test": 5}
    assert shards == {"train": 2, "validation": 1, "test": 1}
    assert prepare_data.plan_shards({}, 60) == ({"train": 0, "validation": 0, "test": 0}, {"train": 1, "validation": 1, "test": 1})

    rows = [{"id": "a", "label": 0, "split": "train", "d": "ff"}]
    assert prepare_data.content_sha256(rows) == hashlib.sha256(b"a\t0\ttrain\tff\n").hexdigest()
    args = args_for("s3://b/raw/", "s3://b/out")
    written = [{"split": "train", "shard": "train/part-00001.parquet"}, {"split": "train", "shard": "train/part-00000.parquet"}]
    manifest = prepare_data.build_manifest(args, ["3", "7"], counts, totals, written, "abc", "def", [{"key": "x"}], [])
    assert manifest["splits"]["train"] == {
        "count": 120,
        "per_class": {"3": 70, "7": 50},
        "shards": ["train/part-00000.parquet", "train/part-00001.parquet"],
    }
    assert manifest["num_classes"] == 2
    assert manifest["content_sha256"] == "abc"
    assert manifest["test_split_sha256"] == "def"
    result = prepare_data.job_result("s3://b/out", "s3://b/out/manifest.json", manifest)
    assert result == {
        "prepared_uri": "s3://b/out/",
        "manifest_uri": "s3://b/out/manifest.json",
        "counts": totals,
        "num_classes": 2,
        "image_shape": [28, 28, 1],
        "rejected": 1,
        "skipped": 0,
        "content_sha256": "abc",
    }
