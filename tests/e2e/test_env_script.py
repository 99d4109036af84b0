"""scripts/env.sh can be sourced again (as the README's stop/UI commands do after the demo), and a
connection that cannot be read is refused by name instead of a traceback or a spark-submit to YARN.

``${VAR:-{"json": ...}}`` ends at the JSON's first ``}``: with the variable already set, the old
env.sh appended a stray ``}`` to both AIRFLOW_CONN_* values, and the Spark provider then logged
"Could not load connection string spark_default, defaulting to yarn".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from sparktf import storage
from sparktf.airflow.spark_job_operator import SparkJobOperator, job_path
from sparktf_dev.testing import ROOT

CONN_VARIABLES = ("AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_SPARK_DEFAULT")
BROKEN = '{"conn_type": "spark", "host": "local[2]"}}'  # what a second `source` of the old env.sh left


def sourced_twice(env: dict[str, str], then: str = "true") -> subprocess.CompletedProcess:
    """Run ``then`` in bash after sourcing scripts/env.sh twice, printing both connections before it."""
    script = (
        f'source "{ROOT}/scripts/env.sh"; first=$(printf "%s\\n%s" "$AIRFLOW_CONN_AWS_DEFAULT" "$AIRFLOW_CONN_SPARK_DEFAULT"); '
        f'source "{ROOT}/scripts/env.sh"; printf "%s\\n===\\n%s\\n%s\\n===\\n" "$first" "$AIRFLOW_CONN_AWS_DEFAULT" '
        f'"$AIRFLOW_CONN_SPARK_DEFAULT"; {then}'
    )
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=1500)


def clean_env(base: dict[str, str]) -> dict[str, str]:
    env = {name: value for name, value in base.items() if name not in CONN_VARIABLES}
    env["VENV"] = str(Path(sys.executable).parent.parent)
    return env


def test_sourcing_env_sh_twice_keeps_both_connections_valid_and_unchanged():
    proc = sourced_twice(clean_env(dict(os.environ)))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("===\n")[:2]
    assert first.strip() == second.strip()
    aws, spark = (json.loads(line) for line in second.strip().splitlines())
    assert aws["conn_type"] == "aws"
    assert aws["extra"]["endpoint_url"].startswith("http://127.0.0.1:")
    assert spark == {"conn_type": "spark", "host": os.environ.get("SPARKTF_SPARK_MASTER", "local[2,4]")}


def test_seed_demo_names_an_unparsable_connection(tmp_path):
    env = {**clean_env(dict(os.environ)), "AIRFLOW_CONN_AWS_DEFAULT": BROKEN.replace("spark", "aws")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "seed_demo.py")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "AIRFLOW_CONN_AWS_DEFAULT is not valid JSON" in proc.stderr, proc.stderr
    assert "aws_default" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def spark_submit_stub(tmp_path, monkeypatch) -> Path:
    """A ``spark-submit`` first on PATH that only records that it was started."""
    marker = tmp_path / "spark-submit-started"
    stub = tmp_path / "bin" / "spark-submit"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$*" > {marker}\nexit 1\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    return marker


@pytest.mark.parametrize(
    ("spark_default", "message"),
    [
        (BROKEN, "AIRFLOW_CONN_SPARK_DEFAULT is not valid JSON"),
        (None, "connection 'spark_default' is not defined"),
    ],
)
def test_operator_refuses_an_unusable_spark_default_before_spark_submit(s3_server, s3_prefix, spark_submit_stub, monkeypatch, spark_default, message):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", s3_server.connection_json())
    if spark_default is None:
        monkeypatch.delenv("AIRFLOW_CONN_SPARK_DEFAULT", raising=False)
    else:
        monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", spark_default)
    result_uri = f"{s3_prefix}/_results/prepare.json"
    operator = SparkJobOperator(task_id="prepare_data", application=job_path("prepare_data.py"), result_uri=result_uri)
    with pytest.raises(AirflowFailException) as refused:
        operator.execute(context={})
    assert "spark_default" in str(refused.value)
    assert message in str(refused.value)
    assert "local[2]" not in str(refused.value)  # the value itself (it may hold secrets) is never shown
    assert not spark_submit_stub.exists(), "spark-submit was started"


@pytest.fixture(scope="module")
def keras_upload(s3_server, bucket, tmp_path_factory) -> dict[str, str]:
    """A small user .keras file (10 classes) and its label map, uploaded as a user would."""
    path = tmp_path_factory.mktemp("model") / "digits.keras"
    build = (
        "import keras, sys; from sparktf.models import build_model; keras.utils.set_random_seed(1); "
        "build_model('mlp', (28, 28, 1), 10, hidden_units=8).save(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", build, str(path)], check=True, capture_output=True, timeout=300)
    ws = f"s3://{bucket}/e2e-env-sh"
    storage.write_bytes(f"{ws}/uploads/digits.keras", path.read_bytes())
    storage.write_bytes(f"{ws}/uploads/labels.txt", "\n".join(str(d) for d in range(10)).encode())
    return {"ws": ws, "model_uri": f"{ws}/uploads/digits.keras", "label_map_uri": f"{ws}/uploads/labels.txt"}


@pytest.mark.e2e
def test_a_dag_runs_after_env_sh_was_sourced_twice(airflow_env, s3_endpoint, keras_upload, tmp_path):
    """register_model (validate_params reads S3 through aws_default, then a Spark job through
    spark_default) with both connections as the twice-sourced env.sh leaves them."""
    env = {**clean_env(airflow_env), "SPARKTF_S3_ENDPOINT": s3_endpoint, "SPARKTF_AIRFLOW_HOME": airflow_env["AIRFLOW_HOME"]}
    conf = {
        "workspace_uri": keras_upload["ws"],
        "model_name": "digits-env-sh",
        "source": "keras_file",
        "model_uri": keras_upload["model_uri"],
        "labels": "label_map",
        "label_map_uri": keras_upload["label_map_uri"],
        "resize_policy": "resize",
    }
    out = tmp_path / "summary.json"
    proc = sourced_twice(env, f"python {ROOT / 'scripts' / 'run_dag.py'} register_model --conf '{json.dumps(conf)}' --json-out {out}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads(out.read_text())
    assert {task: info["state"] for task, info in summary["tasks"].items()} == {
        "validate_params": "success",
        "register_model": "success",
        "check_registered": "success",
        "mlflow": "skipped",  # no MLflow configured
    }
    assert summary["tasks"]["register_model"]["xcom"]["registered"] is True
    assert "defaulting to yarn" not in proc.stdout + proc.stderr
