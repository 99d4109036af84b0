"""The nightly_inference DAG through Airflow: dates scored by real spark-submit jobs, an empty date
that short-circuits, a pinned, a missing and a tampered model, a failure-ratio breach, a manual
run with the date Param, a cleared run, a run through a faulty store, and the Asset events."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparktf import predictions, storage
from sparktf.airflow import run_notes
from sparktf_dev.faults import FaultProxy
from sparktf_dev.testing import asset_events, land_partition, not_green, run_dag, train_tiny_model
from sparktf_dev.testing import register_trial as register_model

pytestmark = pytest.mark.e2e
DATES = {  # logical date of the 02:30 run -> the partition its data interval covers
    "2026-11-21T02:30:00+00:00": "2026-11-20",
    "2026-11-22T02:30:00+00:00": "2026-11-21",
    "2026-11-23T02:30:00+00:00": "2026-11-22",  # nothing landed that day
}
BREACH = ("2026-11-24T02:30:00+00:00", "2026-11-23")  # mostly bad files that day
BIG = 300  # images of 2026-11-21 (re-run through the faulty store)


@pytest.fixture(scope="module")
def workspace(bucket, mnist_subset) -> str:
    ws = f"s3://{bucket}/e2e-nightly/ws"
    record = train_tiny_model(ws + "/scratch", mnist_subset)
    register_model(ws + "/models/", "digits", record)
    tampered = register_model(ws + "/models/", "tampered", record)
    storage.write_bytes(tampered["model_uri"], b"not the bytes that were registered")
    _tx, _ty, test_x, test_y = mnist_subset
    land_partition(ws + "/incoming/", "2026-11-20", test_x[100:116], test_y[100:116], with_bad=False)
    storage.write_bytes(f"{ws}/incoming/2026-11-20/late/empty file.png", b"")
    storage.write_bytes(f"{ws}/incoming/2026-11-20/late/index.png", b"<html>404</html>")
    storage.write_bytes(f"{ws}/incoming/2026-11-20/late/", b"")  # a folder marker: counted, not listed
    land_partition(ws + "/incoming/", "2026-11-21", test_x[200 : 200 + BIG], test_y[200 : 200 + BIG])
    storage.write_bytes(f"{ws}/incoming/2026-11-22/", b"")  # only a folder marker that day
    land_partition(ws + "/incoming/", BREACH[1], test_x[600:602], test_y[600:602])  # 2 valid, 8 bad
    return ws


@pytest.fixture(scope="module")
def runs(airflow_env, workspace, tmp_path_factory) -> dict:
    results = {}
    for logical_date, date in DATES.items():
        conf = {"workspace_uri": workspace, "model_name": "digits"}
        if date == "2026-11-21":
            conf["model_version"] = "1"  # pinned instead of the champion
        code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("run"), "nightly_inference", conf, logical_date=logical_date)
        assert code == 0, output[-6000:]
        results[date] = summary
    return results


def states(summary: dict) -> dict:
    return {task: info["state"] for task, info in summary["tasks"].items()}


def rows_of(partition: str) -> tuple[list, list]:
    scored, errors = predictions.read_predictions(partition)
    return (
        sorted((r["key"], r["predicted_label"], r["score"], str(r["top_k"]), r["model_version"], str(r["processed_at"])) for r in scored),
        sorted((e["key"], e["reason"], e["detail"]) for e in errors),
    )


@pytest.mark.parametrize(("date", "scored", "set_aside"), [("2026-11-20", 16, 2), ("2026-11-21", BIG, 8)])
def test_each_date_is_scored_and_published(runs, workspace, date, scored, set_aside):
    summary = runs[date]
    assert summary["state"].endswith("success")
    assert not_green(summary) == {}
    found = summary["tasks"]["find_new_images"]["xcom"]
    assert found["date"] == date
    assert found["date_from"] == "data_interval"
    assert found["images"] == scored + set_aside
    assert found["markers_skipped"] == (1 if date == "2026-11-20" else 0)
    model = summary["tasks"]["resolve_model"]["xcom"]
    assert model["version"] == 1
    assert model["requested"] == ("1" if date == "2026-11-21" else "champion")
    published = summary["tasks"]["publish"]["xcom"]
    assert published["date"] == date
    assert published["model_version"] == 1
    assert (published["scored"], published["set_aside"]) == (scored, set_aside)
    assert sum(published["label_histogram"].values()) == scored
    assert published["images_per_second"] > 0
    assert published["output_uri"] == f"{workspace}/predictions/digits/{date}/"
    rows, errors = predictions.read_predictions(published["output_uri"])
    assert len(rows) == scored
    assert len({r["key"] for r in rows}) == scored
    assert len(errors) == set_aside
    # processed_at is the run's logical timestamp, so re-running the run writes identical rows
    assert {r["processed_at"].isoformat() for r in rows} == {found["processed_at"]}
    if date == "2026-11-20":
        assert {e["reason"] for e in errors} == {"empty", "not_an_image"}
    # The run's note (what the run page shows): counts, reasons, label histogram, model version.
    note = summary["note"]
    assert f"Nightly inference succeeded: {date}" in note
    assert f"**{scored} scored**, **{set_aside} set aside** of {scored + set_aside} images" in note
    assert "`digits` v1" in note
    assert published["output_uri"] in note
    assert ("Set aside: empty 1, not_an_image 1." in note) == (date == "2026-11-20")
    assert "Set aside: " in note
    assert len(note) <= 1000  # Airflow's limit: the label table goes first when there is much to say
    if date == "2026-11-20":
        labels = published["label_histogram"]
        assert "| label | " + " | ".join(labels) + " |" in note
        assert "| images | " + " | ".join(str(v) for v in labels.values()) + " |" in note


def test_terminal_summary_per_date(runs, airflow_env, tmp_path):
    """scripts/print_summary.py after a nightly run: the date's counts, reasons, labels, model version."""
    from sparktf_dev.testing import ROOT

    for date, lines in {
        "2026-11-20": ["2026-11-20: 16 scored, 2 set aside of 18 images, model digits v1", "  set aside: empty 1, not_an_image 1"],
        "2026-11-22": ["2026-11-22: 0 images (no images under "],
    }.items():
        path = tmp_path / f"nightly_inference_{date}.json"
        path.write_text(json.dumps(runs[date]))
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "print_summary.py"), str(path)], env=airflow_env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        for line in lines:
            assert line in out.stdout, out.stdout
        assert f"full JSON: {path}" in out.stdout


