"""The tables of the pipelines' knobs: the tuning pipeline's and the nightly inference's (pure Python, cheap to import).

Each :class:`Knob` says once what a setting is called in the Trigger form (Param name), on a job's
command line (flag), in the search space (dimension), its type, default, bounds and help. From
this table come the DAG's Params (:func:`param_specs`), each job's rendered arguments
(:func:`job_arguments`), each job's argparse flags (:func:`add_arguments`) and the checks the
DAG's ``validate_params`` runs before any Spark job starts (:func:`validate`). A default therefore
cannot drift between the form and the job. :data:`KNOBS` are the tuning pipeline's;
:data:`NIGHTLY_KNOBS` the nightly inference's (``batch_inference`` job).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**32 - 1  # NumPy's and Keras' seeds are 32-bit


@dataclass(frozen=True)
class Knob:
    """One setting of the tuning pipeline.

    Attributes:
        name: Param name in the Trigger form (and key in ``params``).
        job: the job whose command line takes it (``prepare_data``, ``tune``, ``export_model``), or
            the task that reads it from the Params (``approve_promotion``).
        kind: ``int``, ``float``, ``str``, ``bool``, ``int_list`` or ``float_list``.
        default: the default, for the form and the job alike.
        title, help: what the form shows.
        dimension: for list knobs, the search-space dimension the values span.
        minimum, maximum, exclusive_minimum, exclusive_maximum: bounds (of every item, for lists).
        choices: allowed values of a ``str`` knob.
    """

    name: str
    job: str
    kind: str
    default: Any
    title: str
    help: str
    dimension: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    choices: tuple[str, ...] | None = None
    backbone_only: bool = False  # a head's dimension: in the search space only with a backbone

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_list(self) -> bool:
        return self.kind.endswith("_list")

    @property
    def item_kind(self) -> str:
        return self.kind.removesuffix("_list")


KNOBS: tuple[Knob, ...] = (
    # prepare_data
    Knob(
        "validation_fraction",
        "prepare_data",
        "float",
        0.1,
        "Validation fraction",
        "Share of each class held out for selection.",
        exclusive_minimum=0,
        exclusive_maximum=0.5,
    ),
    Knob(
        "test_fraction",
        "prepare_data",
        "float",
        0.1,
        "Test fraction",
        "Share of each class held out for the final test (MNIST's own test files keep their role).",
        exclusive_minimum=0,
        exclusive_maximum=0.5,
    ),
    # tune: the search space
    Knob(
        "model_family",
        "tune",
        "str",
        "mnist_cnn_bn",
        "Model family",
        "mnist_cnn_bn: 4 batch-normalised 3x3 conv layers (the default); mnist_cnn: the reference network (2 conv layers); "
        "mlp: a quick 1-hidden-layer net.",
        choices=("mnist_cnn_bn", "mnist_cnn", "mlp"),
    ),
    Knob(
        "learning_rates",
        "tune",
        "float_list",
        [0.001, 0.003],
        "Learning rates",
        "Optimizer step sizes to try.",
        dimension="learning_rate",
        exclusive_minimum=0,
    ),
    Knob(
        "hidden_units",
        "tune",
        "int_list",
        [128, 512],
        "Hidden units",
        "Widths of the fully connected layer (with a backbone: of the head's hidden layer; 0 = a linear head).",
        dimension="hidden_units",
        minimum=0,
        maximum=65536,
    ),
    Knob("batch_sizes", "tune", "int_list", [128], "Batch sizes", "Examples per gradient step.", dimension="batch_size", minimum=1, maximum=65536),
    Knob(
        "dropouts",
        "tune",
        "float_list",
        [0.5],
        "Dropout rates",
        "Dropout before the output layer.",
        dimension="dropout",
        minimum=0,
        exclusive_maximum=1,
    ),
    Knob(
        "l2_weights",
        "tune",
        "float_list",
        [0.0],
        "L2 weights (backbone head)",
        "L2 penalty on the head's weights (with a backbone only; 0 = none).",
        dimension="l2_weight",
        minimum=0,
        maximum=1,
        backbone_only=True,
    ),
    Knob(
        "fine_tune_layers",
        "tune",
        "int_list",
        [0],
        "Fine-tuned backbone layers (backbone head)",
        "0 = the backbone stays frozen: heads train on features computed once (seconds per trial). N > 0 = after its head, "
        "the trial trains the backbone's top N layers with weights together with the head on the images, at a tenth of the "
        "learning rate (slower: minutes per trial, the images go through the backbone every epoch; grid or random search only).",
        dimension="fine_tune_layers",
        minimum=0,
        maximum=10000,
        backbone_only=True,
    ),
    # tune: fixed for every trial of a run
    Knob(
        "backbone",
        "tune",
        "str",
        "",
        "Backbone (your own classes)",
        "A registered model (name = its champion, or name@<version>), e.g. one imported with register_model: its features are "
        "computed once and small heads are tuned on them for the data set's own classes (the model family is then not used). "
        "Empty: train the model family from scratch.",
    ),
    Knob("optimizer", "tune", "str", "adam", "Optimizer", "adam, or sgd with momentum 0.9.", choices=("adam", "sgd")),
    Knob(
        "augment",
        "tune",
        "float",
        0.1,
        "Augmentation",
        "Random shift as a fraction of the image size, and rotation of half that (0 = off).",
        minimum=0,
        maximum=0.3,
    ),
    Knob("epochs", "tune", "int", 15, "Maximum epochs per trial", "Early stopping on validation accuracy may stop sooner.", minimum=1, maximum=500),
    Knob(
        "patience",
        "tune",
        "int",
        4,
        "Early-stopping patience (epochs)",
        "Epochs without validation improvement before a trial stops.",
        minimum=1,
        maximum=500,
    ),
    Knob(
        "lr_decay_patience",
        "tune",
        "int",
        1,
        "Learning-rate decay patience (epochs)",
        "Halve the learning rate after this many epochs without validation improvement; 0 = constant.",
        minimum=0,
        maximum=500,
    ),
    Knob(
        "search_strategy",
        "tune",
        "str",
        "grid",
        "Search strategy",
        "grid: every combination; random: a seeded sparse sample of the grid; halving: every combination "
        "to a first rung of epochs, then only the best 1/factor continue at each rung (successive halving).",
        choices=("grid", "random", "halving"),
    ),
    Knob(
        "halving_min_epochs",
        "tune",
        "int",
        1,
        "First rung (epochs, halving search)",
        "Epochs every configuration trains before the first cut; the rungs are this times the factor to the k, up to the maximum epochs.",
        minimum=1,
        maximum=500,
    ),
    Knob(
        "halving_factor",
        "tune",
        "int",
        3,
        "Reduction factor (halving search)",
        "Only the best 1/factor by validation accuracy continue at each rung.",
        minimum=2,
        maximum=100,
    ),
    Knob(
        "num_random_trials",
        "tune",
        "int",
        6,
        "Trials to sample (random search)",
        "How many grid points random search trains.",
        minimum=1,
        maximum=1000,
    ),
    Knob("seed", "tune", "int", 42, "Random seed", "Seeds the split, the sample of the grid, weights and shuffling.", minimum=0, maximum=MAX_SEED),
    Knob(
        "max_parallel_trials",
        "tune",
        "int",
        0,
        "Maximum parallel trials",
        "0 = one task per trial on every free Spark task slot.",
        minimum=0,
        maximum=10000,
    ),
    # export_model
    Knob(
        "promotion_metric",
        "export_model",
        "str",
        "test_accuracy",
        "Promotion metric",
        "Metric compared with the champion's on the same test set.",
        choices=("test_accuracy", "test_loss"),
    ),
    Knob(
        "min_improvement",
        "export_model",
        "float",
        0.0,
        "Minimum improvement to promote",
        "Promote only when better than the champion by more than this.",
        minimum=0,
        maximum=1,
    ),
    Knob(
        "champion_policy",
        "export_model",
        "str",
        "compare",
        "Champion policy",
        "compare: promote only when better than the champion trained for the same labels and input shape and "
        "tested on the same test split; replace: make this run's model the champion without comparing "
        "(a new lineage on purpose, e.g. after changing the data).",
        choices=("compare", "replace"),
    ),
    Knob(
        "promotion",
        "export_model",
        "str",
        "auto",
        "Promotion",
        "auto: the champion moves as soon as the new model wins the comparison; approve: a person approves "
        "the move in the Airflow UI first (task approve_promotion; reject or no answer keeps the champion).",
        choices=("auto", "approve"),
    ),
    # approve_promotion (the human-in-the-loop task; no job's command line takes it)
    Knob(
        "approval_timeout_hours",
        "approve_promotion",
        "float",
        48.0,
        "Hours to wait for approval",
        "With promotion approve: no answer within this time counts as Reject.",
        exclusive_minimum=0,
        maximum=24 * 30,
    ),
)
BY_NAME = {knob.name: knob for knob in KNOBS}

# The nightly inference's settings (the ``batch_inference`` job's tuning flags).
NIGHTLY_KNOBS: tuple[Knob, ...] = (
    Knob(
        "max_failure_ratio",
        "batch_inference",
        "float",
        0.2,
        "Maximum share set aside",
        "Fail the run (after publishing) when more images are set aside.",
        minimum=0,
        maximum=1,
    ),
    Knob(
        "batch_size",
        "batch_inference",
        "int",
        256,
        "Images per model call",
        "Images per model call (refused when a batch cannot fit the executor's memory).",
        minimum=1,
        maximum=8192,
    ),
    Knob("fetch_threads", "batch_inference", "int", 16, "Concurrent GETs per Spark task", "Concurrent GETs per Spark task.", minimum=1, maximum=128),
    Knob(
        "max_image_bytes",
        "batch_inference",
        "int",
        50_000_000,
        "Largest image fetched (bytes)",
        "Objects listed larger are set aside as too_large without being fetched.",
        minimum=1,
    ),
    Knob(
        "allow_shrink",
        "batch_inference",
        "bool",
        False,
        "Allow a much smaller re-run",
        "Replace a published partition even with one scoring fewer than half its images.",
    ),
)
NIGHTLY_BY_NAME = {knob.name: knob for knob in NIGHTLY_KNOBS}
# The seed as prepare_data reads it too (one value: the split and the trials share it).
SHARED_WITH_PREPARE = ("seed", "backbone")  # the backbone: prepare_data decodes to its input


def knobs_of(job: str) -> list[Knob]:
    """The knobs a job's command line takes."""
    return [k for k in (*KNOBS, *NIGHTLY_KNOBS) if k.job == job or (job == "prepare_data" and k.name in SHARED_WITH_PREPARE)]


