"""The jobs against a misbehaving store: the fault-injecting proxy (:mod:`sparktf_dev.faults`) in front
of the S3 server answers 503 SlowDown, 500 InternalError, resets connections mid-body and adds
latency, with a fixed seed and never three faults in a row for one request.

Every read retries, body included; an image the store keeps failing to serve fails its task
instead of being set aside; deletes the store refuses raise; and runs through faults end exactly
as clean runs do (inference rows; tuning trials and champion decision).
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from sparktf import incoming, job, predictions, storage
from sparktf.jobs import batch_inference, export_model, prepare_data, tune
from sparktf_dev.faults import FaultProxy, FaultRule, route_storage
from sparktf_dev.testing import batch_inference_argv, land_partition, train_tiny_model, upload_mnist
from sparktf_dev.testing import register_trial as register_model

# The shares the issue was reported with: 5 % SlowDown, 2 % InternalError, 5 % resets mid-body.
ISSUE_FAULTS = {"slowdown": 0.05, "internal": 0.02, "reset": 0.05, "latency": 0.03}
PROCESSED_AT = "2026-11-21T02:30:00+00:00"


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint, seed=20261120) as running:
        yield running


def through(proxy: FaultProxy, s3_server, spark=None):
    """Storage calls of this process (and of ``spark``'s Python workers) go through the proxy."""
    return route_storage(proxy.settings(s3_server.settings()), spark)


# ---------------------------------------------------------------------------------------------
# The proxy itself
# ---------------------------------------------------------------------------------------------


def test_the_proxy_never_faults_one_request_three_times_in_a_row(s3_server):
    proxy = FaultProxy(s3_server.endpoint, seed=1, internal=1.0)  # every request would fail
    kinds = [proxy.decide("GET", "/b/k", "", None)[0] for _ in range(7)]
    assert kinds == ["internal", "internal", None, "internal", "internal", None, "internal"]
    assert proxy.decide("GET", "/b/other", "", None)[0] == "internal"  # counted per request


def test_the_proxy_is_deterministic_for_a_seed(s3_server):
    def faults(seed: int) -> list:
        proxy = FaultProxy(s3_server.endpoint, seed=seed, **ISSUE_FAULTS)
        return [proxy.decide("GET", f"/b/key-{i}", "", None)[0] for i in range(400)]

    assert faults(7) == faults(7)
    assert faults(7) != faults(8)
    share = sum(kind in ("slowdown", "internal", "reset") for kind in faults(7)) / 400
    assert 0.06 < share < 0.20  # about the 12 % asked for


def test_every_storage_operation_gets_through_faults(proxy, s3_prefix, s3_server, tmp_path):
    proxy.set_rates(**ISSUE_FAULTS)
    # The random draws depend on the keys (this test's prefix is random): one of each kind for sure.
    proxy.add_rule(FaultRule("slowdown", method="PUT", key=r"objects/000\.bin$", times=1))
    proxy.add_rule(FaultRule("internal", method="GET", key=r"objects/001\.bin$", times=1))
    proxy.add_rule(FaultRule("reset", method="GET", key=r"objects/002\.bin$", times=1))
    payloads = {f"{s3_prefix}/objects/{i:03d}.bin": np.random.default_rng(i).bytes(50_000 + i) for i in range(40)}
    with through(proxy, s3_server):
        for uri, data in payloads.items():
            storage.write_bytes(uri, data)
        assert storage.list_keys(s3_prefix + "/objects/") == sorted(storage.parse_uri(u).key for u in payloads)
        for uri, data in payloads.items():
            assert storage.read_bytes(uri) == data
            assert storage.head(uri)["size"] == len(data)
            assert storage.stream_sha256(uri) == storage.sha256_hex(data)
        first = next(iter(payloads))
        assert storage.download_file(first, str(tmp_path / "copy")) == storage.sha256_hex(payloads[first])
        storage.write_json(s3_prefix + "/doc.json", {"a": 1})
        value, etag = storage.read_json_with_etag(s3_prefix + "/doc.json")
        assert value == {"a": 1}
        assert etag
        storage.copy_object(first, s3_prefix + "/copied.bin")
        assert storage.read_bytes(s3_prefix + "/copied.bin") == payloads[first]
        assert storage.delete_prefix(s3_prefix + "/objects/") == len(payloads)
        assert not storage.has_objects(s3_prefix + "/objects/")
    assert min(proxy.faults[k] for k in ("slowdown", "internal", "reset")) > 0, proxy.faults
    assert proxy.longest_streak <= 2


def test_a_delete_the_store_refuses_raises(proxy, s3_prefix, s3_server):
    storage.write_bytes(s3_prefix + "/kept/a", b"a")
    storage.write_bytes(s3_prefix + "/kept/b", b"b")
    proxy.add_rule(FaultRule("delete_errors", method="POST", query="delete"))
    with through(proxy, s3_server), pytest.raises(storage.StorageError, match=r"could not delete 2 objects .*kept/a: AccessDenied"):
        storage.delete_prefix(s3_prefix + "/kept/")
    assert storage.list_keys(s3_prefix + "/kept/") == [storage.parse_uri(s3_prefix).key + k for k in ("/kept/a", "/kept/b")]


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(bucket, mnist_subset) -> dict:
    ws = f"s3://{bucket}/faults/ws"
    register_model(ws + "/models/", "digits", train_tiny_model(ws + "/scratch", mnist_subset))
    _tx, _ty, test_x, test_y = mnist_subset
    landed = land_partition(ws + "/incoming/", "2026-11-20", test_x[300:420], test_y[300:420])  # 120 + 8 bad
    return {"ws": ws, "landed": landed}


def args(ws: str, date: str, *extra: str):
    return batch_inference.parse_args(
        batch_inference_argv(ws, date, "--batch-size", "32", "--max-keys-per-task", "40", "--fetch-threads", "8", *extra, processed_at=PROCESSED_AT)
    )


def rows_of(partition: str) -> tuple[list, list]:
    scored, errors = predictions.read_predictions(partition)
    return (
        sorted((r["key"], r["predicted_label"], r["score"], str(r["top_k"]), r["model_version"], str(r["processed_at"])) for r in scored),
        sorted((e["key"], e["reason"]) for e in errors),
    )


def test_inference_through_faults_publishes_exactly_the_clean_rows(spark, ws, proxy, s3_server):
    clean = batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "clean"))
    expected = rows_of(clean["output_uri"])
    assert (clean["scored"], clean["set_aside"]) == (120, 8)

    proxy.set_rates(**ISSUE_FAULTS)
    with through(proxy, s3_server, spark):
        faulty = batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "faulty"))
    assert min(proxy.faults[k] for k in ("slowdown", "internal", "reset")) > 0, proxy.faults
    assert (faulty["scored"], faulty["set_aside"], faulty["reasons"]) == (120, 8, clean["reasons"])
    assert "unreadable" not in faulty["reasons"]  # the store's trouble never becomes a bad image
    assert faulty["storage_retries"] > 0  # counted apart from the images set aside
    assert predictions.read_published(faulty["output_uri"])["attempt_id"] == "faulty"
    assert rows_of(faulty["output_uri"]) == expected


