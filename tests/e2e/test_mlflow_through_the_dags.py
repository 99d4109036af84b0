"""MLflow through the DAGs: a tuning run with MLflow down stays green and says what it did not log; the same
run again with MLflow up fills it in; once more adds nothing; the nightly run of its champion is logged too.
Read back with MLflow's own client, as a user would see it."""

from __future__ import annotations

import pytest

from sparktf import registry, storage
from sparktf_dev.testing import free_port, land_partition, run_dag, upload_mnist

pytestmark = pytest.mark.e2e
MODEL = "digits-mlflow"
TUNING_DATE = "2026-11-29T03:00:00+00:00"
NIGHTLY = ("2026-11-21T02:30:00+00:00", "2026-11-20")

READ_TUNING = """
exp = client.get_experiment_by_name(%r)
runs = client.search_runs([exp.experiment_id])
parents = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags]
kids = [r for r in runs if 'mlflow.parentRunId' in r.data.tags]
parent = parents[0]
versions = client.search_model_versions("name = '%s'")
champion = client.get_model_version_by_alias(%r, 'champion')
result = {
    'parents': [(r.info.run_name, r.info.status) for r in parents],
    'params': parent.data.params, 'tags': parent.data.tags,
    'artifacts': sorted(a.path for a in client.list_artifacts(parent.info.run_id)),
    'kids': sorted((r.data.tags['sparktf.trial_id'], r.data.tags['status'], r.info.status, r.data.tags['mlflow.parentRunId'] == parent.info.run_id,
                    r.data.params['learning_rate'], len(client.get_metric_history(r.info.run_id, 'val_accuracy')),
                    len(client.get_metric_history(r.info.run_id, 'train_loss'))) for r in kids),
    'versions': [(v.version, v.source, v.tags.get('sparktf.version'), v.tags.get('model_sha256'), v.run_id) for v in versions],
    'parent_run_id': parent.info.run_id,
    'champion': [champion.version, champion.tags.get('sparktf.version')],
}
"""


@pytest.fixture(scope="module")
def workspace(bucket, mnist_subset) -> dict:
    ws = f"s3://{bucket}/e2e-mlflow/ws"
    upload_mnist(f"s3://{bucket}/e2e-mlflow/mnist/", mnist_subset, train_limit=400, test_limit=100)
    _tx, _ty, test_x, test_y = mnist_subset
    land_partition(ws + "/incoming/", NIGHTLY[1], test_x[:12], test_y[:12])  # with bad files: set-aside reasons
    conf = {
        "dataset_uri": f"s3://{bucket}/e2e-mlflow/mnist/",
        "workspace_uri": ws,
        "model_name": MODEL,
        "model_family": "mlp",
        "augment": 0,
        "learning_rates": [0.001, 0.01],
        "hidden_units": [32],
        "batch_sizes": [64],
        "epochs": 2,
        "patience": 2,
    }
    return {"ws": ws, "tuning": conf}


def with_mlflow(env: dict, uri: str) -> dict:
    return {**env, "AIRFLOW_CONN_MLFLOW_DEFAULT": f'{{"conn_type": "http", "host": "{uri}"}}'}


@pytest.fixture(scope="module")
def tuning_runs(airflow_env, mlflow_server, workspace, tmp_path_factory) -> list[dict]:
    """The same tuning run (same logical date, same run id) three times: MLflow down, up, up."""
    summaries = []
    for uri in (f"http://127.0.0.1:{free_port()}", mlflow_server.uri, mlflow_server.uri):
        code, summary, output = run_dag(
            with_mlflow(airflow_env, uri), tmp_path_factory.mktemp("run"), "tuning_pipeline", workspace["tuning"], TUNING_DATE, run_after=TUNING_DATE
        )
        assert code == 0, output[-6000:]
        summaries.append(summary)
    return summaries


def test_mlflow_down_leaves_the_run_green_and_the_note_says_what_was_not_logged(tuning_runs):
    down = tuning_runs[0]
    assert down["state"].endswith("success")
    assert down["tasks"]["mlflow"]["state"] == "success"
    result = down["tasks"]["mlflow"]["xcom"]
    assert result["logged"] == []
    assert result["not_logged"] == ["tuning run and 2 trials", "model version 1", "champion alias"]
    assert "unreachable" in result["error"]
    assert "**not logged**: tuning run and 2 trials, model version 1, champion alias" in down["note"]
    assert "clear the `mlflow` task to fill it in" in down["note"]


def test_a_later_run_fills_it_in_and_a_retry_adds_nothing(tuning_runs, mlflow_server, workspace):
    down, filled, again = tuning_runs
    assert filled["run_id"] == down["run_id"] == again["run_id"]
    assert filled["tasks"]["mlflow"]["xcom"]["not_logged"] == []
    assert again["tasks"]["mlflow"]["xcom"]["not_logged"] == []
    assert "MLflow" not in filled["note"]
    seen = mlflow_server.read(READ_TUNING % (f"{MODEL}/tuning", MODEL, MODEL))
    assert seen["parents"] == [[filled["run_id"], "FINISHED"]]  # one run, not three
    assert len(seen["kids"]) == 2
    assert len(seen["versions"]) == 1
    assert (
        filled["tasks"]["mlflow"]["xcom"]["ids"]["tuning run and 2 trials"]
        == again["tasks"]["mlflow"]["xcom"]["ids"]["tuning run and 2 trials"]
        == seen["parent_run_id"]
    )


