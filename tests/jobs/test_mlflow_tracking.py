"""MLflow tracking against a real MLflow server (SQLite, local artifacts): what a user sees through MLflow's own client."""

from __future__ import annotations

import json
import subprocess
import sys

from sparktf import registry
from sparktf.airflow import mlflow_tracking
from sparktf_dev.testing import ROOT, free_port, register_trial, train_tiny_model

TIMESTAMP = 1_795_000_000_000


def trial(trial_id: str, lr: float, status: str = "ok", reason: str | None = None) -> dict:
    history = {"loss": [1.2, 0.8], "accuracy": [0.5, 0.7], "val_loss": [1.0, 0.9], "val_accuracy": [0.6, 0.75]} if status == "ok" else None
    record = {"trial_id": trial_id, "status": status, "reason": reason, "params": {"learning_rate": lr, "hidden_units": 32}, "history": history}
    if status == "ok":
        record.update(val_accuracy=0.75, val_loss=0.9, test_accuracy=0.72, test_loss=0.95, epochs_run=2, train_seconds=3.5)
    return record


def plan(run_id: str, model: str) -> dict:
    results = {
        "trials": [trial("t-001", 0.001), trial("t-002", 0.3, "failed", "diverged: training loss became NaN/inf in epoch 1")],
        "leaderboard": [{"rank": 1, "trial_id": "t-001", "learning_rate": 0.001, "val_accuracy": 0.75}],
    }
    tune = {"trials": 2, "succeeded": 1, "failed": 1, "selection_metric": "val_accuracy", "best": {"trial_id": "t-001", "val_accuracy": 0.75}}
    params = {"model_name": model, "learning_rates": [0.001, 0.3], "epochs": 2}
    return mlflow_tracking.tuning_plan(
        run_id=run_id, params=params, prepared={"content_sha256": "ab" * 32}, tune=tune, results=results, timestamp=TIMESTAMP
    )


def test_epoch_metrics_are_steps_with_train_and_val_names():
    metrics = mlflow_tracking.epoch_metrics({"loss": [1.0, float("nan")], "val_accuracy": [0.5, 0.6]}, 7)
    assert [(m["key"], m["step"], m["value"]) for m in metrics] == [("train_loss", 0, 1.0), ("val_accuracy", 0, 0.5), ("val_accuracy", 1, 0.6)]


def test_tuning_run_with_trials_as_children_logged_once(mlflow_server):
    """A retry of the same Airflow run logs nothing twice: one parent, one child per trial, one point per epoch."""
    settings = {"uri": mlflow_server.uri, "auth": None}
    steps = [("tuning run", lambda client: mlflow_tracking.log_plan(client, plan("manual__retry", "digits-a"), "manual__retry", TIMESTAMP))]
    first = mlflow_tracking.outcome(settings, steps)
    again = mlflow_tracking.outcome(settings, steps)
    assert first["not_logged"] == []
    assert again["not_logged"] == []
    assert first["ids"]["tuning run"] == again["ids"]["tuning run"]
    seen = mlflow_server.read(
        "exp = client.get_experiment_by_name('digits-a/tuning')\n"
        "runs = client.search_runs([exp.experiment_id])\n"
        "parent = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags][0]\n"
        "kids = {r.data.tags['sparktf.trial_id']: r for r in runs if r.data.tags.get('mlflow.parentRunId') == parent.info.run_id}\n"
        "tags = parent.data.tags\n"
        "result = {'runs': len(runs), 'parent': [parent.info.run_name, parent.info.status, parent.data.params, tags['prepared_content_sha256']],\n"
        " 'artifacts': sorted(a.path for a in client.list_artifacts(parent.info.run_id)),\n"
        " 'table': json.load(open(client.download_artifacts(parent.info.run_id, 'leaderboard.json'))),\n"
        " 'kids': {k: [r.info.status, r.data.params, r.data.tags.get('status'), r.data.tags.get('reason'),\n"
        "   [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, 'val_accuracy')]] for k, r in kids.items()}}\n"
    )
    assert seen["runs"] == 3
    assert seen["parent"][:2] == ["manual__retry", "FINISHED"]
    assert seen["parent"][2]["learning_rates"] == "[0.001, 0.3]"
    assert seen["parent"][3] == "ab" * 32
    assert seen["artifacts"] == ["leaderboard.json"]
    assert seen["table"] == {"columns": ["rank", "trial_id", "learning_rate", "val_accuracy"], "data": [[1, "t-001", 0.001, 0.75]]}
    assert seen["kids"]["t-001"] == ["FINISHED", {"learning_rate": "0.001", "hidden_units": "32"}, "ok", None, [[0, 0.6], [1, 0.75]]]
    status, _params, _tag, reason, history = seen["kids"]["t-002"]
    assert status == "FAILED"
    assert reason.startswith("diverged:")
    assert history == []


