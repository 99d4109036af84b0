"""The incoming side of batch inference: what a date's folder of images holds, and how its keys
are dealt to Spark tasks.

Images land under ``<incoming-uri>/<YYYY-MM-DD>/`` (nested folders allowed). The driver (or the
DAG's ``find_new_images`` task) lists the date's objects once (:func:`scan_partition`), and the
job deals the sorted keys into tasks (:func:`plan_tasks`, :func:`assign_keys`). What is done with
the scores, and how a partition of predictions is published and read, is :mod:`sparktf.predictions`.

Light: the DAG imports this; nothing heavy is imported.
"""

from __future__ import annotations

from sparktf import storage
from sparktf.predictions import partition_uri


def scan_partition(incoming_uri: str, date: str, s3=None) -> tuple[list[dict], int]:
    """Every object of a date partition (nested folders included), sorted by key, and how many
    folder markers were skipped.

    A folder marker is an empty object whose key ends in ``/`` (consoles and some tools create
    them): it is not an image and is only counted. An object whose key ends in ``/`` but that
    has content is listed like any other (scored, or set aside with its reason): nothing that
    carries bytes vanishes unaccounted. Everything else is listed whatever its name or
    extension (content decides what it is when it is decoded).

    Returns:
        ``([{"key", "size", "etag", "last_modified"}], markers_skipped)``.
    """
    prefix = partition_uri(incoming_uri, date)
    objects, markers = [], 0
    for obj in storage.iter_objects(prefix, s3):
        if obj["key"].endswith("/") and obj["size"] == 0:
            markers += 1
        else:
            objects.append(obj)
    return sorted(objects, key=lambda o: o["key"]), markers


def list_partition(incoming_uri: str, date: str, s3=None) -> list[dict]:
    """The objects of :func:`scan_partition` (folder markers left out)."""
    return scan_partition(incoming_uri, date, s3)[0]


def assign_keys(keys: list[str], num_tasks: int) -> list[list[str]]:
    """Deal sorted keys round-robin into ``num_tasks`` groups (deterministic, balanced)."""
    num_tasks = max(1, min(int(num_tasks), len(keys))) if keys else 1
    return [keys[i::num_tasks] for i in range(num_tasks)]


def plan_tasks(num_keys: int, slots: int, max_keys_per_task: int) -> int:
    """Number of Spark tasks: a multiple of the slots, each task at most ``max_keys_per_task``."""
    if num_keys <= 0:
        return 1
    slots = max(1, int(slots))
    rounds = -(-num_keys // (slots * max(1, int(max_keys_per_task))))
    return max(1, min(num_keys, slots * rounds))