def test_an_image_the_store_keeps_failing_fails_the_task_not_the_image(spark, ws, proxy, s3_server):
    partition = f"{ws['ws']}/predictions/digits/2026-11-20/"
    valid = sorted(k for k, v in ws["landed"].items() if "label" in v)
    flaky, refused, dead = valid[0], valid[1], valid[2]
    proxy.add_rule(FaultRule("reset", method="GET", key=f"^{re.escape(flaky)}$", times=4))  # twice, then the retry works
    proxy.add_rule(FaultRule("access_denied", method="GET", key=f"^{re.escape(refused)}$"))  # refused for good: not transient
    with through(proxy, s3_server, spark):
        result = batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "flaky"))
    _scored, errors = predictions.read_predictions(partition)
    assert {e["key"]: e["reason"] for e in errors}[refused] == "unreadable"
    assert flaky not in {e["key"] for e in errors}
    assert result["set_aside"] == 9
    assert proxy.requested[("GET", flaky)] == 5  # four reads cut mid-body, the fifth complete

    published = predictions.read_published(partition)
    reads_before = proxy.requested[("GET", dead)]
    proxy.clear_rules()
    proxy.add_rule(FaultRule("reset", method="GET", key=f"^{re.escape(dead)}$"))  # every read of it is cut
    with through(proxy, s3_server, spark), pytest.raises(Exception, match="TransientStorageError") as failed:
        batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "dead"))
    assert "still failing after 5 attempts" in str(failed.value)
    assert proxy.requested[("GET", dead)] - reads_before == storage.READ_ATTEMPTS  # whole GETs, body included
    assert predictions.read_published(partition) == published  # nothing published, nothing set aside
    assert storage.list_keys(f"{ws['ws']}/predictions/digits/_staging/") == []


