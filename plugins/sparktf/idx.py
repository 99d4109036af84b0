"""Reader for the IDX format in which MNIST (and Fashion-MNIST, EMNIST, ...) is distributed."""

from __future__ import annotations

import math
import re
import struct
import zlib

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_PATTERN = re.compile(r"^(?P<stem>.+)-images[-.]idx3-ubyte(?:\.gz)?$")
LABELS_PATTERN = re.compile(r"^(?P<stem>.+)-labels[-.]idx1-ubyte(?:\.gz)?$")


# Largest IDX file (decompressed) accepted: 4x EMNIST's largest (about 550 MB), far below what a
# driver or executor can hold twice.
DEFAULT_MAX_BYTES = 2 << 30
_GUNZIP_STEP = 1 << 20  # decompressed bytes per step once the header is known
_MAX_HEADER = 4 + 4 * 255  # magic, type, rank and up to 255 dimensions


class IdxError(ValueError):
    """The bytes are not a valid IDX file."""


def parse_idx(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Parse IDX bytes (gzip-compressed or not) into an array of the recorded shape.

    A gzip stream is decompressed step by step, never past the size its header's shape needs (nor
    ``max_bytes``): a decompression bomb is refused at most a megabyte past that size.

    Raises:
        IdxError: on a bad magic number, an unknown type, a size that does not match the header,
            a header larger than ``max_bytes``, or a bad gzip stream.
    """
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_bounded(data, max_bytes)
    header = _header(data, max_bytes)
    if header is None:
        raise IdxError("truncated header" if len(data) >= 4 else "bad magic number (not an IDX file)")
    dtype, shape, header_end, total = header
    if len(data) != total:
        raise IdxError(f"expected {total - header_end} data bytes for shape {shape}, found {len(data) - header_end}")
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape)


def _header(data: bytes | bytearray, max_bytes: int) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """``(dtype, shape, header size, file size)`` from the first bytes, or None while they are too few.

    Raises:
        IdxError: a bad magic number or type, or a shape larger than ``max_bytes``.
    """
    if len(data) >= 2 and (data[0] != 0 or data[1] != 0):
        raise IdxError("bad magic number (not an IDX file)")
    if len(data) < 4:
        return None
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _DTYPES or ndim == 0:
        raise IdxError(f"unknown IDX type 0x{dtype_code:02x} or rank {ndim}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        return None
    shape = struct.unpack(f">{ndim}I", bytes(data[4:header_end]))
    dtype = np.dtype(_DTYPES[dtype_code])
    total = header_end + math.prod(shape) * dtype.itemsize
    if total > max_bytes:
        raise IdxError(f"its header's shape {shape} needs {total} bytes, more than the limit of {max_bytes}")
    return dtype, shape, header_end, total


def _gunzip_bounded(data: bytes, max_bytes: int) -> bytearray:
    """Decompress every gzip member, stopping one byte past what the IDX header says the file holds."""
    out = bytearray()
    pending = data
    header, limit = None, max_bytes
    try:
        while pending:  # one gzip member per round (as gzip.decompress, members may be concatenated)
            member = zlib.decompressobj(wbits=31)
            while not member.eof:
                step = _GUNZIP_STEP if header else _MAX_HEADER  # the header first, then the size it allows
                chunk = member.decompress(pending, min(step, limit - len(out) + 1))
                pending = member.unconsumed_tail
                out += chunk
                header = header or _header(out, max_bytes)
                limit = header[3] if header else max_bytes
                if len(out) > limit:
                    what = f"the {limit} bytes its header's shape {header[1]} needs" if header else f"{limit} bytes"
                    raise IdxError(f"the gzip stream decompresses to more than {what} (a decompression bomb?)")
                if not chunk and not pending:
                    raise IdxError("bad gzip stream: it ends before its last member does (truncated)")
            pending = member.unused_data
    except zlib.error as err:
        raise IdxError(f"bad gzip stream: {err}") from None
    return out


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
