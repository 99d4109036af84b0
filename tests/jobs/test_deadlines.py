"""The nightly deadline: its setting, the alert the DAG carries, and the late-night callback's line
and notifier hook (the callback itself, called as the triggerer calls it)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import pytest

from sparktf.airflow import deadlines

NOTIFIED: list[dict] = []
LATE_CONTEXT = {
    "dag_run": {
        "dag_id": "nightly_inference",
        "dag_run_id": "scheduled__2026-11-21T02:30:00+00:00",
        "run_type": "scheduled",
        "state": "running",
        "data_interval_start": "2026-11-20T02:30:00Z",
        "data_interval_end": "2026-11-21T02:30:00Z",
        "conf": {},
    },
    "deadline": {"id": "d-1", "deadline_time": dt.datetime(2026, 11, 21, 6, 30, tzinfo=dt.UTC)},
}
NOW = dt.datetime(2026, 11, 21, 7, 45, 30, tzinfo=dt.UTC)


def record(facts: dict) -> None:
    """A notifier, as a team would write one (here it only records what it was given)."""
    NOTIFIED.append(facts)


def test_the_deadline_setting_defaults_and_refuses_what_is_not_minutes():
    assert deadlines.deadline_minutes({}) == 240
    assert deadlines.deadline_minutes({deadlines.DEADLINE_ENV: "90"}) == 90
    assert deadlines.deadline_minutes({deadlines.DEADLINE_ENV: "0"}) == 0
    with pytest.raises(ValueError, match="SPARKTF_NIGHTLY_DEADLINE_MINUTES='4h': give the minutes"):
        deadlines.deadline_minutes({deadlines.DEADLINE_ENV: "4h"})


def test_the_alert_is_on_the_data_interval_end_and_calls_the_late_night_callback():
    from airflow.sdk import AsyncCallback, DeadlineReference

    alert = deadlines.nightly_deadline(90)
    assert alert.reference == DeadlineReference.DAGRUN_LOGICAL_DATE
    assert alert.interval == dt.timedelta(minutes=90)
    assert isinstance(alert.callback, AsyncCallback)
    assert alert.callback.path == "sparktf.airflow.deadlines.on_late_night"
    assert alert.callback.kwargs == {"deadline_minutes": 90}
    assert deadlines.nightly_deadline(0) is None


def test_the_nightly_dag_carries_the_alert(dag_bag):
    dag = dag_bag.dags["nightly_inference"]
    assert [a.callback.path for a in dag.deadline] == ["sparktf.airflow.deadlines.on_late_night"]
    assert dag.deadline[0].interval == dt.timedelta(minutes=deadlines.deadline_minutes())


def test_the_late_line_names_dag_run_date_and_how_late():
    facts = deadlines.late_facts(LATE_CONTEXT, 240, NOW)
    assert (facts["date"], facts["late_seconds"], facts["notify"]) == ("2026-11-20", 4530, True)
    assert deadlines.late_line(facts) == (
        "late night: DAG nightly_inference run scheduled__2026-11-21T02:30:00+00:00 has not published partition "
        "2026-11-20 by its deadline 2026-11-21T06:30:00+00:00 (240 min after the data interval end; run running): 1 h 15 min late"
    )
    manual = {**LATE_CONTEXT, "dag_run": {**LATE_CONTEXT["dag_run"], "conf": {"date": "2026-11-02"}}}
    assert deadlines.late_facts(manual, 240, NOW)["date"] == "2026-11-02"  # the date Param names the partition


def test_the_callback_logs_the_line_and_calls_the_notifier(monkeypatch, caplog):
    NOTIFIED.clear()
    monkeypatch.setenv(deadlines.NOTIFIER_ENV, f"{__name__}.record")
    with caplog.at_level(logging.WARNING, logger="sparktf.deadlines"):
        asyncio.run(deadlines.on_late_night(context=LATE_CONTEXT, deadline_minutes=240))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("late night:")]
    assert len(lines) == 1
    assert "run scheduled__2026-11-21T02:30:00+00:00 has not published partition 2026-11-20" in lines[0]
    assert [(n["dag_id"], n["date"], n["deadline_minutes"]) for n in NOTIFIED] == [("nightly_inference", "2026-11-20", 240)]


def test_a_backfilled_night_is_logged_but_not_notified(monkeypatch, caplog):
    NOTIFIED.clear()
    monkeypatch.setenv(deadlines.NOTIFIER_ENV, f"{__name__}.record")
    backfill = {**LATE_CONTEXT, "dag_run": {**LATE_CONTEXT["dag_run"], "run_type": "backfill"}}
    with caplog.at_level(logging.WARNING, logger="sparktf.deadlines"):
        asyncio.run(deadlines.on_late_night(context=backfill, deadline_minutes=240))
    assert any("(a backfill of a past night: not notified)" in r.getMessage() for r in caplog.records)
    assert NOTIFIED == []
