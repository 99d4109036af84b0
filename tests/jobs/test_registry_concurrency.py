"""The registry under concurrent exports: version claims and the champion's compare-and-swap.

Each race is made deterministic with the registry's test hooks (a barrier between reading and
writing), driven by two real threads against the real S3 server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from sparktf import registry, storage
from sparktf_dev.testing import LABEL_NAMES, wait_until


@pytest.fixture(autouse=True)
def no_hooks_left():
    yield
    registry.TEST_HOOKS.clear()


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory) -> list[str]:
    """Three different small ``.keras`` files (distinct bytes)."""
    import keras

    from sparktf.models import build_model

    folder = tmp_path_factory.mktemp("keras")
    paths = []
    for seed in (1, 2, 3):
        keras.utils.set_random_seed(seed)
        model = build_model("mlp", (28, 28, 1), 10, hidden_units=4 + seed)
        path = str(folder / f"model-{seed}.keras")
        model.save(path)
        paths.append(path)
    keras.backend.clear_session()
    return paths


def run_together(jobs: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Run callables in threads at once; their results (or re-raise the first error)."""
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def call(name: str, fn: Callable[[], object]) -> None:
        try:
            results[name] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=call, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def metadata_for(run: str, score: float = 0.5) -> dict:
    return {
        "source_run": run,
        "trial_id": f"trial-of-{run}",
        "input_shape": [28, 28, 1],
        "label_names": LABEL_NAMES,
        "metrics": {"test_accuracy": score, "test_loss": 1.0 - score},
    }


def file_sha(path: str) -> str:
    with open(path, "rb") as fh:
        return storage.sha256_hex(fh.read())


# ---------------------------------------------------------------------------------------------
# Point 1: version numbers
# ---------------------------------------------------------------------------------------------


def test_two_exports_at_once_claim_different_versions(s3_prefix, keras_files):
    models = s3_prefix + "/models/"
    barrier = threading.Barrier(2, timeout=60)
    chosen: list[int] = []
    lock = threading.Lock()

    def both_pick_before_either_claims(version: int, claimant: str) -> None:
        with lock:
            chosen.append(version)
            first_two = len(chosen) <= 2
        if first_two:
            barrier.wait()

    registry.TEST_HOOKS["version_chosen"] = both_pick_before_either_claims
    results = run_together(
        {
            run: (lambda run=run, path=path: registry.write_version(models, "digits", model_path=path, metadata=metadata_for(run)))
            for run, path in (("run-a", keras_files[0]), ("run-b", keras_files[1]))
        }
    )

    assert chosen[:2] == [1, 1]  # the race happened: both picked version 1 before claiming it
    assert sorted(m["version"] for m in results.values()) == [1, 2]
    for run, path in (("run-a", keras_files[0]), ("run-b", keras_files[1])):
        mine = results[run]
        stored = storage.read_json(storage.join_uri(mine["uri"], "metadata.json"))
        assert stored == mine
        assert stored["source_run"] == run
        # The version's model is this export's file, not the other's.
        assert storage.stream_sha256(mine["model_uri"]) == mine["model_sha256"] == file_sha(path)
        claim = storage.read_json(registry.claim_uri(models, "digits", mine["version"]))
        assert claim["claimant"] == mine["claimant"]
        assert claim["source_run"] == run
    assert [m["version"] for m in registry.list_versions(models, "digits")] == [1, 2]


