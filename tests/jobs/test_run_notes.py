"""What a run's note and summary say: a real tuning job whose grid holds the default configuration
(its progress lines, the default-vs-tuned reduction), and the 1,000-character limit of a note."""

from __future__ import annotations

import logging

import pytest

from sparktf import run_summary, storage
from sparktf.airflow import run_notes
from sparktf.jobs import tune
from sparktf_dev import testing


@pytest.fixture(scope="module")
def default_grid_run(spark, bucket, mnist_subset):
    """The default configuration (mnist_cnn, lr 0.001, 1024 units, batch 128, dropout 0.5) and a
    second learning rate, one epoch each on 600 digits."""
    raw, prepared, out = (f"s3://{bucket}/notes/{part}/" for part in ("raw", "prepared", "tuning"))
    testing.upload_mnist(raw, mnist_subset, train_limit=600, test_limit=200)
    testing.prepare(spark, raw, prepared)
    args = tune.parse_args(
        [
            "--prepared-uri",
            prepared,
            "--output-uri",
            out,
            "--model-family",
            "mnist_cnn",
            "--augment",
            "0",
            "--learning-rates",
            "0.001,0.003",
            "--hidden-units",
            "1024",
            "--epochs",
            "1",
            "--patience",
            "1",
        ]
    )
    handler = logging.Handler()
    lines: list[str] = []
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("sparktf")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as the job's configure_logging() does
    try:
        result = tune.run(spark, args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return result, storage.read_json(result["results_uri"]), lines


def test_the_job_logs_one_progress_line_per_trial(default_grid_run):
    result, results, lines = default_grid_run
    progress = [line for line in lines if line.startswith("tuning progress: trial")]
    assert len(progress) == result["trials"] == 2
    by_id = {r["trial_id"]: r for r in results["trials"]}
    for k, line in enumerate(progress, 1):
        trial_id = line.rsplit("[", 1)[1].rstrip("]")
        record = by_id.pop(trial_id)
        assert line.startswith(f"tuning progress: trial {k}/2 done (lr {record['params']['learning_rate']:g}, hidden 1024, batch 128, dropout 0.5): ")
        assert f"val_accuracy {record['val_accuracy']:.4f}, {record['train_seconds']:.1f} s" in line
    assert by_id == {}


def test_default_vs_tuned_reduction_in_the_note(default_grid_run):
    result, results, _lines = default_grid_run
    facts = run_summary.tuning_facts(result, results, None)
    default = next(r for r in results["leaderboard"] if r["learning_rate"] == 0.001)
    best = results["leaderboard"][0]
    comparison = facts["default"]
    assert comparison["present"]
    assert comparison["default_row"]["trial_id"] == default["trial_id"]
    expected = ((1 - default["test_accuracy"]) - (1 - best["test_accuracy"])) / (1 - default["test_accuracy"])
    assert comparison["reduction"] == pytest.approx(expected)
    note = run_notes.tuning_note(
        facts, state="succeeded", problems=[], figure=run_notes.figure_url("tuning_pipeline", "manual__2026-11-29T10:00:00+00:00", root="")
    )
    assert len(note) <= run_notes.MAX_NOTE_CHARS
    assert "| # | lr | val % | test % | epochs | s |" in note  # only the learning rate varies
    assert "Every trial: hidden 1024, batch 128, dropout 0.5." in note
    if best["trial_id"] == default["trial_id"]:
        assert "the reference network (lr 0.001) was selected itself" in note
    else:
        change = f"{expected:.0%} less error" if expected >= 0 else f"{-expected:.0%} more error"
        assert (
            f"**Default vs tuned:** test error {1 - default['test_accuracy']:.2%} for the reference network (lr 0.001), "
            f"{1 - best['test_accuracy']:.2%} tuned (rank 1): **{change}**."
        ) in note
    assert (
        "[![test error vs learning rate](/sparktf/figure/tuning_pipeline/manual__2026-11-29T10%3A00%3A00%2B00%3A00/tune)]"
        "(/sparktf/figure/tuning_pipeline/manual__2026-11-29T10%3A00%3A00%2B00%3A00/tune)"
    ) in note


def test_the_default_configuration_is_the_reference_network_and_names_every_search_dimension():
    from sparktf import knobs

    default = run_summary.default_configuration()
    assert default == {
        "model_family": "mnist_cnn",
        "learning_rate": 0.001,
        "hidden_units": 1024,
        "batch_size": 128,
        "dropout": 0.5,
        "optimizer": "adam",
        "augment": 0.0,
    }
    # A dimension added to the knob table needs the reference network's value here, or no run would match.
    assert set(knobs.search_dimensions()) <= set(default)
    assert default["model_family"] in knobs.BY_NAME["model_family"].choices
    rows = [{"trial_id": "t", "learning_rate": 0.001, "hidden_units": 1024, "batch_size": 128, "dropout": 0.5}]
    assert run_summary.find_default_row(rows, model_family="mnist_cnn", fixed={"optimizer": "adam", "augment": 0.0})
    assert run_summary.find_default_row(rows, model_family="mlp", fixed={}) is None
    assert run_summary.find_default_row(rows, model_family="mnist_cnn", fixed={"optimizer": "sgd"}) is None


def synthetic_grid(n_rates: int, n_widths: int) -> tuple[dict, dict]:
    rows = []
    for i in range(n_rates * n_widths):
        rows.append(
            {
                "rank": i + 1,
                "trial_id": f"trial-{i:010d}",
                "learning_rate": 0.0001 * (i // n_widths + 1),
                "hidden_units": 128 * (i % n_widths + 1),
                "batch_size": 128,
                "dropout": 0.5,
                "val_accuracy": 0.99 - i / 1000,
                "test_accuracy": 0.989 - i / 1000,
                "epochs_run": 30,
                "train_seconds": 1234.5,
            }
        )
    results = {
        "leaderboard": rows,
        "failed": [{"trial_id": "trial-x", "reason": "error: " + "x" * 400}],
        "fixed": {"optimizer": "adam", "augment": 0.0},
        "model_family": "mnist_cnn",
    }
    tune_xcom = {"trials": len(rows) + 1, "succeeded": len(rows), "failed": 1, "figure_uri": "s3://b/f.png", "leaderboard": rows[:5]}
    return tune_xcom, results


@pytest.mark.parametrize(("rates", "widths"), [(1, 1), (3, 3), (10, 10)])
def test_a_note_always_fits_airflows_limit(rates, widths):
    tune_xcom, results = synthetic_grid(rates, widths)
    export = {
        "model_name": "mnist-cnn",
        "version": 12,
        "promoted": False,
        "champion_version": 11,
        "promotion_reason": "test_accuracy 0.98900 does not beat champion v11 0.99000 (recorded on the same test set, min improvement 0.0)",
    }
    facts = run_summary.tuning_facts(tune_xcom, results, export)
    note = run_notes.tuning_note(
        facts,
        state="failed",
        problems=["`export_best_model` **failed**: see its log"],
        figure=run_notes.figure_url("tuning_pipeline", "scheduled__2026-11-29T03:00:00+00:00"),
    )
    assert len(note) <= run_notes.MAX_NOTE_CHARS
    assert note.startswith(run_notes.NOTE_MARKER)
    assert "**Tuning run failed**" in note
    assert "![test error vs learning rate](/sparktf/figure/tuning_pipeline/" in note
    assert "**Champion:** `mnist-cnn` v12 **not promoted** (champion stays v11): test_accuracy 0.98900" in note
    assert f"| {min(3, rates * widths)} |" in note
    if rates * widths > 3:
        assert "more (every trial: `tune` XCom, `results.json`)" in note


def test_even_an_extreme_note_fits_and_keeps_the_decision_and_the_figure():
    tune_xcom, results = synthetic_grid(10, 10)
    export = {
        "model_name": "m" * 64,
        "version": 123456789,
        "promoted": False,
        "champion_version": 123456788,
        "promotion_reason": "test_accuracy 0.98900 does not beat champion (" + "y" * 900 + ")",
    }
    facts = run_summary.tuning_facts(tune_xcom, results, export)
    note = run_notes.tuning_note(
        facts,
        state="failed",
        problems=["`export_best_model` **failed**: see its log"] * 3,
        figure=run_notes.figure_url("tuning_pipeline", "scheduled__2026-11-29T03:00:00+00:00"),
    )
    assert len(note) <= run_notes.MAX_NOTE_CHARS
    assert "| 1 |" in note
    assert "**not promoted**" in note
    assert "/sparktf/figure/tuning_pipeline/" in note


def test_nightly_note_when_too_many_images_are_set_aside():
    job = {
        "date": "2026-11-20",
        "listed": 10,
        "scored": 6,
        "set_aside": 4,
        "reasons": {"corrupt": 3, "too_large": 1},
        "label_histogram": {"3": 4, "7": 2},
        "model_name": "digits",
        "model_version": 2,
        "output_uri": "s3://b/ws/predictions/2026-11-20/",
        "failure_ratio_exceeded": True,
    }
    facts = run_summary.nightly_facts({"date": "2026-11-20", "images": 10}, job)
    note = run_notes.nightly_note(facts, state="failed", problems=["`batch_inference` **failed**: see its log"])
    assert "**Nightly inference failed: 2026-11-20**" in note
    assert "**6 scored**, **4 set aside** of 10 images, with model `digits` v2." in note
    assert "Set aside: corrupt 3, too_large 1." in note
    assert "published, then failed" in note
    assert "| label | 3 | 7 |" in note
    assert "| images | 4 | 2 |" in note


PIXEL = "![x](http://tracker.example/p.png?run=1)"
HOSTILE = [
    PIXEL,
    "[click](javascript:alert(1))",
    "<img src=http://tracker.example/p.png>",
    "**bold** _it_ ~~gone~~",
    "a | b",
    "`code`",
    "www.tracker.example",
    "http://tracker.example/",
    "x@tracker.example",
    "&lt;b&gt;",
    "line one\n# heading\n- item",
    "\\![x](http://tracker.example/)",
]


def rendered(note: str) -> str:
    """The note as CommonMark with tables renders it (raw HTML allowed, to see it if it got through)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(note)


@pytest.mark.parametrize("text", HOSTILE)
def test_untrusted_text_renders_as_the_same_text(text):
    from html import unescape

    html = rendered(run_notes.escape_markdown(text))
    assert "<img" not in html
    assert "<a " not in html
    assert "<em>" not in html
    assert "<strong>" not in html
    assert "<code>" not in html
    assert "<h1>" not in html
    assert "<li>" not in html
    assert "<del>" not in html
    assert unescape(html.removeprefix("<p>").removesuffix("</p>\n")) == " ".join(text.splitlines())
    assert "http:" not in run_notes.escape_markdown(text)
    assert "www." not in run_notes.escape_markdown(text)


def test_label_names_reasons_and_keys_stay_text_in_the_nightly_note():
    job = {
        "date": "2026-11-20",
        "listed": 3,
        "scored": 2,
        "set_aside": 1,
        "reasons": {PIXEL: 1},
        "label_histogram": {PIXEL: 1, "<img src=http://tracker.example/q.png>": 1},
        "model_name": "digits`![x](y)",
        "model_version": 2,
        "output_uri": "s3://b/ws/`![x](http://tracker.example/r.png)`/",
        "failure_ratio_exceeded": False,
    }
    facts = run_summary.nightly_facts({"date": "2026-11-20", "images": 3}, job)
    html = rendered(run_notes.nightly_note(facts, state="succeeded", problems=[]))
    assert "<img" not in html
    assert "<a " not in html
    assert "tracker.example/p.png" in html
    skipped = run_summary.nightly_facts({"date": "2026-11-20", "images": 0, "skipped_reason": f"no images under {PIXEL}"}, None)
    assert "<img" not in rendered(run_notes.nightly_note(skipped, state="succeeded", problems=[]))


def test_reasons_and_error_messages_stay_text_in_the_tuning_note():
    tune_xcom, results = synthetic_grid(2, 1)
    results["failed"] = [{"trial_id": "t", "reason": f"ValueError: {PIXEL}"}]
    export = {
        "model_name": "digits",
        "version": 2,
        "promoted": False,
        "champion_version": 1,
        "promotion_reason": f"the champion was trained on {PIXEL}",
    }
    facts = run_summary.tuning_facts(tune_xcom, results, export)
    html = rendered(run_notes.tuning_note(facts, state="succeeded", problems=[], figure=None))
    assert "<img" not in html
    assert "<a " not in html
    assert "tracker.example/p.png" in html


def halving_run() -> tuple[dict, dict]:
    """Three configurations, rungs 1 and 3 epochs: c0 reached the top rung, c1 stopped at the first, c2 failed there.

    The rows are :mod:`sparktf.halving_driver`'s own (one record per configuration at its highest rung, then its leaderboard).
    """
    from sparktf import halving_driver

    def step(config_id: str, lr: float, rung: int, val: float | None) -> dict:
        epochs, from_epochs = (1, 0) if rung == 0 else (3, 1)
        record = {"trial_id": config_id, "config_id": config_id, "rung": rung, "epochs": epochs, "from_epochs": from_epochs}
        record["params"] = {"learning_rate": lr, "hidden_units": 64, "batch_size": 32, "dropout": 0.25}
        if val is None:
            return {**record, "status": "failed", "reason": "diverged: training loss became NaN/inf", "epochs_trained": 1, "train_seconds": 2.0}
        checkpoint = {"checkpoint_uri": f"s3://b/{config_id}/{epochs}.keras", "checkpoint_sha256": "0" * 64}
        return {**record, **checkpoint, "status": "ok", "val_accuracy": val, "val_loss": 1 - val, "test_accuracy": val - 0.01, "train_seconds": 5.0}

    steps = [step("c0", 0.01, 0, 0.95), step("c1", 0.003, 0, 0.90), step("c2", 0.03, 0, None), step("c0", 0.01, 1, 0.97)]
    records = halving_driver.config_records([{"trial_id": c} for c in ("c0", "c1", "c2")], steps)
    summary = halving_driver.leaderboard(records)
    stats = {"rungs": [1, 3], "factor": 3, "slots": 2, "rung_steps": 3, "rung_steps_reused": 1}
    stats |= {"trial_epochs": 5, "epochs_trained_this_run": 4, "slot_utilisation": 0.8734, "steps_wall_seconds": 12.0}
    results = {"trials": records, "leaderboard": summary["full_leaderboard"], "failed": summary["failed"], "halving": stats}
    results |= {"model_family": "mlp", "fixed": {"optimizer": "adam", "augment": 0.0}}
    tune_xcom = {"trials": 3, "succeeded": 2, "failed": 1, "leaderboard": summary["leaderboard"], "halving": stats}
    return tune_xcom, results


def test_a_halving_note_shows_the_rung_each_configuration_reached_and_the_runs_compute():
    tune_xcom, results = halving_run()
    facts = run_summary.tuning_facts(tune_xcom, results, None)
    assert facts["halving"] == {
        "rungs": [1, 3],
        "factor": 3,
        "slots": 2,
        "slot_utilisation": 0.8734,
        "epochs_trained_this_run": 4,
        "trial_epochs": 5,
        "in_full": 9,  # three configurations to the last rung's 3 epochs
    }
    assert [run_summary.rung_reached(row, facts["halving"]) for row in facts["rows"]] == ["2/2", "1/2"]
    note = run_notes.tuning_note(facts, state="succeeded", problems=[], figure=None)
    assert len(note) <= run_notes.MAX_NOTE_CHARS
    assert "| # | lr | rung | val % | test % | epochs | s |" in note
    assert "| 1 | 0.01 | 2/2 | 97.00 | 96.00 | 3 | 10 |" in note  # both of c0's steps, its top rung's metrics
    assert "| 2 | 0.003 | 1/2 | 90.00 | 89.00 | 1 | 5 |" in note
    assert (
        "**Successive halving:** rungs 1, 3 epochs, factor 3; slot utilisation 87 % of 2 slots; "
        "trial-epochs 4 trained this run / 5 total (9 in full)."
    ) in note
    # Only the XCom (results.json unreadable): the same line and column.
    assert "2/2" in run_notes.tuning_note(run_summary.tuning_facts(tune_xcom, None, None), state="succeeded", problems=[], figure=None)


def test_a_grid_note_has_no_rung_column_and_no_halving_line():
    tune_xcom, results = synthetic_grid(2, 2)
    facts = run_summary.tuning_facts(tune_xcom, results, None)
    assert facts["halving"] is None
    assert run_summary.rung_reached(facts["rows"][0], None) == ""
    note = run_notes.tuning_note(facts, state="succeeded", problems=[], figure=None)
    assert "| # | lr | hidden | val % | test % | epochs | s |" in note
    assert "rung" not in note
    assert "Successive halving" not in note


@pytest.mark.parametrize(("featurized", "says"), [(30, "featurized 30 images."), (0, "features reused (0 featurized).")])
@pytest.mark.parametrize(("rates", "widths"), [(1, 2), (10, 10)])
def test_a_backbone_runs_note_names_the_backbone_and_what_was_featurized(featurized, says, rates, widths):
    """Issue 17: the note of a head-tuning run says its backbone (name vN) and whether the features
    were computed now or reused, however long the leaderboard (the line survives every cut)."""
    tune_xcom, results = synthetic_grid(rates, widths)
    export = {"model_name": "my-photos", "version": 3, "promoted": True, "champion_version": 3, "promotion_reason": "no champion yet"}
    plain = run_notes.tuning_note(run_summary.tuning_facts(tune_xcom, results, export), state="succeeded", problems=[], figure=None)
    assert "Backbone" not in plain  # a from-scratch run: no such line
    tune_xcom.update(backbone="photo-features@2", featurized=featurized, features_reused=featurized == 0)
    facts = run_summary.tuning_facts(tune_xcom, results, export)
    assert facts["backbone"] == {"name": "photo-features", "version": "2", "featurized": featurized}
    note = run_notes.tuning_note(facts, state="succeeded", problems=[], figure=run_notes.figure_url("tuning_pipeline", "manual__2026-12-07"))
    assert len(note) <= run_notes.MAX_NOTE_CHARS
    assert f"**Backbone:** `photo-features` v2: {says}" in note
