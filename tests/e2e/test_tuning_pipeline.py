"""The tuning DAG end to end through Airflow: real spark-submit, real TensorFlow, real S3 calls."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from sparktf import dataset, registry, storage
from sparktf.testing import ROOT, TEST_ACCESS_KEY, TEST_SECRET_KEY, run_dag

pytestmark = pytest.mark.e2e
PER_CLASS = 30


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def raw_dataset(bucket, mnist_subset) -> str:
    """300 real digits as <label>/<file>.png plus two corrupt files."""
    images, labels = mnist_subset[0], mnist_subset[1]
    prefix = f"s3://{bucket}/e2e-tuning/raw"
    client = storage.client()
    for label in range(10):
        for n, index in enumerate(np.flatnonzero(labels == label)[:PER_CLASS]):
            storage.write_bytes(f"{prefix}/{label}/{n:03d}.png", png(images[index]), client)
    storage.write_bytes(f"{prefix}/7/broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, client)
    storage.write_bytes(f"{prefix}/2/page.png", b"<html>not found</html>", client)
    return prefix + "/"


@pytest.fixture(scope="module")
def tuning_run(airflow_env, raw_dataset, bucket, tmp_path_factory):
    conf = {
        "dataset_uri": raw_dataset, "workspace_uri": f"s3://{bucket}/e2e-tuning/ws", "model_name": "digits",
        "learning_rates": [0.001, 0.003], "hidden_units": [32, 64], "epochs": 2, "patience": 2,
        "batch_sizes": [32], "validation_fraction": 0.2, "test_fraction": 0.2,
    }
    code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("run"), "tuning_pipeline", conf)
    assert code == 0, output[-6000:]
    return conf, summary, output


def test_run_succeeds_with_every_step(tuning_run):
    _conf, summary, _output = tuning_run
    assert summary["state"].endswith("success")
    states = {task: info["state"] for task, info in summary["tasks"].items()}
    assert states == {t: "success" for t in ("validate_params", "prepare_data", "tune", "export_best_model", "report")}


def test_prepare_data_xcom_and_manifest(tuning_run):
    _conf, summary, _output = tuning_run
    xcom = summary["tasks"]["prepare_data"]["xcom"]
    assert xcom["counts"] == {"train": 180, "validation": 60, "test": 60}
    assert xcom["rejected"] == 2 and xcom["num_classes"] == 10
    manifest = dataset.read_manifest(xcom["prepared_uri"])
    assert manifest["content_sha256"] == xcom["content_sha256"]
    assert {r["key"].rsplit("/", 1)[-1] for r in manifest["rejected"]} == {"broken.png", "page.png"}


def test_tune_xcom_every_trial_has_metrics_and_selection_by_validation(tuning_run):
    _conf, summary, _output = tuning_run
    xcom = summary["tasks"]["tune"]["xcom"]
    assert xcom["trials"] == 4 and xcom["succeeded"] == 4 and xcom["selection_metric"] == "val_accuracy"
    results = storage.read_json(xcom["results_uri"])
    for record in results["trials"]:
        assert record["status"] == "ok"
        assert 0 <= record["val_accuracy"] <= 1 and 0 <= record["test_accuracy"] <= 1
        assert record["epochs_run"] >= 1 and record["train_seconds"] > 0
    best = max(results["trials"], key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert xcom["best"]["trial_id"] == best["trial_id"]
    assert [row["trial_id"] for row in xcom["leaderboard"]][0] == best["trial_id"]
    assert storage.read_bytes(xcom["figure_uri"])[:4] == b"\x89PNG"


def test_export_registers_a_champion_that_predicts(tuning_run):
    conf, summary, _output = tuning_run
    xcom = summary["tasks"]["export_best_model"]["xcom"]
    assert xcom["version"] == 1 and xcom["promoted"] is True and xcom["champion_version"] == 1
    assert xcom["trial_id"] == summary["tasks"]["tune"]["xcom"]["best"]["trial_id"]
    models_uri = conf["workspace_uri"] + "/models/"
    metadata = registry.resolve(models_uri, "digits")
    assert metadata["uri"] == xcom["uri"]
    model = registry.load_verified_model(metadata["model_uri"], metadata["model_sha256"])
    x_test, y_test = dataset.read_split(summary["tasks"]["prepare_data"]["xcom"]["prepared_uri"], "test")
    predictions = np.asarray(model(x_test, training=False)).argmax(axis=1)
    assert float((predictions == y_test).mean()) > 0.3  # well above chance (0.1) after 2 epochs on 180 digits


def test_run_note_and_progress_lines(tuning_run):
    """The run explains itself: its note (leaderboard, default vs tuned, champion, figure) and one
    progress line per finished trial in the tune task's log, as the trials finish."""
    conf, summary, output = tuning_run
    note, tune = summary["note"], summary["tasks"]["tune"]["xcom"]
    assert note.startswith("<!-- sparktf run note -->") and len(note) <= 1000
    assert "**Tuning run succeeded**: 4 of 4 trials trained; selected by validation accuracy." in note
    assert "| # | lr | hidden | val % | test % | epochs | s |" in note
    for row in tune["leaderboard"]:
        assert f"| {row['rank']} | {row['learning_rate']:g} | {row['hidden_units']} | {100 * row['val_accuracy']:.2f} |" in note
    assert "Every trial: batch 32, dropout 0.5." in note
    assert "lr 0.001, hidden 1024" in note and "is not in this run's grid" in note  # widths 32 and 64 only
    assert "**Champion:** `digits` v1 **promoted to champion**: no champion yet." in note
    assert f"(/sparktf/figure/tuning_pipeline/{urllib.parse.quote(summary['run_id'], safe='')}/tune)" in note
    progress = [line for line in output.splitlines() if "tuning progress: trial" in line]
    assert [f"trial {k}/4 done" in line for k, line in enumerate(progress, 1)] == [True] * 4, progress
    assert all("val_accuracy 0." in line and "lr 0.00" in line and "hidden " in line for line in progress)
    assert "Spark UI of application" in output