def search_dimensions(space: dict[str, Any] | None = None) -> dict[str, Knob]:
    """Search-space dimension name -> its list knob, in grid order.

    The head's own dimensions (``backbone_only``) are included only for a ``space`` (or a
    trial's params) that has them: a from-scratch run's space and trial ids stay as they were.
    """
    return {k.dimension: k for k in KNOBS if k.dimension and (not k.backbone_only or (space is not None and k.dimension in space))}


# ---------------------------------------------------------------------------------------------
# The DAG side: Param specifications and rendered arguments
# ---------------------------------------------------------------------------------------------


def param_specs(table: tuple[Knob, ...] = KNOBS) -> dict[str, dict[str, Any]]:
    """Keyword arguments of ``airflow.sdk.Param`` for every knob of a table (JSON schema + form text)."""
    specs = {}
    for knob in table:
        bounds = {
            key: value
            for key, value in (
                ("minimum", knob.minimum),
                ("maximum", knob.maximum),
                ("exclusiveMinimum", knob.exclusive_minimum),
                ("exclusiveMaximum", knob.exclusive_maximum),
            )
            if value is not None
        }
        json_type = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}[knob.item_kind]
        spec: dict[str, Any] = {"title": knob.title, "description": knob.help}
        if knob.is_list:
            spec.update(type="array", minItems=1, items={"type": json_type, **bounds})
        else:
            spec.update(type=json_type, **bounds)
        if knob.choices:
            spec["enum"] = list(knob.choices)
        specs[knob.name] = {"default": knob.default, **spec}
    return specs


