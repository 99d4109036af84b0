#!/usr/bin/env bash
# The main command: set up, start the embedded stack, upload the demo data, run the tuning DAG
# through Airflow and print a short summary of each run (full JSON and figure in .stack/). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
python scripts/stack.py start
airflow db migrate >/dev/null
python scripts/seed_demo.py
mkdir -p "$SPARKTF_STATE_DIR"
# A quick grid of the reference network: mnist_cnn without augmentation, lr 0.001 with 1024 hidden units is the
# default configuration, and the summary compares it with the tuned trial. (The DAG's own default Params train
# mnist_cnn_bn with augmentation for up to 15 epochs, made for full MNIST: 67 minutes on 2 cores, see BENCHMARKS.md.)
DEMO_GRID='{"model_family": "mnist_cnn", "augment": 0, "learning_rates": [0.001, 0.003], "hidden_units": [256, 1024], "epochs": 3, "patience": 2}'
echo "==> tuning_pipeline (2x2 grid of the reference network with the default configuration, up to 3 epochs, on the demo MNIST subset)"
python scripts/run_dag.py tuning_pipeline --conf "$DEMO_GRID" --json-out "$SPARKTF_STATE_DIR/tuning_pipeline.json" \
  > "$SPARKTF_STATE_DIR/tuning_pipeline.log" 2>&1 || { tail -n 80 "$SPARKTF_STATE_DIR/tuning_pipeline.log"; exit 1; }
python scripts/print_summary.py "$SPARKTF_STATE_DIR/tuning_pipeline.json"
echo
echo "==> nightly_inference: demo digits landed for 2026-11-20 and 2026-11-21, scored by the champion"
python scripts/seed_incoming.py --dates 2026-11-20,2026-11-21
# The 02:30 run of day D+1 covers D's data interval and scores partition incoming/D/.
for LOGICAL in 2026-11-21T02:30:00+00:00 2026-11-22T02:30:00+00:00; do
  OUT="$SPARKTF_STATE_DIR/nightly_inference_${LOGICAL:0:10}"
  python scripts/run_dag.py nightly_inference --logical-date "$LOGICAL" --json-out "$OUT.json" \
    > "$OUT.log" 2>&1 || { tail -n 80 "$OUT.log"; exit 1; }
  python scripts/print_summary.py "$OUT.json"
done
echo
echo "The S3 server keeps running (objects stay, so a second run competes with this champion)."
echo "Stop it with: source scripts/env.sh && python scripts/stack.py stop"
echo "See these runs in the Airflow UI: source scripts/env.sh && python scripts/ui.py start  (http://127.0.0.1:8080)"
