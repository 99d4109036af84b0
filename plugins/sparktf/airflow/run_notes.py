"""A run explains itself on its run page: the ``report`` task renders a note, the plugin attaches it.

**What Airflow 3.3 offers.** A DAG run's *note* is Markdown shown on the run's page (the UI renders
it with react-markdown and GitHub-flavoured tables; raw HTML is skipped, links open in a new tab,
images are shown at most 300 px wide). It holds at most 1,000 characters (``dag_run_note.content``
is ``String(1000)``; the REST API refuses longer notes). A task cannot set it by itself: the Task
SDK's execution API has no call for it (its only note is that of a run a task *triggers*) and task
processes have no database access; the public REST API can (``PATCH .../dagRuns/{run_id}``) but
only with a user's token, i.e. a credential in every deployment. So:

1. the last task of each DAG, ``report`` (a teardown: it runs whatever happened upstream and does
   not change the run's state), renders the note from the run's XComs and results, prints it in
   its log and pushes it to XCom ``run_note``;
2. the ``sparktf`` plugin's listener (:mod:`sparktf.airflow.ui_plugin`) attaches that XCom to the
   run as its note when the run ends, in the scheduler (which has the database), unless a person
   has written a note of their own there.

The tuning figure is served by the plugin behind Airflow's own login (no presigned URL, no S3
credential in the browser); the note shows it and links to it full size.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from sparktf import run_summary

REPORT_TASK_ID = "report"
NOTE_XCOM_KEY = "run_note"
# An HTML comment: invisible on the run page (raw HTML is skipped), it marks the note as ours so
# that a person's note is never overwritten.
NOTE_MARKER = "<!-- sparktf run note -->"
MAX_NOTE_CHARS = 1000  # Airflow's dag_run_note.content is String(1000)
FIGURE_ROUTE = "/sparktf/figure"
TABLE_ROWS = 10


# ---------------------------------------------------------------------------------------------
# Links the browser follows (served by the plugin's FastAPI app on the api-server)
# ---------------------------------------------------------------------------------------------


def ui_root() -> str:
    """The path Airflow's UI is served under (``[api] base_url``'s path, usually empty)."""
    try:
        from airflow.sdk import conf

        base = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # noqa: BLE001 - outside Airflow: the root
        base = ""
    return urllib.parse.urlsplit(base).path.rstrip("/")


def figure_url(dag_id: str, run_id: str, task_id: str = "tune", root: str | None = None) -> str:
    """The plugin's URL of the figure a task recorded in its XCom (``figure_uri``)."""
    quote = lambda part: urllib.parse.quote(part, safe="")
    prefix = ui_root() if root is None else root
    return f"{prefix}{FIGURE_ROUTE}/{quote(dag_id)}/{quote(run_id)}/{quote(task_id)}"


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


# What makes Markdown of text: links and images ([ ] !), emphasis and strikethrough (* ~, and "_"
# at a word's edge: inside a word, as in too_large, it is none), code (`), table cells (|), raw
# HTML and entities (< > &), autolinks (: @ and the dot of "www."), escapes (\\).
_MARKUP = re.compile(r"[\\`*\[\]!<>|&~:@]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|(?<=\bwww)\.", re.IGNORECASE)


def escape_markdown(value: Any, *, code: bool = False) -> str:
    """Untrusted text (label names, reasons, keys, error messages, names from XCom) as plain text
    in a note: every character that could start Markdown or HTML is backslash-escaped, line breaks
    become spaces. ``code``: for inside a code span instead (where escapes do not work), backticks
    become quotes.
    """
    text = " ".join(str(value).splitlines())
    if code:
        return text.replace("`", "'")
    return _MARKUP.sub(lambda m: "\\" + m.group(0), text)


def _cell(value: Any) -> str:
    return escape_markdown(run_summary.format_value(value))


def _pct(accuracy: float | None) -> str:
    return "" if accuracy is None else f"{100 * accuracy:.2f}"


