"""DAG parse time: each file in dags/ parsed by Airflow's DagBag in a fresh interpreter.

For every ``dags/*.py`` file, ``--runs`` times (default 3), a fresh Python process with the
project's Airflow environment (``scripts/env.sh``: AIRFLOW_HOME, the DAGs and plugins folders, the
venv; ``sparktf`` itself is importable through its editable install)
imports Airflow and the DagBag class (reported separately: the DAG processor has paid for it
already), then times:

* ``cold``: ``DagBag(dag_folder=<file>)`` -- the first parse in the process, which also imports
  whatever the file imports (airflow.sdk, operators, providers, ``sparktf.airflow`` and ``sparktf.knobs``);
* ``warm``: a second ``DagBag(dag_folder=<file>)`` in the same process (module caches warm: what
  a re-parse of an unchanged file costs on top of the already-imported dependencies).

Prints best and median over the runs per file (goal: cold <= 0.5 s per file), the DAG ids and
import errors, and the heavy modules (tensorflow, keras, pyspark, pandas, numpy, botocore -- the
AWS SDK's core, which its client library always imports --, PIL, matplotlib, pyarrow) in
``sys.modules`` after the parse, split into those the DAG file brought in and those Airflow had
already loaded (goal: none from the DAG file). Nothing is asserted.

Usage (from the repository root)::

    python bench/bench_dag_parse.py [--runs 3] [dags/one_file.py ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from sparktf_dev.testing import ROOT

HEAVY = ("tensorflow", "keras", "pyspark", "pandas", "numpy", "botocore", "PIL", "matplotlib", "pyarrow")
MARKER = "PARSE_RESULT "

CHILD = (
    r"""
import json, sys, time
heavy = json.loads(sys.argv[2])
t = time.perf_counter()
import airflow
from airflow.dag_processing.dagbag import DagBag
framework = time.perf_counter() - t
before = {m for m in heavy if m in sys.modules}
t = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
cold = time.perf_counter() - t
after = {m for m in heavy if m in sys.modules}
t = time.perf_counter()
DagBag(dag_folder=sys.argv[1])
warm = time.perf_counter() - t
stats = [s.duration.total_seconds() for s in bag.dagbag_stats]
print(%r + json.dumps({
    "framework_import": framework, "cold": cold, "warm": warm, "dagbag_duration": sum(stats),
    "dag_ids": sorted(bag.dag_ids), "import_errors": {str(k): str(v)[:500] for k, v in bag.import_errors.items()},
    "heavy_from_dag": sorted(after - before), "heavy_preloaded": sorted(before),
}), flush=True)
"""
    % MARKER
)


def airflow_env() -> dict[str, str]:
    """os.environ plus what ``source scripts/env.sh`` exports."""
    out = subprocess.run(["bash", "-c", "source scripts/env.sh >/dev/null 2>&1; env -0"], cwd=ROOT, capture_output=True, check=True).stdout
    env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"  # DagBag's own info lines off
    return env


def parse_once(path: Path, env: dict[str, str]) -> dict:
    python = env.get("VENV", str(ROOT / ".venv")) + "/bin/python"
    done = subprocess.run([python, "-c", CHILD, str(path), json.dumps(HEAVY)], cwd=ROOT, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    raise RuntimeError(f"parsing {path} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="DAG files (default: every dags/*.py)")
    p.add_argument("--runs", type=int, default=3, help="fresh interpreters per file")
    opts = p.parse_args(argv)
    files = [Path(f).resolve() for f in opts.files] or sorted((ROOT / "dags").glob("*.py"))
    env = airflow_env()
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"{os.cpu_count()} cores; load average at start: {load}; {opts.runs} fresh interpreters per file")
    print()
    print(
        "| DAG file | DAGs | cold parse best / median (s) | warm re-parse median (s) | DagBag-reported median (s) "
        "| airflow + DagBag import median (s) | heavy modules from the DAG file | already loaded by Airflow | goal <= 0.5 s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for path in files:
        runs = [parse_once(path, env) for _ in range(opts.runs)]
        cold = [r["cold"] for r in runs]
        med = statistics.median
        errors = {k: v for r in runs for k, v in r["import_errors"].items()}
        heavy_dag = sorted({m for r in runs for m in r["heavy_from_dag"]})
        heavy_pre = sorted({m for r in runs for m in r["heavy_preloaded"]})
        worst = max(worst, med(cold))
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(
            f"| {rel} | {', '.join(runs[0]['dag_ids']) or '-'} | {min(cold):.3f} / {med(cold):.3f} "
            f"| {med([r['warm'] for r in runs]):.3f} | {med([r['dagbag_duration'] for r in runs]):.3f} "
            f"| {med([r['framework_import'] for r in runs]):.2f} | {', '.join(heavy_dag) or 'none'} "
            f"| {', '.join(heavy_pre) or 'none'} | {'met' if med(cold) <= 0.5 else 'MISSED'} |"
        )
        for key, value in errors.items():
            print(f"    import error in {key}: {value}")
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    print()
    print(f"slowest median cold parse: {worst:.3f} s (goal <= 0.5 s); load average at end: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
