#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from requirements.txt. Idempotent: it
# reinstalls only when requirements.txt changed since the last successful install.
set -euo pipefail
source "$(dirname "$0")/env.sh"
stamp="$VENV/.requirements.sha256"
want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment in $VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing requirements (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
  echo "$want" > "$stamp"
fi
# The sparktf library (plugins/sparktf), installed in editable mode: importable everywhere
# (tests, benchmarks, Spark's local Python workers) without any path edits.
if ! "$VENV/bin/python" -c "import sparktf, sys; sys.exit(0 if sparktf.__file__.startswith('$ROOT/') else 1)" 2>/dev/null; then
  echo "==> installing the sparktf package (editable)"
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
fi
# The development harness (devtools/sparktf_dev: tests, benchmarks and scripts use it), editable too;
# never part of the library or of the executors' zip.
if ! "$VENV/bin/python" -c "import sparktf_dev, sys; sys.exit(0 if sparktf_dev.__file__.startswith('$ROOT/') else 1)" 2>/dev/null; then
  echo "==> installing the sparktf_dev harness (editable)"
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT/devtools"
fi
# The MLflow tracking server the tests start (devtools/sparktf_dev/mlflow_server.py): full mlflow in a
# venv of its own, never in the Airflow venv above (it pins versions Airflow's do not match). Skipped
# when requirements-mlflow-server.txt is already installed there.
MLFLOW_VENV="$ROOT/.stack/mlflow-venv"
mlflow_stamp="$MLFLOW_VENV/.requirements.sha256"
mlflow_want="$(sha256sum "$ROOT/requirements-mlflow-server.txt" | cut -d' ' -f1)"
if [ "$(cat "$mlflow_stamp" 2>/dev/null)" != "$mlflow_want" ]; then
  echo "==> installing the MLflow tracking server for the tests in $MLFLOW_VENV"
  [ -x "$MLFLOW_VENV/bin/python" ] || python3 -m venv "$MLFLOW_VENV"
  "$MLFLOW_VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements-mlflow-server.txt"
  echo "$mlflow_want" > "$mlflow_stamp"
fi
if ! command -v java >/dev/null 2>&1; then
  echo "Java 17 is required by Spark: install it (e.g. apt-get install openjdk-17-jre-headless)" >&2
  exit 1
fi