def test_a_claimed_version_is_never_overwritten(s3_prefix, keras_files):
    """A version claimed by another run whose export died stays as it is; the next export takes n+1."""
    models = s3_prefix + "/models/"

    class Crash(RuntimeError):
        pass

    def crash(**_info) -> None:
        raise Crash("the export died before writing its metadata")

    registry.TEST_HOOKS["before_metadata"] = crash
    with pytest.raises(Crash):
        registry.write_version(models, "digits", model_path=keras_files[0], metadata=metadata_for("run-x"))
    registry.TEST_HOOKS.clear()
    v1 = registry.version_uri(models, "digits", 1) + "/"
    before = {o["key"]: o["etag"] for o in storage.iter_objects(v1)}
    assert any(k.endswith("/_claim.json") for k in before)
    assert not any(k.endswith("/metadata.json") for k in before)

    other = registry.write_version(models, "digits", model_path=keras_files[1], metadata=metadata_for("run-y"))
    assert other["version"] == 2
    assert {o["key"]: o["etag"] for o in storage.iter_objects(v1)} == before  # untouched
    with pytest.raises(registry.VersionConflict, match="version 2 already exists"):
        registry.write_version(models, "digits", model_path=keras_files[2], metadata=metadata_for("run-z"), version=2)
    assert storage.read_json(storage.join_uri(other["uri"], "metadata.json")) == other

    # The same run exporting again continues its own unfinished version 1.
    again = registry.write_version(models, "digits", model_path=keras_files[0], metadata=metadata_for("run-x"))
    assert again["version"] == 1
    assert storage.stream_sha256(again["model_uri"]) == file_sha(keras_files[0])
    claim = storage.read_json(registry.claim_uri(models, "digits", 1))
    assert claim["claimant"] == again["claimant"]
    assert claim["took_over_from"]


def test_a_taken_over_export_does_not_publish(s3_prefix, keras_files):
    """A zombie export whose claim was taken over by a retry of the same run stops before its metadata."""
    models = s3_prefix + "/models/"
    retried: dict = {}

    def retry_takes_over(**_info) -> None:
        registry.TEST_HOOKS.pop("before_metadata")
        retried["metadata"] = registry.write_version(models, "digits", model_path=keras_files[0], metadata=metadata_for("run-x"))

    registry.TEST_HOOKS["before_metadata"] = retry_takes_over
    with pytest.raises(registry.VersionConflict, match="taken over"):
        registry.write_version(models, "digits", model_path=keras_files[0], metadata=metadata_for("run-x"))
    assert retried["metadata"]["version"] == 1
    assert registry.list_versions(models, "digits") == [retried["metadata"]]


def test_a_zombie_export_writing_after_the_retry_published_cannot_change_its_files(s3_prefix, keras_files):
    """The earlier attempt stalls right after its claim; the retry takes the claim over and publishes;
    then the zombie wakes up and writes its (different) model before it notices: the published
    version still serves exactly the bytes its metadata names."""
    models = s3_prefix + "/models/"
    retried: dict = {}

    def retry_publishes_meanwhile(**_info) -> None:
        registry.TEST_HOOKS.pop("claimed")
        retried["metadata"] = registry.write_version(models, "digits", model_path=keras_files[0], metadata=metadata_for("run-z"))

    registry.TEST_HOOKS["claimed"] = retry_publishes_meanwhile
    with pytest.raises(registry.VersionConflict, match="taken over"):
        registry.write_version(models, "digits", model_path=keras_files[1], metadata=metadata_for("run-z"))
    published = registry.resolve(models, "digits", 1)
    assert published == retried["metadata"]
    with open(keras_files[0], "rb") as fh:
        assert storage.read_bytes(published["model_uri"]) == fh.read()  # not the zombie's model
    registry.load_version_model(published)  # the sha256 check passes


# ---------------------------------------------------------------------------------------------
# Point 2: the champion pointer
# ---------------------------------------------------------------------------------------------


def recorded_score(pointer: dict) -> tuple[float, str]:
    return float(pointer["metrics"]["test_accuracy"]), "recorded on the same test set"


def promote(models: str, metadata: dict, **kwargs) -> registry.Promotion:
    return registry.promote(
        models,
        "digits",
        metadata,
        metric="test_accuracy",
        min_improvement=0.0,
        score_champion=recorded_score,
        source_run=metadata["source_run"],
        **kwargs,
    )


@pytest.fixture
def three_versions(s3_prefix, keras_files) -> tuple[str, list[dict]]:
    """v1 (0.50, champion), v2 (0.90) and v3 (0.80): both new versions beat the champion."""
    models = s3_prefix + "/models/"
    versions = [
        registry.write_version(models, "digits", model_path=path, metadata=metadata_for(run, score))
        for path, run, score in zip(keras_files, ("run-1", "run-2", "run-3"), (0.5, 0.9, 0.8))
    ]
    assert promote(models, versions[0]).promoted
    return models, versions