def test_a_rerun_whose_clean_up_the_store_refuses_fails_but_leaves_its_partition_readable(spark, ws, proxy, s3_server):
    partition = f"{ws['ws']}/predictions/digits/2026-11-20/"
    previous = predictions.read_published(partition) or batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "before"))
    proxy.add_rule(FaultRule("delete_errors", method="POST", query="delete"))
    with through(proxy, s3_server), pytest.raises(storage.StorageError, match="could not all be removed"):
        batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "no-deletes"))
    manifest = predictions.read_published(partition)
    assert manifest["attempt_id"] == "no-deletes"
    assert manifest["publish_id"] != previous["publish_id"]
    scored, errors = predictions.read_predictions(partition)
    assert (len(scored), len(errors)) == (manifest["scored"], manifest["set_aside"])  # the listed files only
    leftovers = {predictions.publisher_of(k) for k in storage.list_keys(partition)} - {None, manifest["publish_id"]}
    assert leftovers  # the replaced files are still there: loudly, not silently


def test_a_failure_ratio_breach_is_a_final_failure(spark, ws):
    with pytest.raises(job.FinalFailure, match="more than --max-failure-ratio") as breach:
        batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "strict", "--max-failure-ratio", "0.01"))
    assert breach.value.result["published"]
    assert breach.value.result["failure_ratio_exceeded"]


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------


def tuning_run(spark, raw: str, out: str) -> dict:
    prepared = prepare_data.run(spark, prepare_data.parse_args(["--input-uri", raw, "--output-uri", out + "prepared/"]))
    tuned = tune.run(
        spark,
        tune.parse_args(
            [
                "--prepared-uri",
                out + "prepared/",
                "--output-uri",
                out + "tuning/",
                "--model-family",
                "mlp",
                "--epochs",
                "1",
                "--patience",
                "1",
                "--batch-sizes",
                "32",
                "--hidden-units",
                "32",
                "--learning-rates",
                "0.003,0.03",
            ]
        ),
    )
    exported = export_model.run(
        export_model.parse_args(
            [
                "--results-uri",
                out + "tuning/results.json",
                "--models-uri",
                out + "models/",
                "--model-name",
                "digits",
                "--source-run",
                "run-1",
                "--trained-at",
                "2026-11-22T03:00:00+00:00",
            ]
        )
    )
    results = storage.read_json(out + "tuning/results.json")
    return {"prepared": prepared, "tuned": tuned, "exported": exported, "trials": results["trials"]}


