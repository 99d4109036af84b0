"""The tuning DAG with successive halving end to end through Airflow: real spark-submit, real TensorFlow, real S3."""

from __future__ import annotations

import pytest

from sparktf import storage
from sparktf_dev.testing import not_green, run_dag, upload_mnist

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def raw_digits(bucket, mnist_subset) -> str:
    """300 training and 100 test digits as MNIST IDX files."""
    prefix = f"s3://{bucket}/e2e-halving/raw"
    upload_mnist(prefix, mnist_subset, train_limit=300, test_limit=100)
    return prefix + "/"


def test_a_halving_run_trains_rungs_reports_utilisation_and_exports(airflow_env, raw_digits, bucket, tmp_path):
    conf = {
        "dataset_uri": raw_digits,
        "workspace_uri": f"s3://{bucket}/e2e-halving/ws",
        "model_name": "digits-halving",
        "model_family": "mlp",
        "augment": 0,
        "learning_rates": [0.01, 0.003],
        "hidden_units": [16, 32],
        "batch_sizes": [32],
        "epochs": 2,
        "search_strategy": "halving",
        "halving_min_epochs": 1,
        "halving_factor": 2,
    }
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", conf)
    assert code == 0, output[-6000:]
    assert not_green(summary) == {}
    tune = summary["tasks"]["tune"]["xcom"]
    assert tune["halving"]["rungs"] == [1, 2]
    assert 0 < tune["halving"]["slot_utilisation"] <= 1
    assert tune["leaderboard"][0]["rung"] == 1
    assert summary["tasks"]["export_best_model"]["xcom"]["trial_id"] == tune["best"]["trial_id"]
    results = storage.read_json(tune["results_uri"])
    assert tune["halving"]["trial_epochs"] == sum(r["epochs_run"] for r in results["trials"])
    progress = [line for line in output.splitlines() if "tuning progress: step" in line]
    assert len(progress) == tune["halving"]["rung_steps"]
    assert all("reached rung" in line for line in progress)


def test_a_first_rung_above_epochs_is_refused_before_any_spark_job(airflow_env, raw_digits, bucket, tmp_path):
    ws = f"s3://{bucket}/e2e-halving-refused/ws"
    conf = {"dataset_uri": raw_digits, "workspace_uri": ws, "search_strategy": "halving", "halving_min_epochs": 5, "epochs": 3}
    code, summary, output = run_dag(airflow_env, tmp_path, "tuning_pipeline", conf)
    assert code == 1
    states = {task: info["state"] for task, info in summary["tasks"].items()}
    assert states["validate_params"] == "failed"
    assert states["tune"] == "upstream_failed"
    assert "halving_min_epochs (5) is above epochs (3)" in output
    assert storage.list_keys(ws + "/") == []
