"""The successive-halving rule (pure): which configuration trains next and to which rung."""

from __future__ import annotations

import math

import pytest

from sparktf import halving

CONFIGS = [f"c{i}" for i in range(9)]
# A deterministic fake metric per configuration: c0 is the best, c8 the worst (each rises with the rung).
FAKE_ACCURACY = {c: 0.95 - 0.05 * i for i, c in enumerate(CONFIGS)}


def fake_record(config_id: str, rung: int) -> dict:
    return {"config_id": config_id, "rung": rung, "status": "ok", "val_accuracy": FAKE_ACCURACY[config_id] + 0.01 * rung}


def simulate(slots: int, num_rungs: int, factor: int, record=fake_record) -> list[tuple[str, int]]:
    """Run the rule to the end, finishing the oldest running step whenever every slot is busy or nothing can start."""
    records, running, order = [], [], []
    while True:
        step = halving.next_step(CONFIGS, records, running, num_rungs=num_rungs, factor=factor) if len(running) < slots else None
        if step is not None:
            running.append(step)
            order.append(step)
            continue
        if not running:
            return order
        records.append(record(*running.pop(0)))


def test_rungs_grow_by_the_factor_up_to_epochs():
    assert halving.rung_epochs(1, 3, 15) == [1, 3, 9, 15]
    assert halving.rung_epochs(1, 3, 9) == [1, 3, 9]
    assert halving.rung_epochs(2, 2, 2) == [2]
    with pytest.raises(ValueError, match="halving_factor"):
        halving.rung_epochs(1, 1, 9)


def test_refuses_a_factor_below_two_and_a_minimum_above_epochs():
    assert halving.settings_problems(1, 3, 15) == []
    assert "halving_factor must be an integer >= 2" in halving.settings_problems(1, 1, 15)[0]
    assert "halving_min_epochs (20) is above epochs (15)" in halving.settings_problems(20, 3, 15)[0]


def test_one_slot_promotes_exactly_the_top_third_at_each_rung():
    steps = simulate(slots=1, num_rungs=3, factor=3)
    by_rung = {r: [c for c, rung in steps if rung == r] for r in range(3)}
    assert sorted(by_rung[0]) == CONFIGS  # every configuration reaches the first rung
    # Rung 1 gets 3 of 9: asynchronously, each as soon as it is in the top third of what finished.
    assert by_rung[1] == ["c0", "c1", "c2"]
    assert by_rung[2] == ["c0"]  # the top third of rung 1's three
    # No slot idles: a promotion is taken the moment it exists (c0 once c0..c2 finished rung 0),
    # and a new configuration otherwise (rung 1 holding one record promotes nobody yet).
    assert steps[:6] == [("c0", 0), ("c1", 0), ("c2", 0), ("c0", 1), ("c3", 0), ("c4", 0)]


def test_two_slots_promote_the_same_configurations():
    steps = simulate(slots=2, num_rungs=3, factor=3)
    assert [c for c, rung in steps if rung == 1] == ["c0", "c1", "c2"]
    assert [c for c, rung in steps if rung == 2] == ["c0"]


def test_asynchronous_promotion_takes_a_late_better_configuration_too():
    # ASHA's known trait: a configuration better than every earlier one is promoted when it
    # finishes, so a rising metric in trial order promotes more than a third (never a waiting slot).
    def rising(config_id, rung):
        return {"config_id": config_id, "rung": rung, "status": "ok", "val_accuracy": 1 - FAKE_ACCURACY[config_id]}

    steps = simulate(slots=1, num_rungs=2, factor=3, record=rising)
    assert [c for c, rung in steps if rung == 1] == ["c2", "c3", "c4", "c5", "c6", "c7", "c8"]


def test_the_full_rule_promotes_the_best_third_when_rungs_are_synchronous():
    # With all nine at rung 0 done, the top third by the fake metric is c6, c7, c8, best first.
    records = [fake_record(c, 0) for c in CONFIGS]
    picks = []
    for _ in range(3):
        step = halving.next_step(CONFIGS, records, picks, num_rungs=3, factor=3)
        picks.append(step)
    assert picks == [("c0", 1), ("c1", 1), ("c2", 1)]
    assert halving.next_step(CONFIGS, records, picks, num_rungs=3, factor=3) is None  # wait for rung 1


def test_nan_and_failed_steps_rank_last_and_are_never_promoted():
    def record(config_id, rung):
        if config_id in ("c0", "c1"):
            return {"config_id": config_id, "rung": rung, "status": "ok" if config_id == "c0" else "failed", "val_accuracy": math.nan}
        return fake_record(config_id, rung)

    records = [record(c, 0) for c in CONFIGS]
    ranked = [r["config_id"] for r in halving.ranked_at_rung(records, 0, {c: i for i, c in enumerate(CONFIGS)})]
    assert ranked[-2:] == ["c0", "c1"]
    picks = []
    for _ in range(3):
        picks.append(halving.next_step(CONFIGS, records, picks, num_rungs=3, factor=3))
    assert picks == [("c2", 1), ("c3", 1), ("c4", 1)]


def test_highest_rungs_and_utilisation():
    records = [fake_record("c0", 0), fake_record("c1", 0), fake_record("c1", 1)]
    assert {c: r["rung"] for c, r in halving.highest_rungs(records).items()} == {"c0": 0, "c1": 1}
    steps = [
        {"status": "ok", "epochs": 1, "from_epochs": 0, "epochs_trained": 0},  # reused: counted, trained in an earlier run
        {"status": "ok", "epochs": 3, "from_epochs": 1, "epochs_trained": 2},
        {"status": "failed", "epochs": 9, "from_epochs": 3, "epochs_trained": 4},
    ]
    assert halving.search_epochs(steps) == 1 + 2 + 4
    assert halving.utilisation([3.0, 5.0], slots=2, wall_seconds=5.0) == 0.8
    assert halving.utilisation([], slots=2, wall_seconds=0.0) is None