def test_tuning_through_faults_ends_with_the_same_trials_and_champion(spark, s3_prefix, mnist_subset, proxy, s3_server):
    raw = s3_prefix + "/raw/"
    upload_mnist(raw, mnist_subset, train_limit=400, test_limit=100)
    clean = tuning_run(spark, raw, s3_prefix + "/clean/")
    # Tuning makes few requests (data, trial artifacts, results): fault many more of them.
    proxy.set_rates(slowdown=0.15, internal=0.1, reset=0.15, latency=0.05)
    with through(proxy, s3_server, spark):
        faulty = tuning_run(spark, raw, s3_prefix + "/faulty/")
    assert min(proxy.faults[k] for k in ("slowdown", "internal", "reset")) > 0, proxy.faults

    assert faulty["prepared"]["content_sha256"] == clean["prepared"]["content_sha256"]
    assert faulty["prepared"]["counts"] == clean["prepared"]["counts"]

    def trials(run: dict) -> list:
        return [(t["trial_id"], t["params"], t["status"]) for t in run["trials"]]

    assert trials(faulty) == trials(clean)
    assert len(trials(clean)) == 2
    for got, want in zip(faulty["trials"], clean["trials"]):
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-6)
    assert faulty["tuned"]["best"] == clean["tuned"]["best"]
    for key in ("version", "trial_id", "promoted", "promotion_reason", "champion_version"):
        assert faulty["exported"][key] == clean["exported"][key], key


def test_production_code_never_imports_the_proxy():
    import ast
    from pathlib import Path

    import sparktf
    from sparktf.airflow.spark_job_operator import package_zip

    package = Path(sparktf.__file__).parent
    for path in package.rglob("*.py"):
        if path.name in ("faults.py", "testing.py"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {
            f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module for alias in node.names
        }
        assert not {name for name in imported if "faults" in name.split(".")}, path
    import zipfile

    with zipfile.ZipFile(package_zip()[0]) as archive:
        assert not any(name.startswith("sparktf_dev/") for name in archive.namelist())  # the harness is not shipped
        assert "sparktf/storage.py" in archive.namelist()


@pytest.mark.parametrize("condition", ["create", "replace"])
def test_a_conditional_write_whose_answer_was_lost_is_recognised_as_done(proxy, s3_prefix, s3_server, condition):
    uri = s3_prefix + "/pointer.json"
    conditions = {"if_none_match": True}
    if condition == "replace":
        conditions = {"if_match": storage.write_json(uri, {"version": 1})}
    # The store writes the object, then the connection breaks before the answer arrives: the
    # client sends the PUT again, which the condition refuses (the object is there / changed).
    proxy.add_rule(FaultRule("reset", method="PUT", key="pointer.json$", times=1))
    with through(proxy, s3_server):
        etag = storage.write_json(uri, {"version": 2, "by": "me"}, **conditions)
    assert proxy.faults["reset"] == 1
    assert proxy.requested[("PUT", storage.parse_uri(uri).key)] >= 2
    value, current = storage.read_json_with_etag(uri)
    assert value == {"version": 2, "by": "me"}
    assert current == etag
    # Someone else's write is still a conflict.
    with pytest.raises(storage.PreconditionFailed):
        storage.write_json(uri, {"version": 3, "by": "other"}, **conditions)


@pytest.mark.parametrize("condition", ["create", "replace"])
def test_a_conditional_write_the_store_asks_to_resend_is_not_a_lost_race(proxy, s3_prefix, s3_server, condition):
    """409 ConditionalRequestConflict means another conditional write to the key was in flight
    (S3: "retry the request"), not that the condition failed: the write is sent again and wins."""
    uri = s3_prefix + "/conflicted.json"
    conditions = {"if_none_match": True}
    if condition == "replace":
        conditions = {"if_match": storage.write_json(uri, {"version": 1})}
    proxy.add_rule(FaultRule("conflict", method="PUT", key="conflicted.json$", times=2))
    with through(proxy, s3_server):
        etag = storage.write_json(uri, {"version": 2, "by": "me"}, **conditions)
    assert proxy.faults["conflict"] == 2
    assert proxy.requested[("PUT", storage.parse_uri(uri).key)] == 3
    assert storage.read_json_with_etag(uri) == ({"version": 2, "by": "me"}, etag)


# ---------------------------------------------------------------------------------------------
# Errors that blame the caller, not the object
# ---------------------------------------------------------------------------------------------


def client_error(code: str, message: str = "", status: int = 403):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("ExpiredToken", "The provided token has expired."),
        ("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
        ("SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."),
        ("InvalidToken", "The provided token is malformed or otherwise invalid."),
        ("TokenRefreshRequired", "The provided token must be refreshed."),
        ("AccountProblem", "There is a problem with your AWS account."),
        ("AllAccessDisabled", "All access to this Amazon S3 resource has been disabled."),
        ("NoSuchBucket", "The specified bucket does not exist"),
        ("KMS.DisabledException", "arn:aws:kms:...:key/... is disabled."),
        ("KMS.NotFoundException", "Invalid keyId"),
        ("AccessDenied", "User: arn:aws:iam::1:user/x is not authorized to perform: kms:Decrypt on resource: arn:aws:kms:..."),
    ],
)
def test_errors_that_blame_the_caller_are_told_from_those_about_one_object(code, message):
    assert storage.is_caller_refused(client_error(code, message))


