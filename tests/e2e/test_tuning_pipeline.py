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
from airflow.sdk.exceptions import ParamValidationError
from PIL import Image

from sparktf import dataset, registry, storage, trials
from sparktf_dev.testing import ROOT, SKIPPED_BY_DEFAULT, TEST_ACCESS_KEY, TEST_SECRET_KEY, not_green, run_dag

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
        "dataset_uri": raw_dataset,
        "workspace_uri": f"s3://{bucket}/e2e-tuning/ws",
        "model_name": "digits",
        "model_family": "mnist_cnn",
        "augment": 0,
        "learning_rates": [0.001, 0.003],
        "hidden_units": [32, 64],
        "epochs": 2,
        "patience": 2,
        "batch_sizes": [32],
        "validation_fraction": 0.2,
        "test_fraction": 0.2,
    }
    code, summary, output = run_dag(airflow_env, tmp_path_factory.mktemp("run"), "tuning_pipeline", conf)
    assert code == 0, output[-6000:]
    return conf, summary, output


def test_run_succeeds_with_every_step(tuning_run):
    _conf, summary, _output = tuning_run
    assert summary["state"].endswith("success")
    states = {task: info["state"] for task, info in summary["tasks"].items()}
    assert states == {
        **dict.fromkeys(("validate_params", "prepare_data", "tune", "export_best_model", "report"), "success"),
        **dict.fromkeys(SKIPPED_BY_DEFAULT, "skipped"),
    }


def test_prepare_data_xcom_and_manifest(tuning_run):
    _conf, summary, _output = tuning_run
    xcom = summary["tasks"]["prepare_data"]["xcom"]
    assert xcom["counts"] == {"train": 180, "validation": 60, "test": 60}
    assert xcom["rejected"] == 2
    assert xcom["num_classes"] == 10
    manifest = dataset.read_manifest(xcom["prepared_uri"])
    assert manifest["content_sha256"] == xcom["content_sha256"]
    assert {r["key"].rsplit("/", 1)[-1] for r in manifest["rejected"]} == {"broken.png", "page.png"}


def test_tune_xcom_every_trial_has_metrics_and_selection_by_validation(tuning_run):
    _conf, summary, _output = tuning_run
    xcom = summary["tasks"]["tune"]["xcom"]
    assert xcom["trials"] == 4
    assert xcom["succeeded"] == 4
    assert xcom["selection_metric"] == "val_accuracy"
    results = storage.read_json(xcom["results_uri"])
    for record in results["trials"]:
        assert record["status"] == "ok"
        assert 0 <= record["val_accuracy"] <= 1
        assert 0 <= record["test_accuracy"] <= 1
        assert record["epochs_run"] >= 1
        assert record["train_seconds"] > 0
    best = max(results["trials"], key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert xcom["best"]["trial_id"] == best["trial_id"]
    assert next(row["trial_id"] for row in xcom["leaderboard"]) == best["trial_id"]
    assert storage.read_bytes(xcom["figure_uri"])[:4] == b"\x89PNG"


def test_export_registers_a_champion_that_predicts(tuning_run):
    conf, summary, _output = tuning_run
    xcom = summary["tasks"]["export_best_model"]["xcom"]
    assert xcom["version"] == 1
    assert xcom["promoted"] is True
    assert xcom["champion_version"] == 1
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
    _conf, summary, output = tuning_run
    note, tune = summary["note"], summary["tasks"]["tune"]["xcom"]
    assert note.startswith("<!-- sparktf run note -->")
    assert len(note) <= 1000
    assert "**Tuning run succeeded**: 4 of 4 trials trained; selected by validation accuracy." in note
    assert "| # | lr | hidden | val % | test % | epochs | s |" in note
    for row in tune["leaderboard"]:
        assert f"| {row['rank']} | {row['learning_rate']:g} | {row['hidden_units']} | {100 * row['val_accuracy']:.2f} |" in note
    assert "Every trial: batch 32, dropout 0.5." in note
    assert "lr 0.001, hidden 1024" in note
    assert "is not in this run's grid" in note
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
    assert "default vs tuned: the reference network (mnist_cnn, lr 0.001, hidden 1024" in text
    assert "champion:  digits v1 PROMOTED to champion: no champion yet" in text
    figure = tmp_path / "tuning_pipeline.error_vs_learning_rate.png"
    assert f"figure:    {figure}" in text
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert f"full JSON: {path}" in text
    assert len(text.splitlines()) < 25
    as_json = subprocess.run([sys.executable, script, "--json", str(path)], env=airflow_env, capture_output=True, text=True, timeout=120)
    assert json.loads(as_json.stdout) == json.loads(json.dumps(summary, sort_keys=True))


def test_no_secret_in_xcom_rendered_fields_or_logs(tuning_run, airflow_env):
    _conf, summary, output = tuning_run
    assert TEST_SECRET_KEY not in json.dumps(summary)
    assert TEST_ACCESS_KEY not in json.dumps(summary)
    dump = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import json\n"
                "from airflow.models.renderedtifields import RenderedTaskInstanceFields as R\n"
                "from airflow.utils.session import create_session\n"
                "with create_session() as s:\n"
                "    print(json.dumps([r.rendered_fields for r in s.query(R).all()], default=str))\n"
            ),
        ],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dump.returncode == 0, dump.stderr[-2000:]
    assert TEST_SECRET_KEY not in dump.stdout
    assert "result_uri" in dump.stdout
    # dag.test() writes the task logs (spark-submit's output included) to the run's output, not to
    # log files: check that output, and that it really holds the jobs' logs.
    logs = output
    for root, _dirs, files in os.walk(os.path.join(airflow_env["AIRFLOW_HOME"], "logs")):
        for name in files:
            with open(os.path.join(root, name), errors="replace") as fh:
                logs += fh.read()
    assert "spark-submit" in logs, logs[-3000:]
    assert "job result:" in logs, logs[-3000:]
    assert TEST_SECRET_KEY not in logs