def test_empty_date_short_circuits_with_a_summary(runs):
    summary = runs["2026-11-22"]
    assert summary["state"].endswith("success")
    # The short-circuit skips the work; the report (a teardown) still runs and says why.
    assert states(summary) == {
        "find_new_images": "success",
        "resolve_model": "skipped",
        "batch_inference": "skipped",
        "publish": "skipped",
        "mlflow": "skipped",
        "report": "success",
    }
    found = summary["tasks"]["find_new_images"]["xcom"]
    assert found["images"] == 0
    assert found["date"] == "2026-11-22"
    assert "no images" in found["skipped_reason"]
    assert found["markers_skipped"] == 1
    assert "Nightly inference succeeded: 2026-11-22" in summary["note"]
    assert f"0 images: {run_notes.escape_markdown(found['skipped_reason'])}" in summary["note"]  # a URI: escaped


def test_a_cleared_run_publishes_identical_rows(runs, airflow_env, workspace, tmp_path):
    partition = f"{workspace}/predictions/digits/2026-11-20/"
    before = predictions.read_published(partition)
    expected = rows_of(partition)
    # "Clear": the run of the same logical date runs all its tasks again (dag.test clears them).
    code, summary, output = run_dag(
        airflow_env, tmp_path, "nightly_inference", {"workspace_uri": workspace, "model_name": "digits"}, logical_date="2026-11-21T02:30:00+00:00"
    )
    assert code == 0, output[-6000:]
    assert summary["tasks"]["find_new_images"]["xcom"] == runs["2026-11-20"]["tasks"]["find_new_images"]["xcom"]
    after = predictions.read_published(partition)
    assert after["publish_id"] != before["publish_id"]
    assert after["replaces"]["publish_id"] == before["publish_id"]
    assert rows_of(partition) == expected


def test_a_manual_run_scores_the_date_param(runs, airflow_env, workspace, tmp_path):
    conf = {"workspace_uri": workspace, "model_name": "digits", "date": "2026-11-20"}
    code, summary, output = run_dag(airflow_env, tmp_path, "nightly_inference", conf, logical_date="2026-12-01T10:00:00+00:00")
    assert code == 0, output[-6000:]
    assert not_green(summary) == {}
    found = summary["tasks"]["find_new_images"]["xcom"]
    assert (found["date"], found["date_from"]) == ("2026-11-20", "param")
    published = summary["tasks"]["publish"]["xcom"]
    assert published["output_uri"] == f"{workspace}/predictions/digits/2026-11-20/"
    assert published["scored"] == 16
    rows, _errors = predictions.read_predictions(published["output_uri"])
    assert {r["processed_at"].isoformat() for r in rows} == {"2026-12-01T10:00:00+00:00"}


@pytest.fixture(scope="module")
def breach(airflow_env, workspace, tmp_path_factory) -> tuple:
    conf = {"workspace_uri": workspace, "model_name": "digits"}
    return run_dag(airflow_env, tmp_path_factory.mktemp("breach"), "nightly_inference", conf, logical_date=BREACH[0])


