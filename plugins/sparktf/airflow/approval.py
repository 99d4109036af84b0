"""A person's approval before a new model becomes the champion (tuning Param ``promotion`` = ``approve``).

With ``promotion`` = ``auto`` (the default) ``export_best_model`` moves the champion itself and the
two tasks here are skipped. With ``approve``:

1. ``export_best_model`` registers the version and only decides whether it *would* become the
   champion against the current one (XCom ``awaiting_approval``; nothing written to the pointer);
2. ``approve_promotion`` (:class:`PromotionApproval`, the standard provider's human-in-the-loop
   operator) waits in the Airflow UI (Browse → Required Actions, or the task's page) for Approve
   or Reject, showing the leaderboard, the comparison with the current champion and the figure.
   It is skipped when the version would not become champion (the reason is export's). No answer
   within ``approval_timeout_hours`` counts as Reject (the scheduler applies the default);
3. ``promote_approved`` (:func:`settle`, a plain Python task: no Spark) moves the champion on
   Approve through the registry's compare-and-swap, deciding again against the champion of that
   moment (a better one that appeared meanwhile still wins); on Reject or timeout it records why
   the version stays registered and not champion. Its XCom has the same keys as
   ``export_best_model``'s, and the run note reads it first.

The decisions are the pure functions below (no Airflow context, no I/O).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator

from sparktf import knobs

APPROVE, REJECT = "Approve", "Reject"
EXPORT_TASK_ID = "export_best_model"
APPROVAL_TASK_ID = "approve_promotion"
SETTLE_TASK_ID = "promote_approved"
LEADERBOARD_ROWS = 10


# ---------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------


def awaits_approval(export: Mapping[str, Any] | None) -> bool:
    """Whether the export left a version waiting for a person (promotion ``approve``, would win)."""
    return bool(export and export.get("awaiting_approval"))


def comparison_of(export: Mapping[str, Any]) -> str:
    """The export's comparison with the champion, without its "awaiting approval" preamble."""
    reason = str(export.get("promotion_reason") or "")
    return reason.split("): ", 1)[1] if reason.startswith("awaiting a person's approval") else reason


def request_text(export: Mapping[str, Any], leaderboard: list[str], figure: str | None, timeout_hours: float) -> tuple[str, str]:
    """The approval request's subject and Markdown body.

    Args:
        export: the ``export_best_model`` XCom (model name, version, metrics, comparison).
        leaderboard: the leaderboard as Markdown table lines (:func:`sparktf.airflow.run_notes.leaderboard_table`).
        figure: the figure's URL (the sparktf plugin serves it behind Airflow's login), or None.
        timeout_hours: after this long without an answer the request counts as rejected.
    """
    from sparktf.airflow.run_notes import escape_markdown

    name, version = export["model_name"], export["version"]
    metrics = export.get("metrics") or {}
    subject = f"Make {name} v{version} the champion?"
    lines = [
        f"**{escape_markdown(name)} v{version}** would become the champion: {escape_markdown(comparison_of(export))}.",
        "",
        f"Validation accuracy {_pct(metrics.get('val_accuracy'))}, test accuracy {_pct(metrics.get('test_accuracy'))}.",
    ]
    if leaderboard:
        lines += ["", *leaderboard]
    if figure:
        lines += ["", f"[Figure: test error vs learning rate]({figure})"]
    lines += [
        "",
        f"**Approve** moves the champion, compared again with the champion of that moment (a better one "
        f"that appeared meanwhile stays). **Reject**, or no answer within {timeout_hours:g} h, keeps "
        f"v{version} registered and not champion.",
    ]
    return subject, "\n".join(lines)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f} %" if isinstance(value, (int, float)) else "n/a"


def answer_of(event: Mapping[str, Any]) -> dict[str, Any]:
    """The person's answer from the HITL resume event: approved or not, by whom, when, timed out."""
    chosen = list(event.get("chosen_options") or [])
    user = event.get("responded_by_user") or {}
    at = event.get("responded_at")
    return {
        "approved": chosen == [APPROVE],
        "chosen": chosen,
        "responded_by": user.get("name") or user.get("id") if isinstance(user, Mapping) else str(user),
        "responded_at": at.isoformat() if isinstance(at, dt.datetime) else at,
        "timed_out": bool(event.get("timedout")),
    }


def who_answered(answer: Mapping[str, Any], timeout_hours: float | None = None) -> str:
    """``approved by admin at ...`` / ``rejected by ...`` / ``no answer within 48 h (counted as Reject)``."""
    if answer.get("timed_out"):
        within = f" within {timeout_hours:g} h" if timeout_hours else ""
        return f"no answer{within} (counted as Reject)"
    verb = "approved" if answer.get("approved") else "rejected"
    return f"{verb} by {answer.get('responded_by') or 'an unknown user'} at {answer.get('responded_at')}"


def refused_decision(export: Mapping[str, Any], answer: Mapping[str, Any], timeout_hours: float | None = None) -> dict[str, Any]:
    """The final decision when the person rejected the move or did not answer: registered, not champion."""
    return {
        **export,
        "promoted": False,
        "awaiting_approval": False,
        "approval": dict(answer),
        "promotion_reason": f"{who_answered(answer, timeout_hours)}: v{export['version']} stays registered, not champion "
        f"(it would have been: {comparison_of(export)})",
    }