def job_arguments(job: str) -> list[str]:
    """A job's ``application_args`` for its knobs, rendered from the run's Params by Jinja."""
    arguments = []
    for knob in knobs_of(job):
        value = "{{ params.%s | join(',') }}" % knob.name if knob.is_list else "{{ params.%s }}" % knob.name
        arguments += [knob.flag, value]
    return arguments


# ---------------------------------------------------------------------------------------------
# The job side: argparse flags
# ---------------------------------------------------------------------------------------------


def parse_number_list(text: str, kind: type = float) -> list:
    """Parse ``"0.001,0.01"`` (or a JSON list) into a list of numbers."""
    text = text.strip()
    values = json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
    return [kind(float(v)) if kind is int else kind(v) for v in values]


def parse_bool(value: str) -> bool:
    """``true``/``false`` (any case; also 1/0, yes/no, empty = false): how Airflow renders a boolean Param."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _parser_type(knob: Knob):
    if knob.kind == "bool":
        return parse_bool
    if knob.kind == "int_list":
        return lambda text: parse_number_list(text, int)
    if knob.kind == "float_list":
        return lambda text: parse_number_list(text, float)
    return {"int": int, "float": float, "str": str}[knob.kind]


def add_arguments(parser: argparse.ArgumentParser, job: str) -> None:
    """Add a job's knob flags to its parser, with the table's defaults and help."""
    for knob in knobs_of(job):
        # A bare boolean flag (``--allow-shrink``) means true; the DAG renders ``--allow-shrink True``.
        optional_value = {"nargs": "?", "const": True} if knob.kind == "bool" else {}
        parser.add_argument(
            knob.flag,
            dest=knob.name,
            type=_parser_type(knob),
            default=knob.default,
            choices=knob.choices,
            help=f"{knob.help} (default: {knob.default})",
            **optional_value,
        )


def search_space(values: dict[str, Any]) -> dict[str, list]:
    """The search space (dimension -> values) from knob values (Params or parsed arguments);
    the head's dimensions only when a ``backbone`` is set."""
    head = bool(values.get("backbone"))
    return {k.dimension: list(values[k.name]) for k in KNOBS if k.dimension and (head or not k.backbone_only)}


