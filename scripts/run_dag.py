"""Run one DAG through Airflow (``dag.test()``: the real scheduler loop in one process) and print
each task's state and XCom summary as JSON.

Usage: python scripts/run_dag.py DAG_ID [--logical-date 2026-11-20] [--run-after 2026-11-20T03:00:00+00:00] [--conf '{"epochs": 1}'] [--json-out F]

Exits 0 when the run succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import pendulum
from sqlalchemy import select


def run(dag_id: str, logical_date: str | None, conf: dict, run_after: str | None = None) -> dict:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag()
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise SystemExit(f"no DAG {dag_id!r}; known: {sorted(bag.dag_ids)}")
    if dag.deadline:
        # dag.test() in Airflow 3.3 looks the DAG's deadline alerts up by database id, but gets their
        # definitions (a dict: "'dict' object has no attribute 'hex'" when the run ends). Runs made
        # here go without them; the scheduler's runs have them (tests/e2e/test_airflow_rest.py).
        print(f"run_dag: {dag_id}'s deadline alerts are left out of this dag.test() run", file=sys.stderr)
        dag.deadline = None
    when = pendulum.parse(logical_date) if logical_date else pendulum.now("UTC")
    # run_after names the run (manual__<run_after>): the same value runs the same run again, as a clear does.
    extra = {"run_after": pendulum.parse(run_after)} if run_after else {}
    dag_run = dag.test(logical_date=when, run_conf=conf or None, **extra)
    summary = {"dag_id": dag_id, "run_id": dag_run.run_id, "state": str(dag_run.state), "tasks": {}}
    with create_session() as session:
        instances = {ti.task_id: ti for ti in dag_run.get_task_instances(session=session)}
        order = [task.task_id for task in dag.topological_sort() if task.task_id in instances]
        for ti in (instances[task_id] for task_id in order):  # in the DAG's order, upstream first
            query = XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_id, task_ids=ti.task_id, key="return_value")
            rows = session.scalars(query).all()
            value = XComModel.deserialize_value(rows[0]) if rows else None
            summary["tasks"][ti.task_id] = {"state": str(ti.state), "try_number": ti.try_number, "xcom": value}
        # The run's note, as the UI shows it (rendered by the DAG's report task, attached by the plugin).
        summary["note"] = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == dag_run.run_id)).one().note
    return summary


def check_connections(conn_ids: tuple[str, ...] = ("spark_default", "aws_default")) -> None:
    """Stop before the run when a connection the DAGs use is set as an unparsable ``AIRFLOW_CONN_*``
    (Airflow would call it undefined, and the Spark provider would fall back to YARN)."""
    from sparktf.airflow import aws_connection

    problems = [aws_connection.unusable_message(conn_id) for conn_id in conn_ids if aws_connection.parse_problem(conn_id)]
    if problems:
        raise SystemExit("run_dag: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dag_id")
    parser.add_argument("--logical-date", default=None, help="e.g. 2026-11-20 (default: now)")
    parser.add_argument("--conf", default="{}", help="JSON object of Params")
    parser.add_argument("--run-after", default=None, help="the run's run_after, e.g. 2026-11-29T03:00:00+00:00 (default: now); fixes its run id")
    parser.add_argument("--json-out", default=None, help="also write the summary to this file")
    args = parser.parse_args(argv)
    check_connections()
    summary = run(args.dag_id, args.logical_date, json.loads(args.conf), args.run_after)
    text = json.dumps(summary, indent=2, default=str)
    print("=== run summary ===")
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(text)
    return 0 if summary["state"].endswith("success") else 1


if __name__ == "__main__":
    sys.exit(main())