@pytest.mark.parametrize("code", ["AccessDenied", "NoSuchKey", "InvalidObjectState", "SlowDown", "InternalError"])
def test_errors_about_one_object_or_a_busy_store_do_not_blame_the_caller(code):
    assert not storage.is_caller_refused(client_error(code, "Access Denied" if code == "AccessDenied" else ""))


def test_missing_credentials_blame_the_caller():
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    assert storage.is_caller_refused(NoCredentialsError())
    assert storage.is_caller_refused(PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"))


def test_credentials_that_expire_part_way_fail_the_rerun_and_keep_the_published_partition(spark, ws, proxy, s3_server):
    partition = f"{ws['ws']}/predictions/digits/2026-11-20/"
    published = predictions.read_published(partition) or batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "before"))
    published = predictions.read_published(partition)
    rows = rows_of(partition)
    incoming = storage.parse_uri(ws["ws"] + "/incoming/2026-11-20/").key
    # The first 80 reads of images get through; from then on the store says the token expired (a
    # 60 % run would pass the shrink guard and be published over the complete partition).
    proxy.add_rule(
        FaultRule(
            "error", method="GET", key=f"^{re.escape(incoming)}", after=80, code="ExpiredToken", status=400, message="The provided token has expired."
        )
    )
    with through(proxy, s3_server, spark), pytest.raises(Exception, match="CallerRefused") as failed:
        batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "expired"))
    assert proxy.faults["error"] > 0
    assert "ExpiredToken" in str(failed.value)
    assert predictions.read_published(partition) == published
    assert rows_of(partition) == rows
    staged = storage.list_keys(f"{ws['ws']}/predictions/digits/_staging/2026-11-20/")
    assert not [key for key in staged if "/expired-" in key]  # this attempt left nothing staged


def test_a_task_still_writing_when_the_job_fails_leaves_nothing_staged(spark, ws, proxy, s3_server):
    """One task fails (the store refuses one of its images) while the other's staged part is
    still on its way to the store: the clean-up of the failed attempt waits for that task."""
    import threading

    keys = [o["key"] for o in incoming.scan_partition(ws["ws"] + "/incoming/", "2026-11-20")[0]]
    refused_key = incoming.assign_keys(keys, 2)[0][0]  # one of the first task's images
    part_held, part_released = threading.Event(), threading.Event()
    expired = {"code": "ExpiredToken", "status": 400, "message": "The provided token has expired."}
    # The first task's image is held until the second task's part is held too, then refused.
    proxy.add_rule(FaultRule("hold", method="GET", key=f"{re.escape(refused_key)}$", released=part_held, hold_timeout=60, **expired))
    proxy.add_rule(FaultRule("hold", method="PUT", key=r"_staging/2026-11-20/late-[^/]*/part-", released=part_released, hold_timeout=60))

    def step_through():
        deadline = time.monotonic() + 60
        while proxy.faults["hold"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        deletes = proxy.requested[("POST", "")]
        part_held.set()  # the refusal fails the job now
        # An unguarded clean-up deletes the staging at once (a DeleteObjects); a guarded one waits
        # for the held task, so it gets a second (Spark kills a task's Python worker after 2 s).
        waited = time.monotonic() + 1.0
        while proxy.requested[("POST", "")] == deletes and time.monotonic() < waited:
            time.sleep(0.02)
        part_released.set()

    stepper = threading.Thread(target=step_through, daemon=True)
    stepper.start()
    with through(proxy, s3_server, spark), pytest.raises(Exception, match="ExpiredToken"):
        batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "late", "--max-keys-per-task", "64"))
    stepper.join(timeout=60)
    assert proxy.faults["hold"] == 2  # both held: the refused image and the other task's part
    staged = storage.list_keys(f"{ws['ws']}/predictions/digits/_staging/2026-11-20/")
    assert not [key for key in staged if "/late-" in key]