def race(models: str, first: dict, second: dict) -> dict[str, registry.Promotion]:
    """Both exports read the champion; ``first`` writes; only then does ``second`` try to write."""
    barrier = threading.Barrier(2, timeout=60)
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def interleave(version: int, champion: dict | None, attempt: int) -> None:
        with lock:
            seen[version] = seen.get(version, 0) + 1
        if attempt > 1:
            return  # the re-read after a conflict goes straight on
        barrier.wait()  # both have read the same champion
        if version == second["version"]:
            wait_until(lambda: registry.read_champion(models, "digits")["version"] == first["version"], f"v{first['version']} promoted", timeout=60)

    registry.TEST_HOOKS["champion_read"] = interleave
    return run_together({name: (lambda m=m: promote(models, m)) for name, m in (("first", first), ("second", second))})


def test_the_worse_of_two_racing_exports_does_not_replace_the_better(three_versions):
    models, (_v1, v2, v3) = three_versions
    outcome = race(models, first=v2, second=v3)  # the better one writes first, the worse one last

    assert outcome["first"].promoted
    assert outcome["first"].attempts == 1
    late = outcome["second"]
    assert not late.promoted
    assert late.attempts == 2
    assert late.champion_version == 2
    assert "does not beat champion v2" in late.reason
    assert "changed during the comparison" in late.reason
    champion = registry.read_champion(models, "digits")
    assert champion["version"] == 2
    assert champion["promoted_over"] == 1
    assert registry.resolve(models, "digits")["version"] == 2


def test_a_better_export_that_loses_the_race_compares_again_and_wins(three_versions):
    models, (_v1, v2, v3) = three_versions
    outcome = race(models, first=v3, second=v2)  # the worse one writes first

    assert outcome["first"].promoted
    late = outcome["second"]
    assert late.promoted
    assert late.attempts == 2
    assert late.champion_version == 2
    assert "beats champion v3" in late.reason
    assert "changed during the comparison" in late.reason
    champion = registry.read_champion(models, "digits")
    assert champion["version"] == 2
    assert champion["promoted_over"] == 3
    assert champion["promotion_reason"] == late.reason


def test_promotion_gives_up_with_the_reason_when_the_champion_keeps_moving(three_versions):
    models, (v1, v2, _v3) = three_versions

    def someone_else_moves_it(version: int, champion: dict | None, attempt: int) -> None:
        registry.set_champion(models, "digits", registry.champion_pointer(v1, note=f"moved {attempt}"))

    registry.TEST_HOOKS["champion_read"] = someone_else_moves_it
    decision = promote(models, v2, max_attempts=3)
    assert not decision.promoted
    assert decision.attempts == 3
    assert decision.reason.startswith("gave up after 3 attempts")
    assert registry.read_champion(models, "digits")["version"] == 1


def test_resolve_refuses_a_pointer_that_disagrees_with_the_version(three_versions):
    models, (v1, v2, _v3) = three_versions
    registry.set_champion(models, "digits", {**registry.champion_pointer(v2), "model_sha256": v1["model_sha256"]})
    with pytest.raises(registry.ModelIntegrityError, match=r"names version 2 with sha256 .* disagree"):
        registry.resolve(models, "digits")
    assert registry.resolve(models, "digits", 2)["version"] == 2  # a pinned version still resolves