def test_a_failure_ratio_breach_fails_the_run_and_flags_the_partition(breach, workspace):
    code, summary, output = breach
    assert code == 1
    assert summary["state"].endswith("failed")
    assert states(summary)["batch_inference"] == "failed"
    assert summary["tasks"]["batch_inference"]["try_number"] == 1  # not retried: it would end the same way
    assert states(summary)["publish"] == "upstream_failed"  # so no Asset event
    assert "set aside, more than --max-failure-ratio" in output
    manifest = predictions.read_published(f"{workspace}/predictions/digits/{BREACH[1]}/")
    assert manifest["failure_ratio_exceeded"] is True
    assert (manifest["scored"], manifest["set_aside"]) == (2, 8)


@pytest.mark.parametrize(
    ("model_name", "message", "what_to_do"),
    [
        ("nobody", "has no champion", "To fix: run tuning_pipeline"),
        ("tampered", "changed after it was registered", "To fix: re-register the model"),
    ],
)
def test_a_missing_or_tampered_model_fails_resolve_model_saying_what_to_do(airflow_env, workspace, runs, tmp_path, model_name, message, what_to_do):
    conf = {"workspace_uri": workspace, "model_name": model_name, "date": "2026-11-20"}
    logical = "2026-11-26T02:30:00+00:00" if model_name == "nobody" else "2026-11-27T02:30:00+00:00"
    code, summary, output = run_dag(airflow_env, tmp_path, "nightly_inference", conf, logical_date=logical)
    assert code == 1
    assert states(summary)["resolve_model"] == "failed"
    assert states(summary)["batch_inference"] == states(summary)["publish"] == "upstream_failed"
    assert message in output, output[-4000:]
    assert what_to_do in output
    assert "trigger with model_version set to" in output


def test_missing_model_version_fails_clearly_before_spark(airflow_env, workspace, runs, tmp_path):
    conf = {"workspace_uri": workspace, "model_name": "digits", "model_version": "9", "date": "2026-11-20"}
    code, summary, output = run_dag(airflow_env, tmp_path, "nightly_inference", conf, logical_date="2026-11-25T02:30:00+00:00")
    assert code == 1
    assert summary["tasks"]["find_new_images"]["xcom"]["date_from"] == "param"
    assert states(summary)["resolve_model"] == "failed"
    assert states(summary)["batch_inference"] == states(summary)["publish"] == "upstream_failed"
    assert "version 9 does not exist" in output
    # The run failed (the report, a teardown, does not change that) and its note says where.
    assert summary["state"].endswith("failed")
    assert states(summary)["report"] == "success"
    assert "Nightly inference failed: 2026-11-20" in summary["note"]
    assert "`resolve_model` **failed**: see its log" in summary["note"]
    # the partition scored earlier is untouched
    assert predictions.read_published(f"{workspace}/predictions/digits/2026-11-20/")["model_version"] == 1


def test_a_run_through_a_faulty_store_publishes_exactly_the_clean_rows(runs, airflow_env, workspace, s3_server, tmp_path):
    partition = f"{workspace}/predictions/digits/2026-11-21/"
    clean = predictions.read_published(partition)
    expected = rows_of(partition)
    connection = json.loads(s3_server.connection_json())
    # 5 % SlowDown, 2 % InternalError, 5 % connections reset mid-body, 3 % latency: every request
    # of the run (Airflow tasks, Spark driver and executors) goes through the proxy.
    with FaultProxy(s3_server.endpoint, seed=11, slowdown=0.05, internal=0.02, reset=0.05, latency=0.03) as proxy:
        connection["extra"]["endpoint_url"] = proxy.endpoint
        env = {**airflow_env, "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection)}
        code, summary, output = run_dag(
            env,
            tmp_path,
            "nightly_inference",
            {"workspace_uri": workspace, "model_name": "digits", "model_version": "1"},
            logical_date="2026-11-22T02:30:00+00:00",
        )
    assert code == 0, output[-6000:]
    assert min(proxy.faults[k] for k in ("slowdown", "internal", "reset")) > 0, proxy.faults
    assert all(info["try_number"] == 1 for info in summary["tasks"].values())  # no task needed a retry
    published = summary["tasks"]["publish"]["xcom"]
    assert published["storage_retries"] > 0
    assert "unreadable" not in published["reasons"]
    manifest = predictions.read_published(partition)
    assert manifest["replaces"]["publish_id"] == clean["publish_id"]
    assert rows_of(partition) == expected


def test_predictions_asset_events_carry_the_partition(runs, breach, airflow_env, workspace):
    events = [
        extra for extra in asset_events(airflow_env, "nightly_predictions") if extra["output_uri"].startswith(workspace + "/")
    ]  # the DB is shared
    # none for the empty day, none for the breached one
    assert {e["date"] for e in events} == {"2026-11-20", "2026-11-21"}
    assert all(e["output_uri"].endswith(f"/predictions/digits/{e['date']}/") and e["model_name"] == "digits" for e in events)