def test_bad_params_fail_before_any_spark_job(airflow_env, bucket, tmp_path):
    # A learning rate <= 0 is refused when the run is created (the UI form refuses it the same way).
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", {"learning_rates": [0.01, 0]})
    assert code != 0
    assert summary is None
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


def task_states(summary: dict) -> dict[str, str]:
    return {task: info["state"] for task, info in summary["tasks"].items()}


def test_params_a_schema_lets_through_are_refused_before_any_spark_job(airflow_env, raw_dataset, bucket, tmp_path):
    ws = f"s3://{bucket}/e2e-params"
    refused_when_validate_params_starts = {
        # NaN passes the Params' JSON Schema when the run is created (every bound compares False
        # with NaN), but reaches the task as null (the conf travels as strict JSON): Airflow's own
        # check of the Params refuses it as validate_params starts, before any code of ours.
        "nan": ({"learning_rates": [0.001, float("nan")]}, "Invalid input for param learning_rates: None is not of type 'number'"),
        # 11 x 10 x 10 points: within every bound, but more trials than a grid may have.
        "grid": (
            {"learning_rates": [0.0001 * (i + 1) for i in range(11)], "hidden_units": list(range(1, 11)), "batch_sizes": list(range(1, 11))},
            "invalid parameters: the grid has 1100 trials, more than 1000: use random search or a smaller grid",
        ),
    }
    for name, (change, message) in refused_when_validate_params_starts.items():
        conf = {"dataset_uri": raw_dataset, "workspace_uri": ws, **change}
        (tmp_path / name).mkdir()
        code, summary, output = run_dag(airflow_env, tmp_path / name, "tuning_pipeline", conf)
        assert code == 1, (name, output[-3000:])
        assert summary is not None, (name, output[-3000:])
        states = task_states(summary)
        assert states["validate_params"] == "failed", (name, states)
        assert states["prepare_data"] == states["tune"] == states["export_best_model"] == "upstream_failed"
        assert message in output, (name, output[-3000:])
    assert storage.list_keys(ws + "/") == []  # no job wrote anything

    # A seed beyond 32 bits is refused when the run is created (its Param's maximum): no run at all.
    (tmp_path / "seed").mkdir()
    code, summary, output = run_dag(
        airflow_env, tmp_path / "seed", "tuning_pipeline", {"dataset_uri": raw_dataset, "workspace_uri": ws, "seed": 2**32}
    )
    assert code != 0
    assert summary is None
    assert "seed" in output
    assert "4294967295" in output

    # The same kind of space 10^8 points large, with random search: sampled by index (never built),
    # so validation gets past it at once; only the empty dataset location stops this run.
    huge = {
        "learning_rates": [0.0001 * (i + 1) for i in range(100)],
        "hidden_units": list(range(1, 101)),
        "batch_sizes": list(range(1, 101)),
        "dropouts": [i / 200 for i in range(100)],
        "search_strategy": "random",
        "num_random_trials": 1000,
    }
    empty = f"s3://{bucket}/e2e-params-nothing/"
    (tmp_path / "huge").mkdir()
    code, summary, output = run_dag(
        airflow_env, tmp_path / "huge", "tuning_pipeline", {"dataset_uri": empty, "workspace_uri": ws, **huge}, timeout=600
    )
    assert code == 1
    assert task_states(summary)["validate_params"] == "failed"
    assert f"invalid parameters: dataset_uri {empty} holds no objects" in output
    assert "trials, more than" not in output