# ---------------------------------------------------------------------------------------------
# Checks (what a JSON schema cannot say)
# ---------------------------------------------------------------------------------------------


def describe(knob: Knob) -> str:
    """What an acceptable value (item, for lists) is, in words: ``a number > 0 and <= 10``."""
    if knob.item_kind == "str":
        return f"one of {list(knob.choices or [])}"
    if knob.item_kind == "bool":
        return "true or false"
    bounds = [
        f"{op} {int(value) if float(value).is_integer() else value}"
        for op, value in ((">=", knob.minimum), (">", knob.exclusive_minimum), ("<=", knob.maximum), ("<", knob.exclusive_maximum))
        if value is not None
    ]
    noun = "an integer" if knob.item_kind == "int" else "a number"
    return " ".join([noun, " and ".join(bounds)]) + ("" if knob.item_kind == "int" else " (finite)")


def check_value(knob: Knob, value: Any) -> str | None:
    """Why one value (one item, for list knobs) is not acceptable (``must be ...``), or None."""
    if knob.item_kind == "str":
        ok = isinstance(value, str) and (not knob.choices or value in knob.choices)
    elif knob.item_kind == "bool":
        ok = isinstance(value, bool)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        ok = False
    else:
        ok = (
            (knob.item_kind != "int" or float(value).is_integer())
            and (knob.minimum is None or value >= knob.minimum)
            and (knob.maximum is None or value <= knob.maximum)
            and (knob.exclusive_minimum is None or value > knob.exclusive_minimum)
            and (knob.exclusive_maximum is None or value < knob.exclusive_maximum)
        )
    return None if ok else f"must be {describe(knob)}"


def check_list(label: str, knob: Knob, values: Any) -> list[str]:
    """Problems with a list knob's values: empty, an item out of bounds, duplicates."""
    if not isinstance(values, (list, tuple)) or not values:
        return [f"{label}: give at least one value (a non-empty list), got {values!r}"]
    problems = []
    bad = [(item, why) for item in values if (why := check_value(knob, item))]
    if bad:
        problems.append(f"{label}: every value {bad[0][1]}; fix {[item for item, _ in bad]!r}")
    elif len({float(v) for v in values}) != len(values):
        problems.append(f"{label}: remove the duplicate values in {list(values)!r}")
    return problems


def validate(values: dict[str, Any], table: tuple[Knob, ...] = KNOBS) -> list[str]:
    """Every problem with a set of knob values, as messages that say what to fix (empty if fine).

    Checks each knob of ``table`` present in ``values`` (types, finiteness, bounds, duplicates in
    lists) and the rules that span knobs. Unknown names are reported too.
    """
    by_name = {knob.name: knob for knob in table}
    problems = []
    for name, value in values.items():
        knob = by_name.get(name)
        if knob is None:
            problems.append(f"{name}: unknown setting; known: {sorted(by_name)}")
            continue
        if knob.is_list:
            problems += check_list(name, knob, value)
        elif (why := check_value(knob, value)) is not None:
            problems.append(f"{name}: {why}, got {value!r}")
    if not problems and {"validation_fraction", "test_fraction"} <= set(values) and values["validation_fraction"] + values["test_fraction"] >= 0.9:
        problems.append("validation_fraction + test_fraction must leave at least 10% for training")
    if not problems and "backbone" in values:
        problems += head_problems(values)
    return problems


def head_problems(values: dict[str, Any]) -> list[str]:
    """The head's settings given without a backbone (where they mean nothing), and fine-tuning with halving."""
    fine_tuned = [v for v in values.get("fine_tune_layers") or [0] if v]
    if values["backbone"]:
        if fine_tuned and values.get("search_strategy") == "halving":
            return [
                "fine_tune_layers: fine-tuning runs with search_strategy grid or random (halving resumes heads between rungs); "
                "set search_strategy to grid, or fine_tune_layers to [0]"
            ]
        return []
    problems = []
    if fine_tuned:
        problems.append("fine_tune_layers: fine-tuning is a backbone head's setting: set backbone, or leave fine_tune_layers at [0]")
    if 0 in list(values.get("hidden_units") or []):
        problems.append("hidden_units: 0 (a linear head) needs a backbone: set backbone, or give widths >= 1 for the model family")
    if [float(v) for v in values.get("l2_weights") or [0.0]] != [0.0]:
        problems.append("l2_weights: the L2 weight is a backbone head's setting: set backbone, or leave l2_weights at [0.0]")
    return problems


def defaults() -> dict[str, Any]:
    return {knob.name: knob.default for knob in KNOBS}