def _seconds(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else ""


def leaderboard_table(facts: dict[str, Any], rows: int) -> list[str]:
    """Rank, the varying hyperparameters, the rung reached (successive halving only), validation and
    test accuracy (%), epochs, seconds."""
    dims = facts["varying"]
    # A halving run's rows carry the rung each configuration reached; a grid's have none (no column).
    rung = [] if facts.get("halving") is None else ["rung"]
    header = ["#", *[run_summary.DIMENSION_LABELS.get(d, d) for d in dims], *rung, "val %", "test %", "epochs", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "--:|" * len(header)]
    for row in facts["rows"][:rows]:
        cells = [
            str(row["rank"]),
            *[_cell(row.get(d)) for d in dims],
            *([run_summary.rung_reached(row, facts["halving"])] if rung else []),
            _pct(row.get("val_accuracy")),
            _pct(row.get("test_accuracy")),
            str(row.get("epochs_run", "")),
            _seconds(row.get("train_seconds")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def halving_line(facts: dict[str, Any]) -> str | None:
    """A halving run's rungs, slot utilisation and trial-epochs (trained this run / the search's total); None for a grid."""
    halving = facts.get("halving")
    if halving is None:
        return None
    rungs = ", ".join(str(r) for r in halving["rungs"])
    line = f"**Successive halving:** rungs {rungs} epochs, factor {halving['factor']}; "
    line += f"slot utilisation {run_summary.format_percent(halving['slot_utilisation'], 0)} of {halving['slots']} slots; "
    line += f"trial-epochs {halving['epochs_trained_this_run']} trained this run / {halving['trial_epochs']} total"
    return line + (f" ({halving['in_full']} in full)." if halving["in_full"] else ".")


def default_line(facts: dict[str, Any], short: bool = False) -> str:
    """Default vs tuned. The default is the reference network (``mnist_cnn`` defaults,
    :data:`sparktf.run_summary.DEFAULT_CONFIGURATION`, not the DAG's default Params), named by what
    varies in this grid (the rest is shown as "every trial"); ``short`` names it "reference network" only."""
    comparison = facts["default"]
    config = comparison["configuration"]
    shown = {k: config[k] for k in facts["varying"] if k in config} if comparison["present"] else config
    what = "reference network" if short else f"reference network ({run_summary.describe_configuration(shown)})"
    if not comparison["present"]:
        if short:
            return f"**Default vs tuned:** the reference network ({run_summary.describe_configuration(shown)[:60]}…) is {comparison['why']}."
        return f"**Default vs tuned:** the {what} is {comparison['why']}: no comparison."
    if comparison["best_is_default"]:
        return f"**Default vs tuned:** the {what} was selected itself (test error {comparison['default_error']:.2%})."
    reduction = comparison["reduction"]
    change = "n/a" if reduction is None else f"{reduction:.0%} less error" if reduction >= 0 else f"{-reduction:.0%} more error"
    return (
        f"**Default vs tuned:** test error {comparison['default_error']:.2%} for the {what}, "
        f"{comparison['tuned_error']:.2%} tuned (rank 1): **{change}**."
    )


def _cap(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def champion_line(decision: dict[str, Any] | None, reason_chars: int | None = None) -> str | None:
    if decision is None:
        return None
    name = f"`{escape_markdown(decision['model_name'], code=True)}` " if decision.get("model_name") else ""
    if decision["promoted"]:
        verdict = f"{name}v{decision['version']} **promoted to champion**"
    else:
        stays = f"champion stays v{decision['champion_version']}" if decision.get("champion_version") is not None else "no champion"
        if decision.get("awaiting_approval"):
            stays += ", awaiting approval"
        verdict = f"{name}v{decision['version']} **not promoted** ({stays})"
    return f"**Champion:** {verdict}: {escape_markdown(_cap(str(decision['reason']), reason_chars))}."


def backbone_line(backbone: dict[str, Any] | None) -> str | None:
    """A head-tuning run's backbone (name vN) and whether its features were computed now or reused."""
    if backbone is None:
        return None
    line = f"**Backbone:** `{escape_markdown(backbone['name'], code=True)}` v{escape_markdown(backbone['version'])}"
    featurized = backbone.get("featurized")
    if featurized is None:
        return line + "."
    if featurized == 0:
        return line + ": features reused (0 featurized)."
    return line + f": featurized {featurized} images."


def fit(build, variants: list[dict[str, Any]]) -> str:
    """The first variant whose note fits in Airflow's 1,000 characters (the last, cut, otherwise)."""
    text = ""
    for variant in variants:
        text = build(**variant)
        if len(text) <= MAX_NOTE_CHARS:
            return text
    cut = text[: MAX_NOTE_CHARS - 2]
    return cut[: cut.rfind("\n")] + "\n…" if "\n" in cut else cut + " …"


def tuning_note(facts: dict[str, Any], *, state: str, problems: list[str], figure: str | None) -> str:
    """The tuning run's note: leaderboard, default vs tuned, champion decision, figure."""

    def build(rows: int, short_default: bool = False, image: str = "linked", brief: bool = False, minimal: bool = False) -> str:
        lines = [NOTE_MARKER]
        ok, total = facts.get("succeeded"), facts.get("trials")
        failed = facts["failed"] if isinstance(facts["failed"], int) else len(facts["failed"])
        head = f"**Tuning run {state}**"
        if total is not None:
            head += f": {ok} of {total} trials trained" + (f", {failed} failed" if failed else "")
            head += "; selected by validation accuracy"
        lines.append(head + ".")
        backbone = backbone_line(facts.get("backbone"))
        if backbone:
            lines.append(backbone)
        lines += [f"- {p}" for p in (problems[:2] if minimal else problems)]
        if facts["rows"]:
            lines.append("")
            lines += leaderboard_table(facts, rows)
            more = len(facts["rows"]) - rows
            if (more > 0 or not facts["rows_complete"]) and not minimal:
                lines.append(f"\n…{str(more) + ' more ' if more > 0 else ''}(every trial: `tune` XCom, `results.json`)")
            constant = ", ".join(f"{run_summary.DIMENSION_LABELS.get(k, k)} {_cell(v)}" for k, v in facts["constant"].items())
            if constant and not minimal:
                lines.append(f"\nEvery trial: {constant}.")
            lines += ["", default_line(facts, short_default)]
        if halving_line(facts) and not minimal:
            lines += ["", halving_line(facts)]
        if isinstance(facts["failed"], list) and facts["failed"] and not minimal:
            first = facts["failed"][0]
            reason = escape_markdown(_cap(run_summary.format_value(first.get("reason")), 60 if brief else 120))
            lines.append(f"\nFailed: {failed} trial(s), e.g. {reason}")
        champion = champion_line(facts["champion"], 160 if brief else None)
        if champion:
            lines += ["", champion]
        if figure:
            lines += [
                "",
                {
                    "linked": f"[![test error vs learning rate]({figure})]({figure})",
                    "image": f"![test error vs learning rate]({figure})",
                    "link": f"[Figure: test error vs learning rate]({figure})",
                }[image],
            ]
        return "\n".join(lines)

    # Within 1,000 characters: as many rows as fit (down to 3); then shorter wording and the
    # picture without its full-size link; then a link instead of the picture; then one row.
    shown = min(len(facts["rows"]), TABLE_ROWS)
    low = min(shown, 3)
    variants = [{"rows": n} for n in range(shown, low - 1, -1)]
    variants += [
        {"rows": low, "short_default": True, "brief": True, "image": "image"},
        {"rows": low, "short_default": True, "brief": True, "image": "link"},
        {"rows": min(shown, 1), "short_default": True, "brief": True, "image": "link"},
        {"rows": min(shown, 1), "short_default": True, "brief": True, "image": "link", "minimal": True},
    ]
    return fit(build, variants)


def nightly_note(facts: dict[str, Any], *, state: str, problems: list[str]) -> str:
    """The nightly run's note: counts, reasons set aside, label histogram, model version."""

    def build(labels: bool = True) -> str:
        lines = [NOTE_MARKER, f"**Nightly inference {state}: {escape_markdown(facts['date'] or 'date unknown')}**"]
        lines += [f"- {p}" for p in problems]
        if facts["skipped_reason"]:
            lines.append(f"\n0 images: {escape_markdown(facts['skipped_reason'])}; nothing to score.")
            return "\n".join(lines)
        if facts["scored"] is not None:
            model = (
                f"`{escape_markdown(facts['model_name'], code=True)}` v{facts['model_version']}"
                if facts["model_name"]
                else f"v{facts['model_version']}"
            )
            lines.append(f"\n**{facts['scored']} scored**, **{facts['set_aside']} set aside** of {facts['listed']} images, with model {model}.")
            if facts["failure_ratio_exceeded"]:
                lines.append("\n**More images set aside than `max_failure_ratio` allows**: published, then failed.")
            if facts["reasons"]:
                lines.append("\nSet aside: " + ", ".join(f"{_cell(k)} {_cell(v)}" for k, v in facts["reasons"].items()) + ".")
            if labels and facts["labels"]:
                lines += [
                    "",
                    "| label | " + " | ".join(_cell(k) for k in facts["labels"]) + " |",
                    "|--|" + "--:|" * len(facts["labels"]),
                    "| images | " + " | ".join(_cell(v) for v in facts["labels"].values()) + " |",
                ]
            if facts["output_uri"]:
                lines.append(f"\nPredictions: `{escape_markdown(facts['output_uri'], code=True)}` (trust it once `_SUCCESS` is there).")
        elif facts["listed"] is not None:
            lines.append(f"\n{facts['listed']} images listed; not scored.")
        return "\n".join(lines)

    return fit(build, [{"labels": True}, {"labels": False}])


# ---------------------------------------------------------------------------------------------
# The report task (runs in the task process: Task SDK only)
# ---------------------------------------------------------------------------------------------


def problems_of(states: dict[str, Any], own_task: str = REPORT_TASK_ID) -> tuple[str, list[str]]:
    """The run's outcome as the report sees it (``succeeded`` / ``failed``) and what went wrong."""
    bad = {t: str(s) for t, s in states.items() if t != own_task and str(s) in ("failed", "upstream_failed")}
    problems = [f"`{t}` **{s}**" + (": see its log" if s == "failed" else "") for t, s in bad.items()]
    return ("failed" if bad else "succeeded"), problems


def _task_states(ti: Any) -> dict[str, Any]:
    try:
        return ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {}) or {}
    except Exception:  # noqa: BLE001 - without states the note still has the results
        return {}


def _job_result(params: dict[str, Any], dag_id: str, run_id: str, task_id: str) -> dict | None:
    """A failed Spark task's result document (the job writes it before failing on a ratio breach).

    The path is the DAGs' ``RESULT_URI``: ``<workspace>/runs/<dag>/<run id | path_safe>/_results/<task>.json``.
    """
    from sparktf import storage
    from sparktf.airflow.pipeline_settings import path_safe

    try:
        return storage.read_json_if_exists(f"{params['workspace_uri']}/runs/{dag_id}/{path_safe(run_id)}/_results/{task_id}.json")
    except Exception:  # noqa: BLE001
        return None


def render_report(kind: str) -> str:
    """Render the current run's note (called by the ``report`` task)."""
    from airflow.sdk import get_current_context

    from sparktf import storage
    from sparktf.airflow import aws_connection

    aws_connection.use_connection()
    context = get_current_context()
    ti, params = context["ti"], context["params"]
    states = _task_states(ti)
    state, problems = problems_of(states)
    from sparktf.airflow import mlflow_tracking

    problems += mlflow_tracking.note_lines(ti.xcom_pull(task_ids=mlflow_tracking.TASK_ID))
    if kind == "tuning":
        tune = ti.xcom_pull(task_ids="tune")
        results = None
        if tune and tune.get("results_uri"):
            try:
                results = storage.read_json(tune["results_uri"])
            except storage.StorageError:
                results = None
        # After a person's answer (promotion "approve"), promote_approved holds the final decision.
        decision = ti.xcom_pull(task_ids="promote_approved") or ti.xcom_pull(task_ids="export_best_model")
        facts = run_summary.tuning_facts(tune, results, decision)
        figure = figure_url(ti.dag_id, ti.run_id) if facts["figure_uri"] else None
        return tuning_note(facts, state=state, problems=problems, figure=figure)
    found = ti.xcom_pull(task_ids="find_new_images")
    result = ti.xcom_pull(task_ids="publish") or ti.xcom_pull(task_ids="batch_inference")
    if result is None and str(states.get("batch_inference")) == "failed":
        result = _job_result(params, ti.dag_id, ti.run_id, "batch_inference")
    return nightly_note(run_summary.nightly_facts(found, result), state=state, problems=problems)


def report_task(kind: str):
    """Add the DAG's last task, ``report``: render the run note, log it, push it to XCom ``run_note``.

    Call it at the end of the DAG function: it goes downstream of every task that has no
    downstream yet (the DAG's leaves), so it waits for all of them. A teardown task with no setup:
    it runs once everything upstream is done (succeeded, failed or skipped; a short-circuit does
    not skip a teardown) and the run's state ignores it.

    Args:
        kind: ``tuning`` or ``nightly``.

    Returns:
        The ``report`` operator.
    """
    from airflow.sdk import get_current_context, task

    @task(task_id=REPORT_TASK_ID)
    def report() -> None:
        """Render this run's note (leaderboard or counts); the sparktf plugin shows it on the run page."""
        note = render_report(kind)
        print(note)
        get_current_context()["ti"].xcom_push(key=NOTE_XCOM_KEY, value=note)

    operator = report().as_teardown().operator
    leaves = [t for t in operator.dag.tasks if t is not operator and not t.downstream_list]
    for leaf in leaves:
        leaf >> operator
    return operator


# ---------------------------------------------------------------------------------------------
# Attaching the note (runs in the scheduler, or wherever the run's state changes)
# ---------------------------------------------------------------------------------------------


def attach_note(dag_run: Any) -> bool:
    """Copy the run's ``report`` XCom into its note; never over a note a person wrote.

    Runs inside the listener of the state change. When the run object belongs to a database
    session (the scheduler's), the note joins that transaction and is committed with the run's
    new state. A detached run object (``dag.test()`` hands one to listeners) is looked up again
    in a session of its own.

    Returns:
        Whether the note was set.
    """
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is not None:
        return _attach(session, dag_run)
    with create_session() as own:
        attached = own.scalars(select(DagRun).where(DagRun.dag_id == dag_run.dag_id, DagRun.run_id == dag_run.run_id)).one_or_none()
        return attached is not None and _attach(own, attached)


def _attach(session: Any, dag_run: Any) -> bool:
    from airflow.models.xcom import XComModel

    query = XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=REPORT_TASK_ID, key=NOTE_XCOM_KEY)
    row = session.scalars(query).first()
    if row is None:
        return False
    text = str(XComModel.deserialize_value(row))[:MAX_NOTE_CHARS]
    current = dag_run.note
    if current and not current.startswith(NOTE_MARKER):
        return False
    if dag_run.dag_run_note is None:
        dag_run.note = (text, None)
    else:
        dag_run.dag_run_note.content = text
    return True
