"""IDX files: parsing, and gzip streams bounded by what their header says (decompression bombs)."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from sparktf import idx, storage
from sparktf.jobs import prepare_data

DIGITS = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)


def gzip_bomb(shape: tuple[int, ...], zeros_mib: int) -> bytes:
    """A valid IDX header for ``shape`` followed by ``zeros_mib`` MiB of zeros, gzipped (streamed: the
    whole thing is never in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape))]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(zeros_mib)]
    return b"".join(parts) + compressor.flush()


def peak_bytes_of(action) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        action()
        failure = None
    except Exception as err:  # noqa: BLE001 - returned for the test to check
        failure = err
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, failure


def test_idx_round_trips_plain_gzipped_and_in_several_members():
    raw = idx.encode_idx(DIGITS)
    for data in (raw, gzip.compress(raw), gzip.compress(raw[:3]) + gzip.compress(raw[3:])):
        parsed = idx.parse_idx(data)
        assert parsed.shape == (5, 28, 28)
        assert (parsed == DIGITS).all()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (gzip.compress(idx.encode_idx(DIGITS))[:-20], "ends before its last member"),
        (gzip.compress(idx.encode_idx(DIGITS)) + b"junk", "bad gzip stream"),
        (gzip.compress(idx.encode_idx(DIGITS)[:-1]), "expected 3920 data bytes for shape (5, 28, 28), found 3919"),
        (gzip.compress(b"\x89PNG not an idx file"), "bad magic number"),
        (b"\x00\x00\x08\x03garbage", "truncated header"),
    ],
)
def test_bad_content_is_an_idx_error_with_its_reason(data, reason):
    with pytest.raises(idx.IdxError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        idx.parse_idx(data)


def test_a_gzip_bomb_is_refused_without_being_decompressed():
    bomb = gzip_bomb((1, 28, 28), zeros_mib=512)  # 512 MiB behind a header that promises 800 bytes
    assert len(bomb) < 1 << 20
    peak, failure = peak_bytes_of(lambda: idx.parse_idx(bomb))
    assert isinstance(failure, idx.IdxError)
    assert "decompresses to more than the 800 bytes its header's shape (1, 28, 28) needs" in str(failure)
    assert peak < 4 << 20, peak


def test_a_header_larger_than_the_limit_is_refused_up_front():
    huge = gzip_bomb((4_000_000_000, 28, 28), zeros_mib=64)
    peak, failure = peak_bytes_of(lambda: idx.parse_idx(huge))
    assert isinstance(failure, idx.IdxError)
    assert "more than the limit of" in str(failure)
    assert peak < 1 << 20, peak
    with pytest.raises(idx.IdxError, match=r"needs 3936 bytes, more than the limit of 1000"):
        idx.parse_idx(gzip.compress(idx.encode_idx(DIGITS)), max_bytes=1000)


def test_a_bomb_among_the_raw_files_is_set_aside_as_corrupt(s3_prefix):
    images, labels = s3_prefix + "/raw/t10k-images-idx3-ubyte.gz", s3_prefix + "/raw/t10k-labels-idx1-ubyte.gz"
    storage.write_bytes(images, gzip_bomb((5, 28, 28), zeros_mib=256))
    storage.write_bytes(labels, gzip.compress(idx.encode_idx(np.arange(5, dtype=np.uint8))))
    bucket = storage.parse_uri(s3_prefix).bucket
    unit = {
        "kind": "idx",
        "bucket": bucket,
        "images_key": storage.parse_uri(images).key,
        "labels_key": storage.parse_uri(labels).key,
        "start": 0,
        "stop": 5,
        "source_split": "test",
    }
    [row] = prepare_data.decode_units(iter([unit]), height=28, width=28, channels=1, fetch_threads=1, max_pixels=10**6)
    assert row["pixels"] is None
    assert row["error"].startswith("corrupt_idx: the gzip stream decompresses to more than")
