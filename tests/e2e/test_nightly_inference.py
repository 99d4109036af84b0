"""The nightly_inference DAG through Airflow: two dates scored by real spark-submit jobs, an empty
date that short-circuits, a pinned and a missing model version, and the predictions Asset event."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparktf import predictions, storage
from sparktf.testing import land_partition, run_dag, train_tiny_model
from sparktf.testing import register_trial as register_model

pytestmark = pytest.mark.e2e
DATES = {  # logical date of the 02:30 run -> the partition its data interval covers
    "2026-11-21T02:30:00+00:00": "2026-11-20",
    "2026-11-22T02:30:00+00:00": "2026-11-21",
    "2026-11-23T02:30:00+00:00": "2026-11-22",  # nothing landed that day
}


@pytest.fixture(scope="module")
def workspace(bucket, mnist_subset) -> str:
    ws = f"s3://{bucket}/e2e-nightly/ws"
    register_model(ws + "/models/", "digits", train_tiny_model(ws + "/scratch", mnist_subset))
    _tx, _ty, test_x, test_y = mnist_subset
    land_partition(ws + "/incoming/", "2026-11-20", test_x[100:116], test_y[100:116], with_bad=False)
    storage.write_bytes(f"{ws}/incoming/2026-11-20/late/empty file.png", b"")
    storage.write_bytes(f"{ws}/incoming/2026-11-20/late/index.png", b"<html>404</html>")
    land_partition(ws + "/incoming/", "2026-11-21", test_x[200:210], test_y[200:210], with_bad=False)
    return ws


@pytest.fixture(scope="module")
def runs(airflow_env, workspace, tmp_path_factory) -> dict:
    results = {}
    for logical_date, date in DATES.items():
        conf = {"workspace_uri": workspace, "model_name": "digits"}
        if date == "2026-11-21":
            conf["model_version"] = "1"  # pinned instead of the champion
        code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("run"), "nightly_inference",
                                        conf, logical_date=logical_date)
        assert code == 0, output[-6000:]
        results[date] = summary
    return results


def states(summary: dict) -> dict:
    return {task: info["state"] for task, info in summary["tasks"].items()}


@pytest.mark.parametrize("date, scored, set_aside", [("2026-11-20", 16, 2), ("2026-11-21", 10, 0)])
def test_each_date_is_scored_and_published(runs, workspace, date, scored, set_aside):
    summary = runs[date]
    assert summary["state"].endswith("success")
    assert set(states(summary).values()) == {"success"}
    found = summary["tasks"]["find_new_images"]["xcom"]
    assert found["date"] == date and found["date_from"] == "data_interval" and found["images"] == scored + set_aside
    model = summary["tasks"]["resolve_model"]["xcom"]
    assert model["version"] == 1 and model["requested"] == ("1" if date == "2026-11-21" else "champion")
    published = summary["tasks"]["publish"]["xcom"]
    assert published["date"] == date and published["model_version"] == 1
    assert (published["images_scored"], published["images_set_aside"]) == (scored, set_aside)
    assert sum(published["label_histogram"].values()) == scored and published["images_per_second"] > 0
    assert published["output_uri"] == f"{workspace}/predictions/digits/{date}/"
    rows, errors = predictions.read_predictions(published["output_uri"])
    assert len(rows) == scored and len({r["key"] for r in rows}) == scored and len(errors) == set_aside
    # processed_at is the run's logical timestamp, so re-running the run writes identical rows
    assert {r["processed_at"].isoformat() for r in rows} == {found["processed_at"]}
    if set_aside:
        assert {e["reason"] for e in errors} == {"empty", "not_an_image"}
    # The run's note (what the run page shows): counts, reasons, label histogram, model version.
    note = summary["note"]
    assert f"Nightly inference succeeded: {date}" in note
    assert f"**{scored} scored**, **{set_aside} set aside** of {scored + set_aside} images" in note
    assert "`digits` v1" in note and published["output_uri"] in note
    assert ("Set aside: empty 1, not_an_image 1." in note) == bool(set_aside)
    labels = published["label_histogram"]
    assert "| label | " + " | ".join(labels) + " |" in note
    assert "| images | " + " | ".join(str(v) for v in labels.values()) + " |" in note


def test_terminal_summary_per_date(runs, airflow_env, tmp_path):
    """scripts/print_summary.py after a nightly run: the date's counts, reasons, labels, model version."""
    from sparktf.testing import ROOT

    for date, lines in {"2026-11-20": ["2026-11-20: 16 scored, 2 set aside of 18 images, model digits v1",
                                       "  set aside: empty 1, not_an_image 1"],
                        "2026-11-22": ["2026-11-22: 0 images (no images under "]}.items():
        path = tmp_path / f"nightly_inference_{date}.json"
        path.write_text(json.dumps(runs[date]))
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "print_summary.py"), str(path)], env=airflow_env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        for line in lines:
            assert line in out.stdout, out.stdout
        assert f"full JSON: {path}" in out.stdout


def test_empty_date_short_circuits_with_a_summary(runs):
    summary = runs["2026-11-22"]
    assert summary["state"].endswith("success")
    # The short-circuit skips the work; the report (a teardown) still runs and says why.
    assert states(summary) == {"find_new_images": "success", "resolve_model": "skipped",
                               "batch_inference": "skipped", "publish": "skipped", "report": "success"}
    found = summary["tasks"]["find_new_images"]["xcom"]
    assert found["images"] == 0 and found["date"] == "2026-11-22" and "no images" in found["skipped_reason"]
    assert "Nightly inference succeeded: 2026-11-22" in summary["note"]
    assert f"0 images: {found['skipped_reason']}" in summary["note"]


def test_predictions_asset_events_carry_the_partition(runs, airflow_env, workspace):
    query = (
        "import json\n"
        "from airflow.models.asset import AssetEvent, AssetModel\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    rows = s.query(AssetModel.name, AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)\n"
        "    print(json.dumps([[n, e] for n, e in rows.all()], default=str))\n")
    out = subprocess.run([sys.executable, "-c", query], env=airflow_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    events = [extra for name, extra in json.loads(out.stdout.strip().splitlines()[-1])
              if name == "nightly_predictions" and extra["output_uri"].startswith(workspace + "/")]  # DB is shared
    assert sorted(e["date"] for e in events) == ["2026-11-20", "2026-11-21"]  # none for the empty day
    assert all(e["output_uri"].endswith(f"/predictions/digits/{e['date']}/") and e["model_name"] == "digits"
               for e in events)


def test_missing_model_version_fails_clearly_before_spark(airflow_env, workspace, runs, tmp_path):
    conf = {"workspace_uri": workspace, "model_name": "digits", "model_version": "9", "date": "2026-11-20"}
    code, summary, output = run_dag(airflow_env, tmp_path, "nightly_inference", conf,
                                    logical_date="2026-11-25T02:30:00+00:00")
    assert code == 1
    assert summary["tasks"]["find_new_images"]["xcom"]["date_from"] == "param"
    assert states(summary)["resolve_model"] == "failed"
    assert states(summary)["batch_inference"] == states(summary)["publish"] == "upstream_failed"
    assert "version 9 does not exist" in output
    # The run failed (the report, a teardown, does not change that) and its note says where.
    assert summary["state"].endswith("failed") and states(summary)["report"] == "success"
    assert "Nightly inference failed: 2026-11-20" in summary["note"]
    assert "`resolve_model` **failed**: see its log" in summary["note"]
    # the partition scored earlier is untouched
    assert predictions.read_published(f"{workspace}/predictions/digits/2026-11-20/")["model_version"] == 1
