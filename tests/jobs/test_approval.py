"""Approval before promotion (tuning Param ``promotion`` = ``approve``): the export only decides,
a person's answer is turned into a decision, and an approved move is decided again by the
registry's compare-and-swap against the champion of that moment (real S3 server)."""

from __future__ import annotations

import argparse
import datetime as dt

import pytest

from sparktf import knobs, registry, storage
from sparktf.airflow import approval
from sparktf_dev.testing import LABEL_NAMES

APPROVED_AT = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory) -> str:
    import keras

    from sparktf.models import build_model

    keras.utils.set_random_seed(1)
    path = str(tmp_path_factory.mktemp("keras") / "model.keras")
    build_model("mlp", (28, 28, 1), 10, hidden_units=4).save(path)
    keras.backend.clear_session()
    return path


def metadata_for(run: str, score: float) -> dict:
    return {
        "source_run": run,
        "trial_id": f"trial-of-{run}",
        "input_shape": [28, 28, 1],
        "label_names": LABEL_NAMES,
        "manifest_sha256": "same-data",
        "metrics": {"test_accuracy": score, "test_loss": 1.0 - score, "val_accuracy": score},
    }


@pytest.fixture
def registry_of_three(s3_prefix, keras_file) -> tuple[str, list[dict]]:
    """v1 (0.50, champion), v2 (0.90), v3 (0.80), all on the same data."""
    models = s3_prefix + "/models/"
    versions = [
        registry.write_version(models, "digits", model_path=keras_file, metadata=metadata_for(run, score))
        for run, score in (("run-1", 0.5), ("run-2", 0.9), ("run-3", 0.8))
    ]
    assert move(models, versions[0]).promoted
    return models, versions


def move(models: str, metadata: dict, **kwargs) -> registry.Promotion:
    return registry.champion_decision(
        models,
        "digits",
        metadata,
        champion_policy="compare",
        metric="test_accuracy",
        min_improvement=0.0,
        source_run=metadata["source_run"],
        **kwargs,
    )


def export_args(models: str, promotion: str, policy: str = "compare") -> argparse.Namespace:
    return argparse.Namespace(
        models_uri=models,
        model_name="digits",
        source_run="run-3",
        champion_policy=policy,
        promotion_metric="test_accuracy",
        min_improvement=0.0,
        promotion=promotion,
    )


def export_result(version: dict, decision: registry.Promotion, awaiting: bool) -> dict:
    return {
        "model_name": "digits",
        "version": version["version"],
        "metrics": version["metrics"],
        "promoted": decision.promoted,
        "promotion_reason": decision.reason,
        "champion_version": decision.champion_version,
        "awaiting_approval": awaiting,
    }


def test_export_with_approve_registers_and_only_says_it_would_win(registry_of_three):
    from sparktf.jobs import export_model

    models, (_v1, _v2, v3) = registry_of_three
    before = storage.read_json_with_etag(registry.champion_uri(models, "digits"))
    decision, awaiting = export_model.decide(export_args(models, "approve"), v3)
    assert awaiting
    assert not decision.promoted
    assert decision.champion_version == 1
    assert decision.reason.startswith("awaiting a person's approval (promotion 'approve'): test_accuracy 0.80000 beats champion v1 0.50000")
    assert storage.read_json_with_etag(registry.champion_uri(models, "digits")) == before  # nothing written


def test_export_with_approve_asks_nobody_when_the_version_would_not_win(registry_of_three):
    from sparktf.jobs import export_model

    models, (_v1, v2, v3) = registry_of_three
    assert move(models, v2).promoted
    decision, awaiting = export_model.decide(export_args(models, "approve"), v3)
    assert (decision.promoted, awaiting) == (False, False)
    assert "does not beat champion v2" in decision.reason
    assert registry.read_champion(models, "digits")["version"] == 2


def test_export_with_auto_moves_the_champion_as_before(registry_of_three):
    from sparktf.jobs import export_model

    models, (_v1, _v2, v3) = registry_of_three
    decision, awaiting = export_model.decide(export_args(models, "auto"), v3)
    assert (decision.promoted, awaiting) == (True, False)
    assert registry.read_champion(models, "digits")["version"] == 3


