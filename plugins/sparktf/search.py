"""Search spaces and trial lists for hyperparameter tuning (pure Python, cheap to import).

Used twice: by the DAG's validation task, which refuses a bad search space before any Spark job
starts, and by the tuning job, which turns the same space into its list of trials. Dimensions and
their bounds come from :mod:`sparktf.knobs`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

from sparktf import knobs

STRATEGIES = ("grid", "random", "halving")  # halving runs the whole grid through rungs (sparktf.halving)
MAX_TRIALS = 1000


class SearchSpaceError(ValueError):
    """A search space that cannot be run; the message lists every problem and how to fix it."""


def grid_size(space: dict[str, list]) -> int:
    return math.prod(len(space[name]) for name in knobs.search_dimensions(space))


def validate_search_space(space: dict[str, list], *, strategy: str = "grid", num_samples: int | None = None) -> list[str]:
    """Every problem with a search space, as messages that say what to fix (empty if fine)."""
    problems = []
    dims = knobs.search_dimensions(space)
    for name, knob in dims.items():
        problems += knobs.check_list(name, knob, space.get(name))
    unknown = sorted(set(space) - set(dims))
    if unknown:
        problems.append(f"unknown search dimensions {unknown}; known: {sorted(dims)}")
    if strategy not in STRATEGIES:
        problems.append(f"search_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "random" and (not isinstance(num_samples, int) or isinstance(num_samples, bool) or not 1 <= num_samples <= MAX_TRIALS):
        problems.append(f"random search needs 1 <= num_random_trials <= {MAX_TRIALS}, got {num_samples!r}")
    if not problems and strategy in ("grid", "halving") and grid_size(space) > MAX_TRIALS:
        problems.append(f"the grid has {grid_size(space)} trials, more than {MAX_TRIALS}: use random search or a smaller grid")
    return problems


def trial_id(params: dict[str, Any], fingerprint: dict[str, Any] | None = None) -> str:
    """A stable id for a trial: re-runs and retries of the same trial reuse the same id.

    Args:
        params: the trial's hyperparameters.
        fingerprint: everything else that changes the trial's result (model family, epochs, early
            stopping, learning-rate decay, seed, the prepared data's manifest hash, the code
            version: see :func:`sparktf.jobs.tune.trial_fingerprint`). Without it the id covers
            the hyperparameters only.
    """
    identity: dict[str, Any] = params if fingerprint is None else {"params": params, "fingerprint": fingerprint}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "trial-" + hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:10]


def _grid_point(space: dict[str, list], index: int) -> dict[str, Any]:
    """The ``index``-th point of the grid in row-major order (the last dimension varies fastest)."""
    dims = knobs.search_dimensions(space)
    point = {}
    for name in reversed(list(dims)):
        values = space[name]
        index, position = divmod(index, len(values))
        kind = int if dims[name].item_kind == "int" else float
        point[name] = kind(values[position])
    return {name: point[name] for name in dims}


def build_trials(
    space: dict[str, list],
    *,
    strategy: str = "grid",
    num_samples: int | None = None,
    seed: int = 0,
    fixed: dict[str, Any] | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Expand a search space into trials: the full grid, or a random sample of it.

    Random search samples grid points without replacement (the reference recipe's "sparse sample of
    parameters") by index, so the grid product is never built in memory; a sample as large as
    the grid is the grid itself. ``fingerprint`` goes into every trial id (:func:`trial_id`).

    Returns:
        A list of ``{"trial_id": ..., "params": {...}}`` in a deterministic order.
    """
    problems = validate_search_space(space, strategy=strategy, num_samples=num_samples)
    if problems:
        raise SearchSpaceError("; ".join(problems))
    size = grid_size(space)
    indices = sorted(random.Random(seed).sample(range(size), num_samples)) if strategy == "random" and num_samples < size else range(size)
    trials = []
    for index in indices:
        params = {**(fixed or {}), **_grid_point(space, index)}
        trials.append({"trial_id": trial_id(params, fingerprint), "params": params})
    return trials
