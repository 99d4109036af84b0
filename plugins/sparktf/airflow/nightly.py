"""The nightly inference DAG's decisions, as pure functions: which partition, what the run found,
why a model cannot be used, whether the published partition is still this run's, what is announced.

No Airflow context and no I/O here (the tasks of ``dags/nightly_inference.py`` hand in what they
read), so each rule is unit-tested on its own.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

# Keys of the job's result that the predictions Asset event carries (downstream DAGs read them).
# The job's result keys the run summary (``publish`` XCom) keeps, under the job's own names.
SUMMARY_KEYS = (
    "date",
    "listed",
    "scored",
    "set_aside",
    "reasons",
    "markers_skipped",
    "storage_retries",
    "label_histogram",
    "model_version",
    "output_uri",
    "success_uri",
    "images_per_second",
    "seconds",
    "tasks",
    "failure_ratio_exceeded",
)
ASSET_EXTRA_KEYS = ("date", "output_uri", "success_uri", "model_name", "model_version", "scored", "set_aside")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def date_problems(value: Any) -> list[str]:
    """An empty ``date`` Param or a real calendar date ``YYYY-MM-DD`` (2026-02-31 is refused)."""
    if not value:
        return []
    text = str(value)
    try:
        if _DATE_RE.match(text):
            dt.date.fromisoformat(text)
            return []
    except ValueError:
        pass
    return [f"date {text!r} is not a calendar date YYYY-MM-DD: give the partition's date, or leave it empty"]


def partition_date(params: dict[str, Any], data_interval_start: dt.datetime | None) -> tuple[str, str]:
    """The partition to score and where that came from: the ``date`` Param, else the data interval.

    Raises:
        AirflowFailException: the ``date`` Param is not a calendar date, or the run has neither a
            ``date`` Param nor a data interval.
    """
    from sparktf.airflow.validation import failure, refuse

    refuse(date_problems(params.get("date")))
    if params.get("date"):
        return str(params["date"]), "param"
    if data_interval_start is None:
        raise failure("this run has no data interval (triggered without a logical date): set the 'date' Param to the partition to score")
    return data_interval_start.astimezone(dt.UTC).date().isoformat(), "data_interval"


def found_summary(
    *,
    date: str,
    source: str,
    incoming_uri: str,
    objects: list[dict[str, Any]],
    markers: int,
    max_image_bytes: int,
    data_interval: list[str],
    processed_at: dt.datetime,
) -> dict[str, Any]:
    """What ``find_new_images`` found; with no images, ``skipped_reason`` says why nothing runs."""
    summary: dict[str, Any] = {
        "date": date,
        "date_from": source,
        "data_interval": data_interval,
        "incoming_uri": incoming_uri,
        "images": len(objects),
        "bytes": sum(o["size"] for o in objects),
        "markers_skipped": markers,
        "over_max_image_bytes": sum(1 for o in objects if o["size"] > max_image_bytes),
        "processed_at": processed_at.astimezone(dt.UTC).isoformat(),
    }
    if not objects:
        summary["skipped_reason"] = f"no images under {incoming_uri} ({markers} empty folder markers skipped)"
    return summary


def model_refusal(model_name: str, requested: str, reason: str, *, tampered: bool) -> str:
    """Why the model cannot be used and what to do: missing (``tampered=False``) or changed after registration."""
    head = f"cannot use model {model_name!r} ({requested}): {reason}."
    if tampered:
        return (
            f"{head} The artifact was changed after it was registered, so it is not trusted. To fix: "
            f"re-register the model (run tuning_pipeline again), or trigger with model_version set to "
            f"another registered version; never edit an artifact in place"
        )
    return f"{head} To fix: run tuning_pipeline to register and promote a model, or trigger with model_version set to a registered version"


def resolved_summary(params: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``resolve_model`` result: the exact version the job must use, and what it checks."""
    return {
        "model_name": params["model_name"],
        "version": int(metadata["version"]),
        "requested": params["model_version"],
        "model_uri": metadata["model_uri"],
        "model_sha256": metadata["model_sha256"],
        "input_shape": metadata["input_shape"],
        "label_names": metadata["label_names"],
        "metrics": metadata.get("metrics"),
    }


def replaced_problem(manifest: dict[str, Any] | None, job: dict[str, Any]) -> str | None:
    """Why the published partition no longer holds this run's output (a later run replaced it), or None."""
    if manifest is not None and manifest.get("publish_id") == job["publish_id"]:
        return None
    current = (manifest or {}).get("attempt_id")
    return (
        f"{job['output_uri']} no longer holds this run's output (attempt {job['attempt_id']}): a later run "
        f"(attempt {current}) replaced it; its own run announces it"
    )


def published_summary(job: dict[str, Any], model: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: the job's result (:data:`SUMMARY_KEYS`, the job's own names), the model name, the date's origin."""
    return {**{key: job.get(key) for key in SUMMARY_KEYS}, "model_name": model["model_name"], "date_from": found["date_from"]}


def asset_extra(summary: dict[str, Any]) -> dict[str, Any]:
    """The predictions Asset event's extra (:data:`ASSET_EXTRA_KEYS`)."""
    return {key: summary.get(key) for key in ASSET_EXTRA_KEYS}
