"""Print what a DAG run did, for a person: a short summary instead of screens of JSON.

Usage::

    python scripts/print_summary.py .stack/tuning_pipeline.json          # the summary
    python scripts/print_summary.py --json .stack/tuning_pipeline.json   # every XCom, as JSON

The input is the file ``scripts/run_dag.py --json-out`` writes (state and XCom of every task).
For a tuning run: data, the leaderboard, default vs tuned, the champion decision, and the figure,
downloaded next to the JSON file (``<name>.error_vs_learning_rate.png``). For a nightly run: the
date's counts, the reasons images were set aside, the label histogram, the model version.
Exits 0 when the run succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sparktf import run_summary


def use_storage() -> bool:
    """Point the storage layer at the stack's ``aws_default`` settings (False if there are none)."""
    from sparktf import storage
    from sparktf.airflow import aws_connection

    if not os.environ.get(aws_connection.env_variable("aws_default")):
        return False
    try:
        storage.configure(aws_connection.settings_from_environment("aws_default"))
    except aws_connection.ConnectionUnusable as error:
        raise SystemExit(f"print_summary: {error}") from None
    return True


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns (a leaderboard reads best with numbers aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [headers, *rows]]


def tuning_lines(summary: dict[str, Any], json_path: Path, storage_ok: bool) -> list[str]:
    from sparktf import storage

    tasks = summary["tasks"]
    xcom = lambda task_id: (tasks.get(task_id) or {}).get("xcom")
    prepared, tune, export = xcom("prepare_data"), xcom("tune"), xcom("export_best_model")
    lines = []
    if prepared:
        counts = prepared.get("counts", {})
        lines.append(
            f"data:      {counts.get('train')} train / {counts.get('validation')} validation / "
            f"{counts.get('test')} test images ({prepared.get('rejected', 0)} files rejected)"
        )
    results = None
    if tune and storage_ok:
        try:
            results = storage.read_json(tune["results_uri"])
        except (storage.StorageError, KeyError):
            results = None
    facts = run_summary.tuning_facts(tune, results, export)
    if tune:
        failed = facts["failed"] if isinstance(facts["failed"], int) else len(facts["failed"])
        lines.append(
            f"trials:    {facts['succeeded']} of {facts['trials']} trained, {failed} failed; "
            f"selected by validation accuracy ({tune.get('wall_seconds', '?')} s)"
        )
        dims = facts["varying"]
        rows = [
            [
                str(r["rank"]),
                *[run_summary.format_value(r.get(d)) for d in dims],
                f"{100 * r['val_accuracy']:.2f} %",
                f"{100 * r['test_accuracy']:.2f} %",
                str(r.get("epochs_run", "")),
                f"{r['train_seconds']:.1f}" if isinstance(r.get("train_seconds"), (int, float)) else "",
            ]
            for r in facts["rows"]
        ]
        headers = ["rank", *[run_summary.DIMENSION_LABELS.get(d, d) for d in dims], "val acc", "test acc", "epochs", "seconds"]
        lines += [""] + ["  " + line for line in table(headers, rows)]
        if facts["constant"]:
            lines.append(
                "  every trial: "
                + ", ".join(f"{run_summary.DIMENSION_LABELS.get(k, k)} {run_summary.format_value(v)}" for k, v in facts["constant"].items())
            )
        for failure in facts["failed"] if isinstance(facts["failed"], list) else []:
            lines.append(f"  failed: {failure['trial_id']} ({failure.get('reason')})")
        comparison = facts["default"]
        lines.append("")
        if comparison["present"]:
            reduction = comparison["reduction"]
            change = "n/a" if reduction is None else (f"{reduction:.0%} less error" if reduction >= 0 else f"{-reduction:.0%} more error")
            lines.append(
                f"default vs tuned: test error {comparison['default_error']:.2%} (the reference network: "
                f"{comparison['description']}) -> {comparison['tuned_error']:.2%} tuned: {change}"
            )
        else:
            lines.append(f"default vs tuned: the reference network ({comparison['description']}) is {comparison['why']}")
    decision = facts["champion"]
    if decision:
        verdict = "PROMOTED to champion" if decision["promoted"] else f"not promoted (champion stays v{decision['champion_version']})"
        lines.append(f"champion:  {decision['model_name']} v{decision['version']} {verdict}: {decision['reason']}")
    if facts["figure_uri"]:
        figure = json_path.with_name(json_path.stem + ".error_vs_learning_rate.png")
        try:
            if not storage_ok:
                raise storage.StorageError("no aws_default settings in the environment")
            storage.download_file(facts["figure_uri"], str(figure))
            lines.append(f"figure:    {figure}  (test error vs learning rate)")
        except (storage.StorageError, OSError) as err:
            lines.append(f"figure:    {facts['figure_uri']} (not downloaded: {err})")
    return lines


def nightly_lines(summary: dict[str, Any]) -> list[str]:
    tasks = summary["tasks"]
    xcom = lambda task_id: (tasks.get(task_id) or {}).get("xcom")
    facts = run_summary.nightly_facts(xcom("find_new_images"), xcom("publish") or xcom("batch_inference"))
    if facts["skipped_reason"]:
        return [f"{facts['date']}: 0 images ({facts['skipped_reason']}); nothing to score"]
    if facts["scored"] is None:
        return [f"{facts['date']}: {facts['listed']} images listed, not scored"]
    lines = [
        f"{facts['date']}: {facts['scored']} scored, {facts['set_aside']} set aside of {facts['listed']} images, "
        f"model {facts['model_name']} v{facts['model_version']}"
    ]
    if facts["reasons"]:
        lines.append("  set aside: " + ", ".join(f"{k} {v}" for k, v in facts["reasons"].items()))
    if facts["labels"]:
        lines.append("  labels:    " + "  ".join(f"{k}:{v}" for k, v in facts["labels"].items()))
    if facts["output_uri"]:
        lines.append(f"  output:    {facts['output_uri']}")
    return lines


def render(summary: dict[str, Any], json_path: Path, storage_ok: bool) -> str:
    lines = [f"{summary['dag_id']}  run {summary['run_id']}  -> {summary['state']}"]
    bad = {t: i["state"] for t, i in summary["tasks"].items() if i["state"] in ("failed", "upstream_failed")}
    if bad:
        lines.append("problems:  " + ", ".join(f"{t} {s}" for t, s in bad.items()) + f" (task logs: {json_path.with_suffix('.log')})")
    if summary["dag_id"] == "tuning_pipeline":
        lines += tuning_lines(summary, json_path, storage_ok)
    elif summary["dag_id"] == "nightly_inference":
        lines += nightly_lines(summary)
    lines.append(f"full JSON: {json_path}  (python scripts/print_summary.py --json {json_path})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("summary", type=Path, help="the JSON file scripts/run_dag.py --json-out wrote")
    parser.add_argument("--json", action="store_true", help="print every task's state and XCom as JSON instead")
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print("\n" + render(summary, args.summary, use_storage()))
    return 0 if summary["state"].endswith("success") else 1


if __name__ == "__main__":
    sys.exit(main())