def test_terminal_summary_with_leaderboard_decision_and_figure(tuning_run, airflow_env, tmp_path):
    """scripts/print_summary.py: what the demo prints after the run, and the figure next to the JSON."""
    _conf, summary, _output = tuning_run
    path = tmp_path / "tuning_pipeline.json"
    path.write_text(json.dumps(summary))
    script = str(ROOT / "scripts" / "print_summary.py")
    out = subprocess.run([sys.executable, script, str(path)], env=airflow_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert f"tuning_pipeline  run {summary['run_id']}  -> " in text
    assert "data:      180 train / 60 validation / 60 test images (2 files rejected)" in text
    assert "trials:    4 of 4 trained, 0 failed; selected by validation accuracy" in text
    assert "rank     lr  hidden  val acc  test acc  epochs  seconds" in text
    assert len([line for line in text.splitlines() if line.strip().split(" ")[0] in {"1", "2", "3", "4"}]) == 4
    assert "default vs tuned: the default (mnist_cnn, lr 0.001, hidden 1024" in text
    assert "champion:  digits v1 PROMOTED to champion: no champion yet" in text
    figure = tmp_path / "tuning_pipeline.error_vs_learning_rate.png"
    assert f"figure:    {figure}" in text and figure.read_bytes().startswith(b"\x89PNG")
    assert f"full JSON: {path}" in text and len(text.splitlines()) < 25  # a screen, not screens
    as_json = subprocess.run([sys.executable, script, "--json", str(path)], env=airflow_env, capture_output=True,
                             text=True, timeout=120)
    assert json.loads(as_json.stdout) == json.loads(json.dumps(summary, sort_keys=True))


def test_no_secret_in_xcom_rendered_fields_or_logs(tuning_run, airflow_env):
    _conf, summary, output = tuning_run
    assert TEST_SECRET_KEY not in json.dumps(summary) and TEST_ACCESS_KEY not in json.dumps(summary)
    dump = subprocess.run([sys.executable, "-c", (
        "import json\n"
        "from airflow.models.renderedtifields import RenderedTaskInstanceFields as R\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    print(json.dumps([r.rendered_fields for r in s.query(R).all()], default=str))\n")],
        env=airflow_env, capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    assert TEST_SECRET_KEY not in dump.stdout and "result_uri" in dump.stdout
    # dag.test() writes the task logs (spark-submit's output included) to the run's output, not to
    # log files: check that output, and that it really holds the jobs' logs.
    logs = output
    for root, _dirs, files in os.walk(os.path.join(airflow_env["AIRFLOW_HOME"], "logs")):
        for name in files:
            with open(os.path.join(root, name), errors="replace") as fh:
                logs += fh.read()
    assert "spark-submit" in logs and "job result:" in logs, logs[-3000:]
    assert TEST_SECRET_KEY not in logs


def test_bad_params_fail_before_any_spark_job(airflow_env, bucket, tmp_path):
    # A learning rate <= 0 is refused when the run is created (the UI form refuses it the same way).
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", {"learning_rates": [0.01, 0]})
    assert code != 0 and summary is None
    assert "exclusiveMinimum" in output or "learning_rates" in output

    # A dataset location with nothing in it fails validation; no Spark task runs.
    conf = {"dataset_uri": f"s3://{bucket}/nothing-here/", "workspace_uri": f"s3://{bucket}/e2e-bad"}
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", conf)
    assert code == 1
    states = {task: info["state"] for task, info in summary["tasks"].items()}
    assert states["validate_params"] == "failed"
    assert states["prepare_data"] == states["tune"] == states["export_best_model"] == "upstream_failed"
    assert "holds no objects" in output
    assert "`validate_params` **failed**: see its log" in summary["note"]
    assert storage.list_keys(f"s3://{bucket}/e2e-bad/") == []
