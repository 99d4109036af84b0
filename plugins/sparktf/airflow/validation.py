"""The DAGs' checks of a run's Params before any Spark job starts: each returns the problems found.

Every function returns a list of messages that each say what to fix (empty when fine), so the
``validate_params`` tasks stay a few lines and the rules are unit-tested without Airflow. The few
checks that need the object store take its lookups as arguments (``has_objects``, ``head``,
``read_bytes``: the functions of :mod:`sparktf.storage` in the DAGs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sparktf import knobs

REGISTER_REQUEST_KEYS = ("model_name", "source", "application", "weights_uri", "model_uri", "labels", "label_map_uri", "resize_policy")


def failure(message: str) -> Exception:
    """The exception that fails a task without retries (another try would end the same way)."""
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def refuse(problems: list[str], prefix: str | None = None) -> None:
    """Fail the task (no retry) with every problem, when there is one."""
    if problems:
        message = "; ".join(problems)
        raise failure(f"{prefix}: {message}" if prefix else message)


# ---------------------------------------------------------------------------------------------
# tuning_pipeline
# ---------------------------------------------------------------------------------------------


def tuning_problems(params: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Problems with a tuning run's knobs and URIs (no I/O), and the checked settings.

    Returns:
        ``(problems, summary)``; the summary (dataset URI, number of trials, strategy, epochs) is
        what the ``validate_params`` task returns when there is no problem.
    """
    from sparktf import search, storage

    values = {name: params[name] for name in knobs.BY_NAME}
    problems = knobs.validate(values)
    space = knobs.search_space(values)
    if not problems:
        problems = search.validate_search_space(space, strategy=values["search_strategy"], num_samples=values["num_random_trials"])
    if not problems and values["search_strategy"] == "halving":
        from sparktf import halving

        problems = halving.settings_problems(values["halving_min_epochs"], values["halving_factor"], values["epochs"])
    trials: list = []
    if not problems:
        # The tuning job's own trial list (random search samples by index: a huge space is never
        # built in memory).
        trials = search.build_trials(space, strategy=values["search_strategy"], num_samples=values["num_random_trials"], seed=values["seed"])
    for name in ("dataset_uri", "workspace_uri"):
        try:
            storage.parse_uri(params[name])
        except ValueError as err:
            problems.append(f"{name}: {err}")
    summary = {"dataset_uri": params["dataset_uri"], "trials": len(trials), "search_strategy": values["search_strategy"], "epochs": values["epochs"]}
    return problems, summary


def dataset_problems(dataset_uri: str, has_objects: Callable[[str], bool]) -> list[str]:
    """The dataset location must hold objects (checked after :func:`tuning_problems` passed)."""
    from sparktf import storage

    location = storage.prefix_uri(dataset_uri)
    if has_objects(location):
        return []
    return [
        f"dataset_uri {location} holds no objects: upload the data set there (<label>/<image> files or MNIST IDX files) or point dataset_uri at it"
    ]


def backbone_problems(backbone: str, models_uri: str, fine_tune_layers: Sequence[int] = ()) -> list[str]:
    """A ``backbone`` that does not exist, has no usable feature layer or takes an input the data
    cannot give, or ``fine_tune_layers`` beyond the layers it has (checked after :func:`tuning_problems`
    passed; loads it, sha256-checked, in safe mode).

    Storage errors raise as they are: they are no verdict on the backbone (the task retries).
    """
    if not backbone:
        return []
    from sparktf import backbones

    try:
        found = backbones.check_backbone(models_uri, backbone)
    except backbones.BackboneRefused as refused:
        return [f"backbone {backbone!r}: {refused}"]
    too_many = sorted(n for n in fine_tune_layers if n > found["fine_tunable_layers"])
    if too_many:
        return [
            f"fine_tune_layers: backbone {backbone!r} has {found['fine_tunable_layers']} layers with weights below its features, "
            f"fewer than {too_many}; give at most {found['fine_tunable_layers']}"
        ]
    return []


# ---------------------------------------------------------------------------------------------
# register_model
# ---------------------------------------------------------------------------------------------