def test_saved_model_files_are_checked_before_serving(s3_prefix, keras_files, tmp_path):
    import keras

    models = s3_prefix + "/models/"
    model = keras.saving.load_model(keras_files[0], compile=False)
    saved = str(tmp_path / "saved_model")
    model.export(saved, format="tf_saved_model", verbose=False)
    metadata = registry.write_version(models, "digits", model_path=keras_files[0], metadata=metadata_for("run-1"), saved_model_dir=saved)
    files = {f["path"] for f in metadata["saved_model_files"]}
    assert "saved_model.pb" in files
    assert any(p.startswith("variables/") for p in files)
    assert registry.verify_saved_model(metadata) == len(files)

    variables = next(p for p in sorted(files) if p.startswith("variables/variables.data"))
    uri = storage.join_uri(metadata["saved_model_uri"], variables)
    original = storage.read_bytes(uri)
    storage.write_bytes(uri, original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(registry.ModelIntegrityError, match=f"{variables}: sha256 .* does not match"):
        registry.verify_saved_model(metadata)
    storage.write_bytes(uri, original)

    extra = storage.join_uri(metadata["saved_model_uri"], "assets", "extra.txt")
    storage.write_bytes(extra, b"not part of the export")
    with pytest.raises(registry.ModelIntegrityError, match="does not list"):
        registry.verify_saved_model(metadata)
    storage.delete_object(extra)

    storage.delete_object(storage.join_uri(metadata["saved_model_uri"], "saved_model.pb"))
    with pytest.raises(registry.ModelIntegrityError, match=r"saved_model\.pb is listed in the metadata but missing"):
        registry.verify_saved_model(metadata)
    with pytest.raises(registry.ModelIntegrityError, match="no SavedModel file list"):
        registry.verify_saved_model({k: v for k, v in metadata.items() if k != "saved_model_files"})


def test_a_manual_promotion_moves_the_pointer_by_compare_and_swap(s3_prefix, keras_files):
    """register_model's promote=true: no comparison, but the pointer it replaces is the one it read."""
    models = s3_prefix + "/models/"
    meta = {"input_shape": [28, 28, 1], "label_names": LABEL_NAMES, "metrics": {"test_accuracy": 0.5}}
    first = registry.write_version(models, "photos", model_path=keras_files[0], metadata=meta)
    second = registry.write_version(models, "photos", model_path=keras_files[1], metadata=meta)
    assert registry.make_champion(models, "photos", first, reason="asked").promoted

    seen_etags = []
    real_set = registry.set_champion

    def set_after_a_concurrent_move(models_uri, name, pointer, s3=None, **conditions):
        # Another writer moves the champion between our read and our write, once.
        if not seen_etags:
            seen_etags.append(conditions.get("if_match"))
            real_set(models_uri, name, registry.champion_pointer(first, promoted_over=None))
        return real_set(models_uri, name, pointer, s3, **conditions)

    registry.set_champion = set_after_a_concurrent_move
    try:
        decision = registry.make_champion(models, "photos", second, reason="asked")
    finally:
        registry.set_champion = real_set
    assert decision.promoted
    assert decision.attempts == 2
    assert registry.read_champion(models, "photos")["version"] == second["version"]
    again = registry.make_champion(models, "photos", second, reason="asked")
    assert not again.promoted
    assert again.reason == "already the champion"


# ---------------------------------------------------------------------------------------------
# The decision of one compare-and-swap round (pure)
# ---------------------------------------------------------------------------------------------


def test_decide_promotion_compares_replaces_and_says_why():
    decide, rule = registry.decide_promotion, registry.PromotionRule("test_accuracy", 0.01)
    champion = {"version": 3}
    assert decide(4, None, rule, new_score=0.5) == registry.Verdict(True, "no champion yet")
    assert decide(3, champion, rule, new_score=0.5) == registry.Verdict(False, "already the champion", 0.5)
    assert not registry.needs_champion_score(3, champion, rule)
    assert registry.needs_champion_score(4, champion, rule)
    better = decide(4, champion, rule, new_score=0.95, scored=(0.9, "recorded"))
    assert better.replace
    assert better.champion_score == 0.9
    assert "beats champion v3 0.90000 (recorded" in better.reason
    assert not decide(4, champion, rule, new_score=0.905, scored=(0.9, "recorded")).replace  # within min_improvement
    loss = registry.PromotionRule("test_loss", 0.0)
    assert decide(4, champion, loss, new_score=0.1, scored=(0.2, "recorded")).replace
    refused = decide(4, champion, rule, new_score=0.99, scored=(None, "another test split"))
    assert refused == registry.Verdict(False, "not compared with champion v3: another test split")
    replace = registry.PromotionRule(replace="asked")
    assert not registry.needs_champion_score(4, champion, replace)
    assert decide(4, champion, replace) == registry.Verdict(True, "asked")
    assert decide(3, champion, replace) == registry.Verdict(False, "already the champion")
    with pytest.raises(ValueError, match="needs its score"):
        decide(4, champion, rule, new_score=0.5)


# ---------------------------------------------------------------------------------------------
# Retries adopt finished work (issue 15, point 8)
# ---------------------------------------------------------------------------------------------


def zombie_publishes_first(
    models: str, zombie_file: str, retry_file: str, retry_metadata: dict, after_zombie: Callable[[dict], None] = lambda published: None
) -> dict[str, object]:
    """The zombie checks its claim (still its own) and stalls; the retry takes the claim over,
    writes its artifacts and checks the claim too; then the zombie publishes, then the retry goes on.

    Returns:
        Each export's metadata, or the error it raised.
    """
    zombie_checked, retry_checked, zombie_published = threading.Event(), threading.Event(), threading.Event()
    checked: list[str] = []

    def interleave(version: int, claimant: str) -> None:
        checked.append(claimant)
        if len(checked) == 1:  # the zombie: let the retry run up to the same point
            zombie_checked.set()
            assert retry_checked.wait(60)
        else:  # the retry: wait until the zombie's metadata is there
            retry_checked.set()
            assert zombie_published.wait(60)

    def zombie() -> object:
        try:
            published = registry.write_version(models, "digits", model_path=zombie_file, metadata=metadata_for("run-x"))
            after_zombie(published)
            return published
        finally:
            zombie_published.set()

    def retry() -> object:
        assert zombie_checked.wait(60)
        return registry.write_version(models, "digits", model_path=retry_file, metadata=retry_metadata)

    def outcome(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            try:
                return fn()
            except (registry.VersionConflict, registry.ModelIntegrityError) as err:
                return err

        return call

    registry.TEST_HOOKS["claim_checked"] = interleave
    results = run_together({"zombie": outcome(zombie), "retry": outcome(retry)})
    assert len(checked) == 2
    assert checked[0] != checked[1]
    return results


def test_a_retry_adopts_the_version_its_zombie_published_first(s3_prefix, keras_files):
    models = s3_prefix + "/models/"
    results = zombie_publishes_first(models, keras_files[0], keras_files[0], metadata_for("run-x"))
    zombie, retry = results["zombie"], results["retry"]
    assert isinstance(zombie, dict)
    assert retry == zombie
    assert registry.list_versions(models, "digits") == [zombie]
    registry.load_version_model(registry.resolve(models, "digits", 1))


def test_a_retry_adopts_neither_another_request_nor_a_damaged_version(s3_prefix, keras_files):
    other = {**metadata_for("run-x"), "labels": {"kind": "label_map", "sha256": "another map"}}
    results = zombie_publishes_first(s3_prefix + "/a/", keras_files[0], keras_files[1], other)
    assert isinstance(results["zombie"], dict)
    assert isinstance(results["retry"], registry.VersionConflict)
    assert "completed by another export" in str(results["retry"])

    def damage(published: dict) -> None:
        storage.write_bytes(published["model_uri"], b"not the model")

    results = zombie_publishes_first(s3_prefix + "/b/", keras_files[0], keras_files[0], metadata_for("run-x"), damage)
    assert isinstance(results["retry"], registry.ModelIntegrityError)


def test_only_allowlisted_layer_classes_are_loaded(s3_prefix, keras_files, tmp_path):
    import keras

    models = s3_prefix + "/models/"
    ours = registry.write_version(models, "digits", model_path=keras_files[0], metadata=metadata_for("run-1"))
    registry.load_version_model(ours)  # our family loads
    pixels = keras.Input((28, 28, 1))
    x = keras.layers.Lambda(lambda t: t / 255.0)(pixels)
    path = str(tmp_path / "lambda.keras")
    keras.Model(pixels, keras.layers.Dense(10)(keras.layers.Flatten()(x))).save(path)
    bad = registry.write_version(models, "digits", model_path=path, metadata=metadata_for("run-2"))
    with pytest.raises(registry.ModelIntegrityError, match=r"refused to load class keras.layers.Lambda"):
        registry.load_version_model(bad)