def test_an_approval_moves_the_champion_and_records_who(registry_of_three):
    models, (_v1, _v2, v3) = registry_of_three
    waiting = export_result(v3, *_approve_export(models, v3))
    answer = approval.answer_of({"chosen_options": ["Approve"], "responded_by_user": {"id": "7", "name": "admin"}, "responded_at": APPROVED_AT})
    promotion = move(models, v3, pointer_extra={"approved_by": answer["responded_by"]})
    final = approval.approved_decision(waiting, answer, promotion)
    assert final["promoted"] is True
    assert final["champion_version"] == 3
    assert (
        final["promotion_reason"] == "approved by admin at 2026-12-07T10:00:00+00:00; test_accuracy 0.80000 beats champion v1 0.50000 "
        "(recorded on the same test set, min improvement 0.0)"
    )
    pointer = registry.read_champion(models, "digits")
    assert (pointer["version"], pointer["approved_by"], pointer["promoted_over"]) == (3, "admin", 1)
    # A retry of promote_approved after the move: the version is already champion, still promoted.
    again = approval.approved_decision(waiting, answer, move(models, v3))
    assert again["promoted"] is True


def test_an_approval_is_decided_again_when_a_better_champion_appeared_meanwhile(registry_of_three):
    models, (_v1, v2, v3) = registry_of_three
    waiting = export_result(v3, *_approve_export(models, v3))  # v3 would beat v1 ...
    assert move(models, v2).promoted  # ... but v2 (0.90) became champion while a person looked
    answer = approval.answer_of({"chosen_options": ["Approve"], "responded_by_user": {"id": "7", "name": "admin"}, "responded_at": APPROVED_AT})
    final = approval.approved_decision(waiting, answer, move(models, v3))
    assert final["promoted"] is False
    assert final["champion_version"] == 2
    assert "approved by admin" in final["promotion_reason"]
    assert "test_accuracy 0.80000 does not beat champion v2 0.90000" in final["promotion_reason"]
    assert registry.read_champion(models, "digits")["version"] == 2


def _approve_export(models: str, version: dict) -> tuple[registry.Promotion, bool]:
    from sparktf.jobs import export_model

    return export_model.decide(export_args(models, "approve"), version)


@pytest.mark.parametrize(
    ("event", "said"),
    [
        (
            {"chosen_options": ["Reject"], "responded_by_user": {"id": "7", "name": "admin"}, "responded_at": APPROVED_AT},
            "rejected by admin at 2026-12-07T10:00:00+00:00",
        ),
        (
            {"chosen_options": ["Reject"], "responded_by_user": None, "responded_at": APPROVED_AT, "timedout": True},
            "no answer within 48 h (counted as Reject)",
        ),
    ],
)
def test_a_rejection_or_no_answer_keeps_the_version_registered_and_says_why(event, said):
    waiting = {
        "model_name": "digits",
        "version": 3,
        "promoted": False,
        "awaiting_approval": True,
        "champion_version": 1,
        "promotion_reason": "awaiting a person's approval (promotion 'approve'): test_accuracy 0.8 beats champion v1 0.5",
    }
    answer = approval.answer_of(event)
    assert answer["approved"] is False
    final = approval.refused_decision(waiting, answer, 48.0)
    assert final["promoted"] is False
    assert final["awaiting_approval"] is False
    assert final["champion_version"] == 1
    assert final["promotion_reason"] == f"{said}: v3 stays registered, not champion (it would have been: test_accuracy 0.8 beats champion v1 0.5)"


def test_the_request_shows_the_comparison_the_leaderboard_and_the_figure():
    waiting = {
        "model_name": "digits",
        "version": 3,
        "metrics": {"val_accuracy": 0.91, "test_accuracy": 0.9},
        "promotion_reason": "awaiting a person's approval (promotion 'approve'): no champion yet",
    }
    table = ["| # | lr | val % | test % | epochs | s |", "|--:|--:|--:|--:|--:|--:|", "| 1 | 0.001 | 91.00 | 90.00 | 1 | 3 |"]
    subject, body = approval.request_text(waiting, table, "/sparktf/figure/tuning_pipeline/r/tune", 48.0)
    assert subject == "Make digits v3 the champion?"
    assert "**digits v3** would become the champion: no champion yet." in body
    assert "Validation accuracy 91.00 %, test accuracy 90.00 %." in body
    assert "\n".join(table) in body
    assert "[Figure: test error vs learning rate](/sparktf/figure/tuning_pipeline/r/tune)" in body
    assert "no answer within 48 h" in body


def test_only_an_export_awaiting_approval_asks_a_person():
    assert approval.awaits_approval({"awaiting_approval": True})
    assert not approval.awaits_approval({"awaiting_approval": False, "promoted": True})
    assert not approval.awaits_approval(None)


def test_the_approval_timeout_comes_from_the_param_with_a_default():
    assert approval.timeout_of({}) == dt.timedelta(hours=knobs.BY_NAME["approval_timeout_hours"].default)
    assert approval.timeout_of({"approval_timeout_hours": 0.5}) == dt.timedelta(minutes=30)
    assert knobs.validate({**{k.name: k.default for k in knobs.KNOBS}, "approval_timeout_hours": 0})
    assert knobs.validate({**{k.name: k.default for k in knobs.KNOBS}, "promotion": "later"})
