"""Reader for the IDX format in which MNIST (and Fashion-MNIST, EMNIST, ...) is distributed."""

from __future__ import annotations

import gzip
import re
import struct

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_PATTERN = re.compile(r"^(?P<stem>.+)-images[-.]idx3-ubyte(?:\.gz)?$")
LABELS_PATTERN = re.compile(r"^(?P<stem>.+)-labels[-.]idx1-ubyte(?:\.gz)?$")


class IdxError(ValueError):
    """The bytes are not a valid IDX file."""


def parse_idx(data: bytes) -> np.ndarray:
    """Parse IDX bytes (gzip-compressed or not) into an array of the recorded shape.

    Raises:
        IdxError: on a bad magic number, an unknown type or a size that does not match.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise IdxError(f"bad gzip stream: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError("bad magic number (not an IDX file)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _DTYPES or ndim == 0:
        raise IdxError(f"unknown IDX type 0x{dtype_code:02x} or rank {ndim}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise IdxError("truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = np.dtype(_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[header_end:]
    if len(body) != expected:
        raise IdxError(f"expected {expected} data bytes for shape {shape}, found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def pair_idx_keys(keys: list[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Pair ``<stem>-images-idx3-ubyte[.gz]`` with ``<stem>-labels-idx1-ubyte[.gz]`` keys.

    Returns:
        ``([(stem, images_key, labels_key), ...], unpaired_keys)``.
    """
    images, labels = {}, {}
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        folder = key[: len(key) - len(name)]
        if match := IMAGES_PATTERN.match(name):
            images[folder + match["stem"]] = key
        elif match := LABELS_PATTERN.match(name):
            labels[folder + match["stem"]] = key
    pairs = [(stem, images[stem], labels[stem]) for stem in sorted(images) if stem in labels]
    unpaired = sorted([images[s] for s in images if s not in labels] + [labels[s] for s in labels if s not in images])
    return pairs, unpaired


def is_idx_key(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return bool(IMAGES_PATTERN.match(name) or LABELS_PATTERN.match(name))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (used to make small test and demo data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()
