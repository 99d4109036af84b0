"""Progress lines from the driver while a Spark job runs: one per finished trial or inference task.

Executors' logs never reach spark-submit's output on a real cluster, but the driver's do (the
Airflow operator logs spark-submit's output line by line into the task log). So the driver
watches what the tasks write to object storage, in a background thread, while the Spark job runs:

* tuning: each trial's ``trials/<trial_id>/metrics.json`` (written when the trial ends);
* inference: each task's ``_errors/part-<index>.parquet`` in the attempt's staging folder (the
  last file a task writes).

Every few seconds the thread lists the prefix (one LIST request, plus one GET per new object) and
logs what finished since. :meth:`Progress.stop` polls once more, so every trial or task gets its
line before the job's summary, in the order they finished. Progress is best effort: a failed
poll is logged as a warning and never fails the job.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from sparktf import knobs, storage

DEFAULT_INTERVAL_SECONDS = float(os.environ.get("SPARKTF_PROGRESS_SECONDS", "5"))
PARAM_LABELS = {
    "learning_rate": "lr",
    "hidden_units": "hidden",
    "batch_size": "batch",
    "dropout": "dropout",
    "optimizer": "optimizer",
    "augment": "augment",
}


class Progress:
    """Poll an S3 prefix in a daemon thread and report new objects; subclasses say what they mean."""

    def __init__(self, prefix: str, *, log: logging.Logger, interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
        self.prefix = storage.prefix_uri(prefix)
        self.bucket = storage.parse_uri(self.prefix).bucket
        self.log = log
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._s3 = None
        self._warned = False

    # -- what subclasses implement ------------------------------------------------------------
    def snapshot(self, objects: list[dict]) -> None:
        """Called once before the job starts with the objects already there."""

    def seen(self, obj: dict) -> None:
        """Called on every poll for every object under the prefix (key, size, etag)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last poll."""

    # -- the loop --------------------------------------------------------------------------------
    def _list(self) -> list[dict]:
        self._s3 = self._s3 or storage.client()
        return list(storage.iter_objects(self.prefix, self._s3))

    def poll(self) -> None:
        """List the prefix once and report what is new (safe to call from any thread)."""
        with self._lock:
            try:
                for obj in self._list():
                    self.seen(obj)
            except Exception as err:  # noqa: BLE001 - progress must never fail the job
                if not self._warned:
                    self.log.warning("progress: cannot read %s (%s); the job goes on", self.prefix, err)
                    self._warned = True

    def start(self) -> Progress:
        try:
            self.snapshot(self._list())
        except Exception as err:  # noqa: BLE001
            self.log.warning("progress: cannot list %s (%s); no progress lines", self.prefix, err)
            return self
        self._thread = threading.Thread(target=self._run, name=f"progress {self.prefix}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        """Stop the thread, report whatever finished since the last poll, then the remainder."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, 3 * self.interval))
            self.poll()
        self.finish()

    def _read_json(self, key: str) -> Any:
        return storage.read_json(storage.object_uri(self.bucket, key), self._s3)


def describe_params(params: dict[str, Any]) -> str:
    """``lr 0.001, hidden 256, batch 128, dropout 0.5``: the trial's search dimensions, in the knob
    table's order."""
    order = list(knobs.search_dimensions())
    shown = sorted(
        ((k, v) for k, v in params.items() if k not in ("optimizer", "augment")), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)
    )
    return ", ".join(f"{PARAM_LABELS.get(k, k)} {v:g}" if isinstance(v, float) else f"{PARAM_LABELS.get(k, k)} {v}" for k, v in shown)


