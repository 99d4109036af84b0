"""When a night is late: the nightly inference's deadline alert (Airflow 3's native deadline alerts).

A night's partition must be published within ``SPARKTF_NIGHTLY_DEADLINE_MINUTES`` (default 240:
by 06:30 UTC for the 02:30 run) after its run's data interval ends. The nightly DAG's
``deadline`` is a :class:`airflow.sdk.DeadlineAlert` on the run's logical date, which for its
``CronTriggerTimetable`` *is* the data interval end. When the run has not finished by then, the
scheduler marks the deadline missed and the triggerer calls :func:`on_late_night`, which logs
one line (``late night: ...``: DAG, run, partition date, deadline, how late) and hands the same
facts to the notifier named by ``SPARKTF_LATE_NIGHT_NOTIFIER`` (a dotted path to a callable
taking one dict, plain or ``async``; e.g. a function of yours that posts to Slack or pages).

A run that succeeds before its deadline removes it (nothing is called). A manual run without a
logical date has no deadline. A backfill of past nights is late by definition: the line is
logged, the notifier is not called. ``SPARKTF_NIGHTLY_DEADLINE_MINUTES=0`` turns the alert off.
The setting is read when the DAG is parsed and applies to runs created after that.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from typing import Any

DEADLINE_ENV = "SPARKTF_NIGHTLY_DEADLINE_MINUTES"
NOTIFIER_ENV = "SPARKTF_LATE_NIGHT_NOTIFIER"
DEFAULT_DEADLINE_MINUTES = 240
LINE_PREFIX = "late night:"

log = logging.getLogger("sparktf.deadlines")


def deadline_minutes(environ: Mapping[str, str] = os.environ) -> int:
    """The minutes after the data interval end by which a night must be published (0: no alert).

    Raises:
        ValueError: the setting is not a whole number of minutes >= 0 (the DAG then fails to
            import, naming the variable, rather than run without the alert someone asked for).
    """
    text = str(environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_MINUTES)).strip()
    if not text.isdigit():
        raise ValueError(f"{DEADLINE_ENV}={text!r}: give the minutes after the data interval end (e.g. 240), or 0 for no deadline")
    return int(text)


def nightly_deadline(minutes: int | None = None):
    """The nightly DAG's ``deadline`` argument: a DeadlineAlert ``minutes`` after the data interval
    end (default: :func:`deadline_minutes`) calling :func:`on_late_night`; None when 0."""
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    minutes = deadline_minutes() if minutes is None else minutes
    if minutes == 0:
        return None
    return DeadlineAlert(
        # CronTriggerTimetable: a run's logical date is its data interval end.
        reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
        interval=dt.timedelta(minutes=minutes),
        callback=AsyncCallback(on_late_night, kwargs={"deadline_minutes": minutes}),
        name="nightly partition published",
    )


def _when(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def late_facts(context: Mapping[str, Any], deadline_minutes: int | None, now: dt.datetime) -> dict[str, Any]:
    """What a missed deadline is about, from the context Airflow hands the callback (pure).

    Args:
        context: ``{"dag_run": the run as the REST API shows it, "deadline": {"deadline_time": ...}}``.
        deadline_minutes: the setting the deadline was made with.
        now: the time of the call.
    """
    run = context.get("dag_run") or {}
    deadline = _when((context.get("deadline") or {}).get("deadline_time"))
    start = _when(run.get("data_interval_start"))
    date = (run.get("conf") or {}).get("date") or (start.astimezone(dt.UTC).date().isoformat() if start else None)
    late = (now - deadline).total_seconds() if deadline else None
    return {
        "dag_id": run.get("dag_id"),
        "run_id": run.get("dag_run_id") or run.get("run_id"),
        "run_type": run.get("run_type"),
        "date": date,
        "state": run.get("state"),
        "deadline": deadline.isoformat() if deadline else None,
        "deadline_minutes": deadline_minutes,
        "late_seconds": None if late is None else max(0, round(late)),
        "notify": run.get("run_type") != "backfill",
    }


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "by an unknown time"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def late_line(facts: Mapping[str, Any]) -> str:
    """The one log line of a missed deadline."""
    line = (
        f"{LINE_PREFIX} DAG {facts['dag_id']} run {facts['run_id']} has not published partition "
        f"{facts['date'] or '(date unknown)'} by its deadline {facts['deadline']} "
        f"({facts['deadline_minutes']} min after the data interval end; run {facts['state']}): "
        f"{_duration(facts['late_seconds'])} late"
    )
    return line if facts["notify"] else line + " (a backfill of a past night: not notified)"


async def on_late_night(context: dict[str, Any] | None = None, deadline_minutes: int | None = None, **_: Any) -> None:
    """The deadline alert's callback (runs in the triggerer): log the line, call the notifier."""
    import asyncio
    import inspect

    facts = late_facts(context or {}, deadline_minutes, dt.datetime.now(dt.UTC))
    log.warning("%s", late_line(facts))
    path = os.environ.get(NOTIFIER_ENV, "").strip()
    if not path or not facts["notify"]:
        return
    from airflow.sdk.module_loading import import_string

    notifier = import_string(path)
    if inspect.iscoroutinefunction(notifier):
        await notifier(facts)
    else:
        await asyncio.to_thread(notifier, facts)  # a blocking notifier must not stall the triggerer's loop