def test_the_user_sees_params_data_hash_leaderboard_figure_and_trials(tuning_runs, mlflow_server):
    summary = tuning_runs[1]
    seen = mlflow_server.read(READ_TUNING % (f"{MODEL}/tuning", MODEL, MODEL))
    assert seen["params"]["learning_rates"] == "[0.001, 0.01]"
    assert seen["params"]["model_family"] == "mlp"
    assert seen["tags"]["prepared_content_sha256"] == summary["tasks"]["prepare_data"]["xcom"]["content_sha256"]
    assert seen["params"]["prepared_content_sha256"] == summary["tasks"]["prepare_data"]["xcom"]["content_sha256"]
    assert seen["tags"]["best_trial_id"] == summary["tasks"]["tune"]["xcom"]["best"]["trial_id"]
    assert seen["artifacts"] == ["leaderboard.json", "test_error_vs_learning_rate.png"]
    for trial_id, status, run_status, is_child, lr, val_points, train_points in seen["kids"]:
        assert trial_id.startswith("t")
        assert (status, run_status, is_child) == ("ok", "FINISHED", True)
        assert lr in ("0.001", "0.01")
        assert 1 <= val_points == train_points <= 2  # one point per epoch run


def test_model_version_names_the_registry_copy_and_the_alias_follows_s3(tuning_runs, mlflow_server, workspace):
    seen = mlflow_server.read(READ_TUNING % (f"{MODEL}/tuning", MODEL, MODEL))
    metadata = registry.resolve(workspace["ws"] + "/models/", MODEL)
    ((number, source, registry_version, sha256, run_id),) = seen["versions"]
    assert (source, registry_version, sha256) == (metadata["model_uri"], "1", metadata["model_sha256"])
    assert run_id == seen["parent_run_id"]
    assert seen["champion"] == [number, "1"]


def test_a_nightly_run_logs_counts_reasons_and_labels(tuning_runs, airflow_env, mlflow_server, workspace, tmp_path):
    conf = {"workspace_uri": workspace["ws"], "model_name": MODEL, "max_failure_ratio": 0.5}  # 8 of 20 set aside on purpose
    code, summary, output = run_dag(with_mlflow(airflow_env, mlflow_server.uri), tmp_path, "nightly_inference", conf, logical_date=NIGHTLY[0])
    assert code == 0, output[-6000:]
    published = summary["tasks"]["publish"]["xcom"]
    assert summary["tasks"]["mlflow"]["xcom"]["not_logged"] == []
    seen = mlflow_server.read(
        f"exp = client.get_experiment_by_name('{MODEL}/nightly')\n"
        "(run,) = client.search_runs([exp.experiment_id])\n"
        "result = {'params': run.data.params, 'metrics': run.data.metrics, 'tags': run.data.tags,\n"
        " 'artifacts': sorted(a.path for a in client.list_artifacts(run.info.run_id))}\n"
    )
    assert seen["params"]["date"] == NIGHTLY[1]
    assert seen["params"]["model_version"] == str(published["model_version"])
    assert seen["metrics"]["scored"] == published["scored"]
    assert seen["metrics"]["set_aside"] == published["set_aside"] > 0
    assert {k: v for k, v in seen["metrics"].items() if k.startswith("set_aside_")} == {
        f"set_aside_{reason}": count for reason, count in published["reasons"].items()
    }
    assert sum(v for k, v in seen["metrics"].items() if k.startswith("label_")) == published["scored"]
    assert seen["artifacts"] == ["label_histogram.json", "set_aside_reasons.json"]


def test_a_register_model_run_with_promote_moves_the_alias_with_the_s3_champion(tuning_runs, airflow_env, mlflow_server, workspace, tmp_path):
    """Last in this module (it adds version 2): register_model with promote moves S3's champion, and MLflow's alias follows at once."""
    ws, tuned = workspace["ws"], registry.resolve(workspace["ws"] + "/models/", MODEL)
    storage.write_bytes(ws + "/uploads/digits.keras", storage.read_bytes(tuned["model_uri"]))  # a user's own .keras upload
    storage.write_bytes(ws + "/uploads/labels.txt", "\n".join(str(d) for d in range(10)).encode())
    conf = {
        "workspace_uri": ws,
        "model_name": MODEL,
        "source": "keras_file",
        "model_uri": ws + "/uploads/digits.keras",
        "labels": "label_map",
        "label_map_uri": ws + "/uploads/labels.txt",
        "resize_policy": "resize",
        "promote": True,
    }
    code, summary, output = run_dag(with_mlflow(airflow_env, mlflow_server.uri), tmp_path, "register_model", conf)
    assert code == 0, output[-6000:]
    registered = summary["tasks"]["check_registered"]["xcom"]
    assert (registered["version"], registered["promoted"]) == (tuned["version"] + 1, True)
    assert registry.read_champion(ws + "/models/", MODEL)["version"] == registered["version"]
    assert summary["tasks"]["mlflow"]["xcom"]["not_logged"] == []
    seen = mlflow_server.read(READ_TUNING % (f"{MODEL}/tuning", MODEL, MODEL))
    number, source, _version, sha256, run_id = next(v for v in seen["versions"] if v[2] == str(registered["version"]))
    assert (source, sha256, run_id) == (registered["model_uri"], registered["model_sha256"], "")  # no MLflow run: MLflow's client says ""
    assert seen["champion"] == [number, str(registered["version"])]
    assert len(seen["versions"]) == 2