def registration_request(params: Mapping[str, Any]) -> dict[str, Any]:
    """The registration request the ``register_model`` Params describe."""
    return {name: params[name] for name in REGISTER_REQUEST_KEYS}


def upload_uris(request: Mapping[str, Any]) -> dict[str, str]:
    """Param name -> URI of every upload the request needs (weights or model file, label map)."""
    uploads = {"weights_uri": request["weights_uri"]} if request["source"] == "keras_application" else {"model_uri": request["model_uri"]}
    if request["labels"] == "label_map":
        uploads["label_map_uri"] = request["label_map_uri"]
    return uploads


def upload_problems(request: Mapping[str, Any], head: Callable[[str], dict | None], read_bytes: Callable[[str], bytes]) -> list[str]:
    """Missing uploads, an oversized label map, a label map of the wrong size for a stock network.

    Args:
        request: a consistent request (:func:`sparktf.applications.check_request` found nothing).
        head: the object's ``{"size": ...}``, or None when it does not exist.
        read_bytes: the object's content.
    """
    from sparktf import applications

    problems = []
    for name, uri in upload_uris(request).items():
        found = head(uri)
        if found is None:
            problems.append(f"{name} {uri} does not exist: upload it first (aws s3 cp / mc cp)")
        elif name == "label_map_uri" and found["size"] > applications.LABEL_MAP_MAX_BYTES:
            problems.append(f"label_map_uri {uri} is {found['size']} bytes: not a label map")
    if not problems and request["labels"] == "label_map":
        try:
            labels = applications.parse_label_map(read_bytes(request["label_map_uri"]))
            expected = applications.expected_classes(request)
            if expected is not None:
                applications.check_labels(labels, expected)
        except applications.RegistrationRefused as refused:
            problems.append(f"label_map_uri: {refused}")
    return problems


# ---------------------------------------------------------------------------------------------
# nightly_inference
# ---------------------------------------------------------------------------------------------

# Peak memory of a model call relative to its float32 input batch (the input, the layers'
# activations kept alive at once, the outputs). A rough, deliberately generous estimate: it
# refuses a batch that cannot fit, it does not promise one that can.
ACTIVATION_FACTOR = 4
FLOAT32_BYTES = 4
_MEMORY_UNITS = {"": 2**20, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(value: str) -> int:
    """Bytes in a Spark memory setting: ``2g``, ``512m``, ``1024k``, ``2gb``; a bare number is MiB (as Spark reads it)."""
    text = str(value).strip().lower().removesuffix("b")
    number = text.rstrip("kmgt")
    unit = text[len(number) :]
    if not number.isdigit() or unit not in _MEMORY_UNITS:
        raise ValueError(f"not a Spark memory setting: {value!r} (e.g. 2g, 512m)")
    return int(number) * _MEMORY_UNITS[unit]


def batch_bytes(batch_size: int, input_shape: list[int] | tuple[int, ...]) -> int:
    """Estimated peak bytes of one model call: batch x H x W x C float32 pixels x :data:`ACTIVATION_FACTOR`."""
    pixels = 1
    for size in input_shape:
        pixels *= int(size)
    return int(batch_size) * pixels * FLOAT32_BYTES * ACTIVATION_FACTOR


def batch_size_problems(batch_size: int, input_shape: list[int] | tuple[int, ...], executor_memory: str) -> list[str]:
    """A ``batch_size`` whose model calls cannot fit the executor's memory at the model's input size."""
    needed, available = batch_bytes(batch_size, input_shape), parse_memory(executor_memory)
    if needed <= available:
        return []
    shape = "x".join(str(int(s)) for s in input_shape)
    largest = max(1, available // batch_bytes(1, input_shape))
    return [
        f"batch_size {batch_size} needs about {needed / 2**30:.1f} GiB per model call at the model's input "
        f"size {shape} (float32, x{ACTIVATION_FACTOR} for activations), more than the executor's "
        f"{executor_memory} (SPARKTF_EXECUTOR_MEMORY): trigger with batch_size <= {largest}"
    ]