# ---------------------------------------------------------------------------------------------
# A store that does not keep conditional writes
# ---------------------------------------------------------------------------------------------


def test_a_store_that_ignores_conditional_writes_is_refused_by_name(spark, ws, s3_server, s3_prefix):
    partition = f"{ws['ws']}/predictions/digits/2026-11-20/"
    published = predictions.read_published(partition) or batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "before"))
    published = predictions.read_published(partition)
    with FaultProxy(s3_server.endpoint, ignore_conditions=True) as ignoring:
        with through(ignoring, s3_server):
            with pytest.raises(storage.ConditionalWritesIgnored, match=re.escape(ignoring.endpoint)):
                storage.write_json(s3_prefix + "/claim.json", {"by": "me"}, if_none_match=True)
            assert not storage.has_objects(s3_prefix + "/claim.json")  # nothing written unconditionally
        with through(ignoring, s3_server, spark), pytest.raises(storage.ConditionalWritesIgnored, match="If-None-Match"):
            batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "ignored"))
    assert predictions.read_published(partition) == published


def test_the_store_is_checked_once_per_endpoint_and_workspace(proxy, s3_server, s3_prefix):
    assert storage.probe_key("ws/a/models/m/champion.json") == "ws/a/runs/_store-check/conditional-writes"
    assert storage.probe_key("top.json") == storage.probe_key("x/top.json") == storage.PROBE_KEY
    probe = (storage.parse_uri(s3_prefix).bucket, storage.probe_key(storage.parse_uri(s3_prefix + "/one.json").key))
    with through(proxy, s3_server):
        storage.write_json(s3_prefix + "/one.json", {"n": 1}, if_none_match=True)
        etag = storage.write_json(s3_prefix + "/two.json", {"n": 2}, if_none_match=True)
        storage.write_json(s3_prefix + "/two.json", {"n": 3}, if_match=etag)
    assert proxy.requested[("PUT", probe[1])] == 4  # one probe: the object, two refusals, its own ETag


def test_weak_etags_do_not_break_a_swap(spark, ws, s3_server, s3_prefix):
    with FaultProxy(s3_server.endpoint, weak_etags=True) as weak:
        with through(weak, s3_server):
            uri = s3_prefix + "/weak.json"
            first = storage.write_json(uri, {"n": 1}, if_none_match=True)
            value, etag = storage.read_json_with_etag(uri)
            assert value == {"n": 1}
            assert etag == first
            assert not etag.startswith("W/")
            storage.write_json(uri, {"n": 2}, if_match=etag)
            storage.write_json(uri, {"n": 3}, if_match=f'W/"{storage.head(uri)["etag"]}"')
            with pytest.raises(storage.PreconditionFailed):
                storage.write_json(uri, {"n": 4}, if_match=etag)
        with through(weak, s3_server, spark):
            result = batch_inference.run(spark, args(ws["ws"], "2026-11-20", "--attempt-id", "weak-etags"))
    assert predictions.read_published(result["output_uri"])["attempt_id"] == "weak-etags"


def test_etags_are_compared_without_quotes_or_weak_markers():
    assert storage.normal_etag('W/"abc"') == storage.normal_etag('"abc"') == storage.normal_etag("abc") == "abc"
    assert storage.normal_etag(None) == ""