def approved_decision(export: Mapping[str, Any], answer: Mapping[str, Any], promotion: Any) -> dict[str, Any]:
    """The final decision after an approval and the compare-and-swap (:class:`sparktf.registry.Promotion`).

    A retry after the move finds the version already champion: that is this approval's move.
    """
    promoted = promotion.promoted or promotion.champion_version == export["version"]
    return {
        **export,
        "promoted": promoted,
        "awaiting_approval": False,
        "approval": dict(answer),
        "promotion_reason": f"{who_answered(answer)}; {promotion.reason}",
        "champion_version": promotion.champion_version,
        "champion_score": promotion.champion_score,
        "promotion_attempts": promotion.attempts,
    }


def timeout_of(params: Mapping[str, Any]) -> dt.timedelta:
    """The response timeout the run's ``approval_timeout_hours`` Param asks for."""
    return dt.timedelta(hours=float(params.get("approval_timeout_hours", knobs.BY_NAME["approval_timeout_hours"].default)))


# ---------------------------------------------------------------------------------------------
# The tasks (run in the task process: Task SDK only)
# ---------------------------------------------------------------------------------------------


class PromotionApproval(HITLOperator):
    """Ask a person to approve the exported version as champion; skipped unless the export awaits it.

    Returns (XCom) the answer (:func:`answer_of`): approved or not, by whom, when, timed out.
    Reject and timeout succeed (a person's "no" is an answer, not a failure); ``promote_approved``
    records the outcome.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("task_id", APPROVAL_TASK_ID)
        hours = knobs.BY_NAME["approval_timeout_hours"].default
        super().__init__(
            subject="Approve the new champion?",
            options=[APPROVE, REJECT],
            defaults=[REJECT],
            multiple=False,
            response_timeout=dt.timedelta(hours=hours),
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        export = context["ti"].xcom_pull(task_ids=EXPORT_TASK_ID)
        if not awaits_approval(export):
            reason = (export or {}).get("promotion_reason", "no export result")
            raise AirflowSkipException(f"no approval needed: {reason}")
        self.response_timeout = timeout_of(context["params"])
        leaderboard, figure = _leaderboard_and_figure(context)
        self.subject, self.body = request_text(export, leaderboard, figure, self.response_timeout.total_seconds() / 3600)
        self.log.info("waiting for a person: %s (UI: Browse > Required Actions)", self.subject)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        super().execute_complete(context, event)  # validates the answer; raises on a timeout without default
        answer = answer_of(event)
        self.log.info("answer: %s", who_answered(answer))
        return answer


def _leaderboard_and_figure(context: Any) -> tuple[list[str], str | None]:
    """The run's leaderboard (Markdown lines) and figure URL, as the run note shows them."""
    from sparktf import run_summary, storage
    from sparktf.airflow import aws_connection, run_notes

    aws_connection.use_connection()
    ti = context["ti"]
    tune = ti.xcom_pull(task_ids="tune") or {}
    try:
        results = storage.read_json(tune["results_uri"]) if tune.get("results_uri") else None
    except storage.StorageError:
        results = None  # the XCom's top rows still make a leaderboard
    facts = run_summary.tuning_facts(tune, results)
    table = run_notes.leaderboard_table(facts, LEADERBOARD_ROWS) if facts["rows"] else []
    figure = run_notes.figure_url(ti.dag_id, ti.run_id) if facts["figure_uri"] else None
    return table, figure


def settle(context: Any) -> dict[str, Any]:
    """``promote_approved``: move the champion on Approve (compare-and-swap, decided again now), or
    record why not on Reject / timeout. Returns the decision with ``export_best_model``'s keys."""
    from sparktf import registry
    from sparktf.airflow import aws_connection
    from sparktf.airflow.pipeline_settings import REGISTRY_CONN_ID

    ti, params = context["ti"], context["params"]
    export = ti.xcom_pull(task_ids=EXPORT_TASK_ID)
    answer = ti.xcom_pull(task_ids=APPROVAL_TASK_ID)
    if not answer.get("approved"):
        return refused_decision(export, answer, timeout_of(params).total_seconds() / 3600)
    aws_connection.use_connection(REGISTRY_CONN_ID)  # the one connection that may write models/
    models_uri = f"{params['workspace_uri']}/models/"
    metadata = registry.resolve(models_uri, export["model_name"], export["version"])
    registry.verify_artifact(metadata["model_uri"], metadata["model_sha256"])  # promote nothing whose files changed
    promotion = registry.champion_decision(
        models_uri,
        export["model_name"],
        metadata,
        champion_policy=params["champion_policy"],
        metric=params["promotion_metric"],
        min_improvement=float(params["min_improvement"]),
        source_run=ti.run_id,
        pointer_extra={"approved_by": answer.get("responded_by"), "approved_at": answer.get("responded_at")},
    )
    return approved_decision(export, answer, promotion)


def approval_tasks() -> tuple[PromotionApproval, Any]:
    """Add ``approve_promotion >> promote_approved`` to the DAG being defined; returns both (put
    the first downstream of ``export_best_model``, and what follows the promotion after the second).
    Both are skipped unless the export awaits approval."""
    from airflow.sdk import get_current_context, task

    approve = PromotionApproval(task_id=APPROVAL_TASK_ID)

    @task(task_id=SETTLE_TASK_ID)
    def promote_approved() -> dict:
        """Move the champion on Approve (compared again now), or record why not (reject, timeout)."""
        return settle(get_current_context())

    settled = promote_approved()
    approve >> settled
    return approve, settled