def test_a_trial_that_kills_its_worker_is_recorded_and_the_run_ends_green(airflow_env, raw_dataset, bucket, tmp_path):
    """The trial with 48 hidden units SIGKILLs its own Python worker (the test-only hook). Local mode
    retries a task only with a master local[N,F]: the connection gives local[2,2]."""
    env = {
        **airflow_env,
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2,2]"}),
        trials.CRASH_TEST_ENV: '"hidden_units": 48',
    }
    conf = {
        "dataset_uri": raw_dataset,
        "workspace_uri": f"s3://{bucket}/e2e-crash/ws",
        "model_name": "digits",
        "model_family": "mlp",
        "learning_rates": [0.003],
        "hidden_units": [32, 48],
        "epochs": 1,
        "patience": 1,
        "batch_sizes": [32],
        "validation_fraction": 0.2,
        "test_fraction": 0.2,
    }
    code, summary, output = run_dag(env, tmp_path, "tuning_pipeline", conf)
    assert code == 0, output[-6000:]
    assert not_green(summary) == {}
    tune = summary["tasks"]["tune"]["xcom"]
    assert (tune["trials"], tune["succeeded"], tune["failed"]) == (2, 1, 1)
    [failed] = tune["failed_trials"]
    assert failed["reason"] == "crashed: the Python worker died during training (attempt 0)"
    assert "Python worker exited unexpectedly" in output  # the process really died
    results = storage.read_json(tune["results_uri"])
    assert {r["trial_id"]: r["params"]["hidden_units"] for r in results["trials"]}[failed["trial_id"]] == 48
    export = summary["tasks"]["export_best_model"]["xcom"]
    assert export["trial_id"] == tune["best"]["trial_id"] != failed["trial_id"]
    assert export["promoted"]
    assert export["promotion_reason"] == "no champion yet"


def test_the_champion_policy_reaches_the_export_job():
    """The Trigger form offers champion_policy (compare by default, or replace) and refuses anything
    else; the export task passes it to the job's parser. A DAG parse only: no run."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict

    from sparktf.jobs import export_model

    bag = DagBag(dag_folder=str(ROOT / "dags" / "tuning_pipeline.py"))
    assert bag.import_errors == {}
    dag = bag.dags["tuning_pipeline"]
    param = dag.params.get_param("champion_policy")
    assert param.value == "compare"
    assert param.schema["enum"] == ["compare", "replace"]

    def params_with(value: str) -> ParamsDict:
        return ParamsDict({"champion_policy": Param(value, **param.schema)})

    params_with("replace").validate()
    with pytest.raises(ParamValidationError):
        params_with("sometimes").validate()
    args = dag.task_dict["export_best_model"].application_args
    flag = args.index("--champion-policy")
    assert args[flag + 1] == "{{ params.champion_policy }}"
    rendered = [args[flag], args[flag + 1].replace("{{ params.champion_policy }}", "replace")]
    parsed = export_model.parse_args(
        ["--results-uri", "s3://b/r.json", "--models-uri", "s3://b/m/", "--model-name", "m", "--source-run", "r", "--trained-at", "t", *rendered]
    )
    assert parsed.champion_policy == "replace"


def test_a_run_on_other_labels_under_the_same_model_name_does_not_move_the_champion(tuning_run, mnist_subset, bucket, airflow_env, tmp_path):
    """A user points the DAG at another data set (same input size, other classes) under the same
    model_name: the new version is exported, the champion stays, and the run says why (XCom and
    note). With champion_policy=replace the user moves it on purpose."""
    conf, first, _output = tuning_run
    images, labels = mnist_subset[0], mnist_subset[1]
    raw = f"s3://{bucket}/e2e-tuning/raw-odd-even/"
    client = storage.client()
    for name, digits in (("even", (0, 2)), ("odd", (1, 3))):
        for n, index in enumerate(np.flatnonzero(np.isin(labels, digits))[:40]):
            storage.write_bytes(f"{raw}{name}/{n:03d}.png", png(images[index]), client)
    other = {**conf, "dataset_uri": raw, "model_family": "mlp", "learning_rates": [0.003], "hidden_units": [32], "epochs": 1, "patience": 1}
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", other)
    assert code == 0, output[-6000:]
    export = summary["tasks"]["export_best_model"]["xcom"]
    assert export["version"] > 1
    assert export["promoted"] is False
    assert export["champion_version"] == first["tasks"]["export_best_model"]["xcom"]["version"] == 1
    assert "trained on labels" in export["promotion_reason"]
    assert "even" in export["promotion_reason"]
    assert "not promoted" in summary["note"]
    assert registry.resolve(conf["workspace_uri"] + "/models/", "digits")["version"] == 1

    (tmp_path / "replace").mkdir()
    code, summary, output = run_dag(airflow_env, tmp_path / "replace", "tuning_pipeline", {**other, "champion_policy": "replace"})
    assert code == 0, output[-6000:]
    export = summary["tasks"]["export_best_model"]["xcom"]
    assert export["promoted"] is True
    assert registry.resolve(conf["workspace_uri"] + "/models/", "digits")["label_names"] == ["even", "odd"]
