"""Print a run summary (from run_dag.py --json-out) as a short human-readable report."""

from __future__ import annotations

import json
import sys


def main(path: str) -> int:
    with open(path) as fh:
        summary = json.load(fh)
    print(f"\n{summary['dag_id']}  run {summary['run_id']}  -> {summary['state']}")
    for task_id, info in summary["tasks"].items():
        print(f"\n[{task_id}] {info['state']}")
        xcom = info.get("xcom")
        if xcom is None:
            continue
        print(json.dumps(xcom, indent=2, sort_keys=True, default=str))
    return 0 if summary["state"].endswith("success") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
