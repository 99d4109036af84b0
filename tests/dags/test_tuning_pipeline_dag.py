"""tuning_pipeline's shape: the approval tasks between the export and MLflow, which follows the settled promotion."""

from __future__ import annotations

import itertools

import pytest


@pytest.fixture(scope="module")
def dag(dag_bag):
    return dag_bag.dags["tuning_pipeline"]


def test_shape(dag):
    order = ["validate_params", "prepare_data", "tune", "export_best_model", "approve_promotion", "promote_approved", "mlflow", "report"]
    assert [t.task_id for t in dag.topological_sort()] == order
    for upstream, downstream in itertools.pairwise(order):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}


def test_mlflow_runs_after_a_skipped_approval_but_not_after_a_failed_export(dag):
    # promotion auto skips both approval tasks: MLflow must still log the run (and the alias).
    assert dag.get_task("mlflow").trigger_rule == "none_failed"
    assert dag.get_task("promote_approved").trigger_rule == "all_success"  # skipped with approve_promotion
    assert dag.get_task("report").is_teardown  # the run's note, whatever happened
