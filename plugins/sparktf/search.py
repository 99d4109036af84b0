"""Search spaces and trial lists for hyperparameter tuning (pure Python, cheap to import).

Used twice: by the DAG's validation task, which refuses a bad search space before any Spark job
starts, and by the tuning job, which turns the same space into its list of trials.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from typing import Any

# Grid dimensions (each a non-empty list in a search space) and how to check one value.
GRID_DIMENSIONS: dict[str, tuple[type, str]] = {
    "learning_rate": (float, "a number > 0"),
    "hidden_units": (int, "an integer >= 1"),
    "batch_size": (int, "an integer >= 1"),
    "dropout": (float, "a number in [0, 1)"),
}
STRATEGIES = ("grid", "random")
MAX_TRIALS = 1000


class SearchSpaceError(ValueError):
    """A search space that cannot be run; the message lists every problem and how to fix it."""


def _value_ok(name: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if name == "learning_rate":
        return value > 0
    if name in ("hidden_units", "batch_size"):
        return float(value).is_integer() and value >= 1
    if name == "dropout":
        return 0 <= value < 1
    return True


def validate_search_space(
    space: dict[str, list],
    *,
    strategy: str = "grid",
    num_samples: int | None = None,
    epochs: int = 1,
    max_parallel_trials: int = 0,
) -> list[str]:
    """Return every problem with a search space, as messages that say what to fix (empty if fine)."""
    problems = []
    for name, (_kind, expectation) in GRID_DIMENSIONS.items():
        values = space.get(name)
        if not isinstance(values, list) or not values:
            problems.append(f"{name}: give at least one value (a non-empty list), got {values!r}")
            continue
        bad = [v for v in values if not _value_ok(name, v)]
        if bad:
            problems.append(f"{name}: every value must be {expectation}; fix {bad!r}")
        if len(set(map(str, values))) != len(values):
            problems.append(f"{name}: remove the duplicate values in {values!r}")
    unknown = sorted(set(space) - set(GRID_DIMENSIONS))
    if unknown:
        problems.append(f"unknown search dimensions {unknown}; known: {sorted(GRID_DIMENSIONS)}")
    if strategy not in STRATEGIES:
        problems.append(f"search_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "random" and (not isinstance(num_samples, int) or num_samples < 1):
        problems.append(f"random search needs num_random_trials >= 1, got {num_samples!r}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        problems.append(f"epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(max_parallel_trials, int) or max_parallel_trials < 0:
        problems.append(f"max_parallel_trials must be >= 0 (0 = every free task slot), got {max_parallel_trials!r}")
    if not problems:
        size = math.prod(len(space[name]) for name in GRID_DIMENSIONS)
        if strategy == "grid" and size > MAX_TRIALS:
            problems.append(f"the grid has {size} trials, more than {MAX_TRIALS}: use random search or a smaller grid")
    return problems


def trial_id(params: dict[str, Any]) -> str:
    """A stable id for a trial's hyperparameters: re-runs and retries reuse the same id."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return "trial-" + hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:10]


def build_trials(
    space: dict[str, list],
    *,
    strategy: str = "grid",
    num_samples: int | None = None,
    seed: int = 0,
    fixed: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Expand a search space into trials: the full grid, or a random sample of it.

    Random search samples grid points without replacement (the seed's "sparse sample of
    parameters"), so a sample as large as the grid is the grid itself.

    Returns:
        A list of ``{"trial_id": ..., "params": {...}}`` in a deterministic order.
    """
    problems = validate_search_space(space, strategy=strategy, num_samples=num_samples)
    if problems:
        raise SearchSpaceError("; ".join(problems))
    names = list(GRID_DIMENSIONS)
    points = [
        {name: GRID_DIMENSIONS[name][0](value) for name, value in zip(names, combo)}
        for combo in itertools.product(*(space[name] for name in names))
    ]
    if strategy == "random" and num_samples < len(points):
        points = random.Random(seed).sample(points, num_samples)
    trials = []
    for point in points:
        params = {**(fixed or {}), **point}
        trials.append({"trial_id": trial_id(params), "params": params})
    return trials


def parse_number_list(text: str, kind: type = float) -> list:
    """Parse ``"0.001,0.01"`` (or a JSON list) into a list of numbers."""
    text = text.strip()
    if text.startswith("["):
        values = json.loads(text)
    else:
        values = [part for part in (p.strip() for p in text.split(",")) if part]
    return [kind(float(v)) if kind is int else kind(v) for v in values]
