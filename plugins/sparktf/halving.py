"""Asynchronous successive halving (ASHA): which configuration trains next, and to which rung (pure Python).

Every configuration trains to the first rung (``halving_min_epochs``); at each rung only the best
``1/factor`` by validation accuracy continue to the next (``min * factor**k`` epochs, the last rung
being the ``epochs`` knob), from their own saved weights and optimizer state. Promotion is
asynchronous: a free slot takes the next promotable configuration (the highest rung first),
else a new configuration at the bottom rung, so no slot waits for a rung to fill while work
remains. A configuration whose rung step failed (NaN loss, crashed worker) ranks last at its rung
and is never promoted.

A rung record, as this module reads it: ``{"config_id", "rung" (index into :func:`rung_epochs`),
"status" ("ok" or "failed"), "val_accuracy" (float, may be NaN)}``. The Spark side writing and
reading them is :mod:`sparktf.halving_driver`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

DEFAULT_FACTOR = 3


def settings_problems(min_epochs: Any, factor: Any, epochs: Any) -> list[str]:
    """Why halving settings cannot run (empty if fine): checked before any Spark job starts."""
    problems = []
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        problems.append(f"halving_factor must be an integer >= 2 (keep the best 1/factor at each rung), got {factor!r}")
    if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 1:
        problems.append(f"halving_min_epochs must be an integer >= 1, got {min_epochs!r}")
    elif isinstance(epochs, int) and min_epochs > epochs:
        problems.append(f"halving_min_epochs ({min_epochs}) is above epochs ({epochs}): lower it, or raise epochs (the last rung)")
    return problems


def rung_epochs(min_epochs: int, factor: int, max_epochs: int) -> list[int]:
    """The rungs' budgets in epochs: ``min * factor**k`` below ``max_epochs``, then ``max_epochs``.

    >>> rung_epochs(1, 3, 15)
    [1, 3, 9, 15]
    >>> rung_epochs(2, 2, 8)
    [2, 4, 8]
    """
    problems = settings_problems(min_epochs, factor, max_epochs)
    if problems:
        raise ValueError("; ".join(problems))
    rungs = []
    budget = min_epochs
    while budget < max_epochs:
        rungs.append(budget)
        budget *= factor
    return [*rungs, max_epochs]


def _score(record: dict[str, Any]) -> float:
    """Validation accuracy, or -inf for a failed step or a NaN metric (they rank last)."""
    value = record.get("val_accuracy")
    if record.get("status") != "ok" or not isinstance(value, (int, float)) or not math.isfinite(value):
        return -math.inf
    return float(value)


def ranked_at_rung(records: Iterable[dict[str, Any]], rung: int, order: dict[str, int]) -> list[dict[str, Any]]:
    """The records of one rung, best first: validation accuracy, failed/NaN last, ties in configuration order."""
    at_rung = [r for r in records if r["rung"] == rung]
    return sorted(at_rung, key=lambda r: (-_score(r), order.get(r["config_id"], len(order)), r["config_id"]))


def promotable(records: Sequence[dict[str, Any]], rung: int, factor: int, order: dict[str, int], taken: set[tuple[str, int]]) -> str | None:
    """The best configuration in the top ``1/factor`` of ``rung`` not yet at (or running to) ``rung + 1``.

    Args:
        records: every rung record so far.
        rung: the rung to promote from.
        factor: the reduction factor.
        order: configuration id -> its position in the trial list (breaks ties).
        taken: ``(config_id, rung)`` pairs that are finished or running.
    """
    ranked = ranked_at_rung(records, rung, order)
    for record in ranked[: len(ranked) // factor]:
        if _score(record) > -math.inf and (record["config_id"], rung + 1) not in taken:
            return record["config_id"]
    return None


def next_step(
    config_ids: Sequence[str], records: Sequence[dict[str, Any]], running: Iterable[tuple[str, int]], *, num_rungs: int, factor: int
) -> tuple[str, int] | None:
    """What a free slot trains next: ``(config_id, rung index)``, or None when nothing can start now.

    The highest rung with a promotable configuration goes first (it is closest to a result); else
    the next configuration, in trial order, that has not started. None while running steps may
    still make something promotable, and at the end.

    Args:
        config_ids: every configuration, in trial order.
        records: every finished rung record (see the module's shape).
        running: ``(config_id, rung)`` of the steps in flight.
        num_rungs: ``len(rung_epochs(...))``.
        factor: the reduction factor.
    """
    running = set(running)
    order = {config_id: i for i, config_id in enumerate(config_ids)}
    taken = running | {(r["config_id"], r["rung"]) for r in records}
    for rung in range(num_rungs - 2, -1, -1):
        config_id = promotable(records, rung, factor, order, taken)
        if config_id is not None:
            return config_id, rung + 1
    started = {config_id for config_id, _ in taken}
    for config_id in config_ids:
        if config_id not in started:
            return config_id, 0
    return None


def highest_rungs(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each configuration's record at the highest rung it reached."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        current = best.get(record["config_id"])
        if current is None or record["rung"] > current["rung"]:
            best[record["config_id"]] = record
    return best


def search_epochs(steps: Iterable[dict[str, Any]]) -> int:
    """The search's cost in trial-epochs, whichever run trained them: each finished step's epochs
    between its rungs (a step starts from the checkpoint below), and what failed steps trained."""
    return sum(s["epochs"] - s["from_epochs"] if s["status"] == "ok" else s.get("epochs_trained", 0) for s in steps)


def utilisation(busy_seconds: Iterable[float], slots: int, wall_seconds: float) -> float | None:
    """Busy slot-seconds over available slot-seconds (``slots * wall_seconds``); None with no time."""
    available = slots * wall_seconds
    return round(sum(busy_seconds) / available, 4) if available > 0 else None