class TrialProgress(Progress):
    """One log line per finished tuning trial: k of N, hyperparameters, validation accuracy, seconds.

    Args:
        trials_uri: the prefix the trials write ``<trial_id>/metrics.json`` under.
        trial_list: the job's trials (``{"trial_id", "params"}``).
    """

    def __init__(self, trials_uri: str, trial_list: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(trials_uri, **kwargs)
        self.trials = {t["trial_id"]: t for t in trial_list}
        self.total = len(trial_list)
        self.before: dict[str, str] = {}
        self.reusable: set[str] = set()
        self.reported: set[str] = set()

    def _trial_of(self, key: str) -> str | None:
        parts = key.rsplit("/", 2)
        if len(parts) == 3 and parts[2] == "metrics.json" and parts[1] in self.trials:
            return parts[1]
        return None

    def snapshot(self, objects: list[dict]) -> None:
        # Records left by an earlier attempt: a finished trial is reused (reported at once), a
        # failed one is trained again (reported when its record changes).
        for obj in objects:
            trial_id = self._trial_of(obj["key"])
            if trial_id:
                self.before[trial_id] = obj["etag"]
                record = self._read_json(obj["key"])
                if record.get("status") == "ok":
                    self.reusable.add(trial_id)
        for trial_id in sorted(self.reusable):
            self._report(trial_id, self._read_json(self._key(trial_id)), reused=True)

    def _key(self, trial_id: str) -> str:
        return storage.parse_uri(storage.join_uri(self.prefix, trial_id, "metrics.json")).key

    def seen(self, obj: dict) -> None:
        trial_id = self._trial_of(obj["key"])
        if trial_id is None or trial_id in self.reported:
            return
        if obj["etag"] != self.before.get(trial_id):
            self._report(trial_id, self._read_json(obj["key"]))

    def _report(self, trial_id: str, record: dict[str, Any], reused: bool = False) -> None:
        self.reported.add(trial_id)
        done = len(self.reported)
        params = describe_params(record.get("params") or self.trials[trial_id]["params"])
        seconds = record.get("train_seconds")
        took = f", {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        outcome = f"val_accuracy {record['val_accuracy']:.4f}{took}" if record.get("status") == "ok" else f"FAILED: {record.get('reason')}{took}"
        how = "reused from an earlier attempt" if reused else "done"
        self.log.info("tuning progress: trial %d/%d %s (%s): %s [%s]", done, self.total, how, params, outcome, trial_id)

    def finish(self) -> None:
        missing = [t for t in self.trials if t not in self.reported]
        if missing:
            self.log.info(
                "tuning progress: %d/%d trials reported; no new record for %s",
                len(self.reported),
                self.total,
                ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
            )


# A task's staged errors part: _errors/part-<index>[-<task attempt>].parquet (sparktf.scoring.staged_part_names).
_STAGED_ERRORS_PART = re.compile(r"^_errors/part-(?P<index>\d{5})(?:-[A-Za-z0-9_.=-]+)?\.parquet$")


class InferenceProgress(Progress):
    """One log line per finished inference task: its images, and the running totals.

    Args:
        staged_uri: the attempt's staging prefix, where task ``i`` writes ``part-<i>-<attempt>.parquet``
            and then ``_errors/part-<i>-<attempt>.parquet``.
        task_sizes: images dealt to each task, by task index.
    """

    def __init__(self, staged_uri: str, task_sizes: list[int], **kwargs: Any) -> None:
        super().__init__(staged_uri, **kwargs)
        self.sizes = list(task_sizes)
        self.total_images = sum(self.sizes)
        self.done: list[int] = []

    def seen(self, obj: dict) -> None:
        relative = obj["key"][len(storage.parse_uri(self.prefix).key) :]
        match = _STAGED_ERRORS_PART.match(relative)
        index = int(match["index"]) if match else None
        if index is None or index >= len(self.sizes) or index in self.done:
            return
        self.done.append(index)
        set_aside = self._rows(obj["key"])
        aside = f" ({set_aside} set aside)" if set_aside else ""
        images = sum(self.sizes[i] for i in self.done)
        self.log.info(
            "inference progress: task %d done, %d images%s; %d/%d tasks, %d/%d images",
            index,
            self.sizes[index],
            aside,
            len(self.done),
            len(self.sizes),
            images,
            self.total_images,
        )

    def _rows(self, key: str) -> int | None:
        """Rows of a task's errors part (its Parquet footer), or None if unreadable."""
        import io

        import pyarrow.parquet as pq

        try:
            data = storage.read_bytes(storage.object_uri(self.bucket, key), self._s3)
            return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        except Exception:  # noqa: BLE001 - a count is a nicety
            return None
