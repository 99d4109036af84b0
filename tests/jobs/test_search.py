"""Search spaces: validation messages say what to fix; trial lists are deterministic."""

from __future__ import annotations

import pytest

from sparktf.knobs import parse_number_list
from sparktf.search import SearchSpaceError, build_trials, trial_id, validate_search_space

SPACE = {"learning_rate": [0.001, 0.01], "hidden_units": [64, 128, 256], "batch_size": [32], "dropout": [0.5]}


def test_grid_is_full_product_with_stable_ids():
    trials = build_trials(SPACE)
    assert len(trials) == 6
    assert len({t["trial_id"] for t in trials}) == 6
    assert trials == build_trials(SPACE)
    assert trials[0]["trial_id"] == trial_id(trials[0]["params"])


def test_random_is_a_seeded_sparse_sample_of_the_grid():
    grid_ids = {t["trial_id"] for t in build_trials(SPACE)}
    sample = build_trials(SPACE, strategy="random", num_samples=3, seed=7)
    assert len(sample) == 3
    assert {t["trial_id"] for t in sample} <= grid_ids
    assert sample == build_trials(SPACE, strategy="random", num_samples=3, seed=7)
    assert len(build_trials(SPACE, strategy="random", num_samples=50, seed=7)) == 6


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"learning_rate": []}, "learning_rate: give at least one value"),
        ({"learning_rate": [0.01, 0]}, "learning_rate: every value must be a number > 0"),
        ({"learning_rate": [-1e-3]}, "learning_rate"),
        ({"hidden_units": [64, 1.5]}, "hidden_units: every value must be an integer >= 0"),
        ({"dropout": [1.0]}, "dropout"),
        ({"batch_size": [32, 32]}, "duplicate"),
    ],
)
def test_bad_space_is_refused_with_what_to_fix(change, fragment):
    problems = validate_search_space({**SPACE, **change})
    assert any(fragment in p for p in problems), problems
    with pytest.raises(SearchSpaceError):
        build_trials({**SPACE, **change})


def test_random_needs_sample_count():
    assert validate_search_space(SPACE, strategy="random", num_samples=0)


def test_parse_number_list():
    assert parse_number_list("0.001, 0.01") == [0.001, 0.01]
    assert parse_number_list("[64, 128]", int) == [64, 128]