def test_mlflow_down_is_reported_not_raised():
    """Nothing listens on the port: the outcome names what was not logged; the note says so, without credentials."""
    settings = {"uri": f"http://user:secret@127.0.0.1:{free_port()}", "auth": None}
    steps = [("tuning run", lambda c: mlflow_tracking.experiment_id(c, "x")), ("champion alias", lambda c: None)]
    result = mlflow_tracking.outcome(settings, steps)
    assert result["logged"] == []
    assert result["not_logged"] == ["tuning run", "champion alias"]
    assert "unreachable" in result["error"]
    (line,) = mlflow_tracking.note_lines(result)
    assert "**not logged**: tuning run, champion alias" in line
    assert "secret" not in line
    assert "clear the `mlflow` task" in line
    assert mlflow_tracking.note_lines({"logged": ["x"], "not_logged": []}) == []


def test_without_configuration_nothing_is_configured_or_imported():
    """No connection, no MLFLOW_TRACKING_URI: no settings, and the DAG files and the module import no mlflow."""
    code = (
        "import os, sys; os.environ.pop('MLFLOW_TRACKING_URI', None); os.environ.pop('AIRFLOW_CONN_MLFLOW_DEFAULT', None)\n"
        "import runpy; [runpy.run_path(f'dags/{n}.py') for n in ('tuning_pipeline', 'nightly_inference', 'register_model')]\n"
        "from sparktf.airflow import mlflow_tracking\n"
        "assert mlflow_tracking.tracking_settings() is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == []


def test_champion_alias_follows_the_s3_pointer_never_the_other_way(mlflow_server, s3_prefix, mnist_subset):
    """No alias yet → set; S3's champion moves → the alias moves; an alias moved by hand in MLflow goes back to S3's."""
    models_uri, name = s3_prefix + "/models/", "alias-digits"
    record = train_tiny_model(s3_prefix + "/scratch", mnist_subset)
    client = mlflow_tracking.TrackingClient(mlflow_server.uri)
    read = (
        f"versions = {{v.tags['sparktf.version']: v.version for v in client.search_model_versions(\"name = '{name}'\")}}\n"
        f"result = [versions, client.get_model_version_by_alias('{name}', 'champion').tags['sparktf.version']]\n"
    )
    register_trial(models_uri, name, record)
    assert mlflow_tracking.sync_champion_alias(client, models_uri, name) == "1"
    assert mlflow_server.read(read)[1] == "1"
    register_trial(models_uri, name, record)  # version 2 becomes champion in S3
    assert mlflow_tracking.sync_champion_alias(client, models_uri, name) == "2"
    versions, champion = mlflow_server.read(read)
    assert champion == "2"
    client.call("POST", "registered-models/alias", {"name": name, "alias": "champion", "version": versions["1"]})  # by hand, in MLflow
    mlflow_tracking.sync_champion_alias(client, models_uri, name)
    assert mlflow_server.read(read) == [versions, "2"]
    assert registry.read_champion(models_uri, name)["version"] == 2  # S3 untouched


def test_register_steps_log_the_imported_version_and_the_alias_follows_a_promote(mlflow_server, s3_prefix, mnist_subset):
    """register_model's steps: each version registered once; the alias stays without a promote and follows one; down is reported."""
    models_uri, name = s3_prefix + "/models/", "imported-digits"
    record = train_tiny_model(s3_prefix + "/scratch", mnist_subset)
    settings, params = {"uri": mlflow_server.uri, "auth": None}, {"workspace_uri": s3_prefix, "model_name": name}
    read = (
        f"versions = {{v.tags['sparktf.version']: v.version for v in client.search_model_versions(\"name = '{name}'\")}}\n"
        f"result = [versions, client.get_model_version_by_alias('{name}', 'champion').tags['sparktf.version']]\n"
    )

    def run(version: int) -> dict:
        return mlflow_tracking.outcome(settings, mlflow_tracking.register_steps(params=params, registered={"registered": True, "version": version}))

    register_trial(models_uri, name, record)  # version 1, champion
    assert run(1)["logged"] == ["model version 1", "champion alias"]
    register_trial(models_uri, name, record, champion=False)  # version 2, promote=false
    assert run(2)["ids"] == {"model version 2": mlflow_server.read(read)[0]["2"], "champion alias": "1"}
    assert mlflow_server.read(read)[1] == "1"
    registry.set_champion(models_uri, name, registry.champion_pointer(registry.resolve(models_uri, name, 2)))  # what promote=true does
    assert run(2)["not_logged"] == []  # the same run again (a retry): nothing created twice
    versions, champion = mlflow_server.read(read)
    assert (sorted(versions), champion) == (["1", "2"], "2")
    refused = mlflow_tracking.register_steps(params=params, registered={"registered": False, "refused": "Lambda layers"})
    assert [what for what, _ in refused] == ["champion alias"]
    down = mlflow_tracking.outcome(
        {"uri": f"http://127.0.0.1:{free_port()}", "auth": None},
        mlflow_tracking.register_steps(params=params, registered={"registered": True, "version": 2}),
    )
    assert down["not_logged"] == ["model version 2", "champion alias"]
