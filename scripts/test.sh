#!/usr/bin/env bash
# The test command: set up the environment from requirements.txt, then run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not e2e"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
echo "==> ruff check (lint, with Airflow's AIR rules)"
ruff check .
echo "==> ruff format --check"
ruff format --check .
exec python -m pytest "$@"
