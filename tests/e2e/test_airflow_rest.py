"""A real Airflow, started as scripts/ui.py starts it (api-server, scheduler, dag-processor,
triggerer on 127.0.0.1, no log servers), driven through the REST API the UI uses: unpause, trigger
with a conf of Params, poll, read XComs, run notes, the figure, task logs and links, backfill,
refusals.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sparktf.airflow.local_ui import LocalAirflow
from sparktf_dev.testing import TEST_SECRET_KEY, free_port

pytestmark = pytest.mark.e2e
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
REST_WORKSPACE = "rest/ws"
# Backfill of three nightly runs (run_after 02:30 UTC); each scores the UTC day its data interval starts on.
BACKFILL_RUNS = {"2026-11-10T02:30:00+00:00": "2026-11-09", "2026-11-11T02:30:00+00:00": "2026-11-10", "2026-11-12T02:30:00+00:00": "2026-11-11"}


class AirflowServer:
    """The local Airflow UI as ``scripts/ui.py`` starts it (sparktf.airflow.local_ui: api-server,
    scheduler, dag-processor and triggerer on 127.0.0.1, no log servers), driven through REST."""

    def __init__(self, base_env: dict[str, str], home: Path) -> None:
        self.home = home
        self.ui = LocalAirflow(
            home,
            free_port(),
            env={**base_env, "AIRFLOW_HOME": str(home)},
            settings={
                # Its own metadata DB (AIRFLOW_HOME above): this is a separate deployment (its Asset URIs
                # and defaults differ from the dag.test() runs of other test modules).
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            },
        )
        self.port, self.base = self.ui.port, self.ui.base_url

    def start(self) -> None:
        self.ui.start(timeout=300)

    def stop(self) -> None:
        self.ui.stop()

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json", "Accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            payload = err.read()
            try:
                return err.code, json.loads(payload)
            except ValueError:
                return err.code, {"detail": payload.decode(errors="replace")}

    def get(self, path: str) -> dict:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def wait_for(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, AssertionError, KeyError) as err:
                last_error = err
            time.sleep(2)
        raise TimeoutError(f"{what} not ready within {timeout} s (last: {last_error}); logs in {self.home}")

    def wait_for_dag(self, dag_id: str) -> None:
        self.wait_for(lambda: self.request("GET", f"/api/v2/dags/{dag_id}")[0] == 200, f"DAG {dag_id}", 180)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 1200) -> dict:
        state: dict = {}

        def finished() -> bool:
            state.update(self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))
            return state["state"] in ("success", "failed")

        self.wait_for(finished, f"run {run_id}", timeout)
        return state

    def task_log(self, dag_id: str, run_id: str, task_id: str) -> str:
        """A task's log as the UI shows it (the api-server reads it from the worker's log file)."""
        ti = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        body = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{ti['try_number']}?full_content=true")
        return "\n".join(line.get("event", "") if isinstance(line, dict) else str(line) for line in body["content"])

    def fetch(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        """A GET as a browser would send it: status, content type and body."""
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read()

    def task_state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")["state"]

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        body = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
        value = body["value"]
        return json.loads(value) if isinstance(value, str) else value


@pytest.fixture(scope="module")
def airflow_server(airflow_env, bucket, tmp_path_factory):
    # The deployment's defaults, as an operator would set them for the Airflow services: runs that
    # carry no conf (scheduled runs, backfills) use this workspace and model name.
    env = {**airflow_env, "SPARKTF_WORKSPACE_URI": f"s3://{bucket}/{REST_WORKSPACE}", "SPARKTF_MODEL_NAME": "digits"}
    # A late night's notifier, as a team points it at its own: print() shows its facts in the triggerer's log.
    env["SPARKTF_LATE_NIGHT_NOTIFIER"] = "builtins.print"
    server = AirflowServer(env, tmp_path_factory.mktemp("airflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_mnist(bucket, mnist_subset) -> str:
    from sparktf_dev.testing import upload_mnist

    prefix = f"s3://{bucket}/rest/raw"
    upload_mnist(prefix, mnist_subset, train_limit=400, test_limit=100)
    return prefix + "/"


def test_invalid_param_is_refused_with_a_clear_message(airflow_server):
    airflow_server.wait_for_dag("tuning_pipeline")
    # Compared with the runs before, so the check holds whatever ran on this server first.
    runs_before = airflow_server.get("/api/v2/dags/tuning_pipeline/dagRuns")["total_entries"]
    status, body = airflow_server.request(
        "POST", "/api/v2/dags/tuning_pipeline/dagRuns", {"logical_date": None, "conf": {"learning_rates": [0.01, 0]}}
    )
    assert status == 400, body
    assert "learning_rates" in json.dumps(body) or "exclusiveMinimum" in json.dumps(body)
    runs_after = airflow_server.get("/api/v2/dags/tuning_pipeline/dagRuns")["total_entries"]
    assert runs_after == runs_before  # nothing was started


@pytest.fixture(scope="module")
def tuning_run(airflow_server, tiny_mnist, bucket) -> str:
    """The tuning DAG unpaused and triggered with a conf of Params, as the UI's trigger form does."""
    airflow_server.wait_for_dag("tuning_pipeline")
    status, body = airflow_server.request("PATCH", "/api/v2/dags/tuning_pipeline", {"is_paused": False})
    assert status == 200
    assert body["is_paused"] is False
    conf = {
        "dataset_uri": tiny_mnist,
        "workspace_uri": f"s3://{bucket}/{REST_WORKSPACE}",
        "model_name": "digits",
        "learning_rates": [0.001, 0.003],
        "hidden_units": [32],
        "epochs": 1,
        "batch_sizes": [32],
        "model_family": "mlp",
    }
    status, run = airflow_server.request("POST", "/api/v2/dags/tuning_pipeline/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, run
    return run["dag_run_id"]


def test_trigger_tuning_with_params_and_read_xcoms(airflow_server, tuning_run):
    final = airflow_server.wait_for_run("tuning_pipeline", tuning_run)
    assert final["state"] == "success", final
    prepared = airflow_server.xcom("tuning_pipeline", tuning_run, "prepare_data")
    tuned = airflow_server.xcom("tuning_pipeline", tuning_run, "tune")
    exported = airflow_server.xcom("tuning_pipeline", tuning_run, "export_best_model")
    assert prepared["counts"]["test"] == 100
    assert tuned["trials"] == 2
    assert tuned["succeeded"] == 2
    assert exported["version"] == 1
    assert exported["promoted"] is True
    assert TEST_SECRET_KEY not in json.dumps([prepared, tuned, exported])


def test_tuning_run_explains_itself_on_its_run_page(airflow_server, tuning_run):
    """The run's note (set as the run ended, by the plugin's listener in the scheduler) shows the
    leaderboard, the default-vs-tuned answer, the champion decision and the figure, which the
    plugin serves behind Airflow's login."""
    assert airflow_server.wait_for_run("tuning_pipeline", tuning_run)["state"] == "success"
    note = airflow_server.get(f"/api/v2/dags/tuning_pipeline/dagRuns/{tuning_run}")["note"]
    tuned = airflow_server.xcom("tuning_pipeline", tuning_run, "tune")
    assert note.startswith("<!-- sparktf run note -->")
    assert len(note) <= 1000
    assert "**Tuning run succeeded**: 2 of 2 trials trained; selected by validation accuracy." in note
    assert "| # | lr | val % | test % | epochs | s |" in note  # only what varies gets a column
    for row in tuned["leaderboard"]:
        assert (
            f"| {row['rank']} | {row['learning_rate']:g} | {100 * row['val_accuracy']:.2f} | "
            f"{100 * row['test_accuracy']:.2f} | {row['epochs_run']} | {row['train_seconds']:.0f} |"
        ) in note
    assert "Every trial: hidden 32, batch 32, dropout 0.5." in note
    # mlp with 32 hidden units: the reference network (mnist_cnn defaults, 1024 units) was not trained.
    assert "the reference network (mnist_cnn, lr 0.001, hidden 1024" in note
    assert "is not in this run's grid" in note
    assert "**Champion:** `digits` v1 **promoted to champion**: no champion yet." in note
    figure = re.search(r"\[!\[test error vs learning rate\]\((/sparktf/figure/[^)]+)\)\]\(\1\)", note)
    assert figure, note
    status, content_type, body = airflow_server.fetch(figure.group(1))
    assert (status, content_type) == (200, "image/png")
    assert body.startswith(b"\x89PNG\r\n\x1a\n")
    # The same bytes as the object in the bucket, read on the server with the aws_default connection.
    from sparktf import storage

    assert body == storage.read_bytes(tuned["figure_uri"])
    # Behind Airflow's auth: a forged token is refused (the all-admins test server accepts no token at all).
    status, _type, _body = airflow_server.fetch(figure.group(1), {"Authorization": "Bearer not-a-token"})
    assert status in (401, 403)
    assert TEST_SECRET_KEY not in note


def test_task_logs_show_progress_and_the_spark_ui(airflow_server, tuning_run):
    """Logs of tasks the scheduler ran (LocalExecutor, no log server) read through the api-server:
    one progress line per finished trial from the tune job's driver, and the Spark UI link."""
    assert airflow_server.wait_for_run("tuning_pipeline", tuning_run)["state"] == "success"
    log = airflow_server.task_log("tuning_pipeline", tuning_run, "tune")
    progress = [line for line in log.splitlines() if "tuning progress: trial" in line]
    assert len(progress) == 2, log[-4000:]
    for k, line in enumerate(progress, 1):
        assert f"trial {k}/2 done (lr 0.00" in line
        assert "hidden 32, batch 32, dropout 0.5): val_accuracy 0." in line
        assert re.search(r"val_accuracy 0\.\d{4}, \d+\.\d s \[trial-[0-9a-f]+\]", line), line
    ui = re.search(r"Spark UI of application (\S+): (http://\S+)", log)
    assert ui, log[-4000:]
    # The link was published while the job ran (before its first trial ended), not only at the end.
    published = log.index(f"Spark UI (task link 'Spark UI' while the job runs): {ui.group(2)}")
    assert published < log.index("tuning progress: trial 1/2")
    assert "could not publish the Spark UI link" not in log
    links = airflow_server.get(f"/api/v2/dags/tuning_pipeline/dagRuns/{tuning_run}/taskInstances/tune/links")
    assert links["extra_links"]["Spark UI"] == ui.group(2)
    report = airflow_server.task_log("tuning_pipeline", tuning_run, "report")
    assert "**Tuning run succeeded**" in report  # the note is in the report task's log too
    assert "--- Logging error ---" not in log + report
    assert TEST_SECRET_KEY not in log + report


def test_ui_listens_on_loopback_only(airflow_server, tuning_run):
    """After runs it scheduled: every listening socket of the four components' process groups."""
    assert airflow_server.wait_for_run("tuning_pipeline", tuning_run)["state"] == "success"
    sockets = airflow_server.ui.listening_sockets()
    assert ("api-server", "127.0.0.1", airflow_server.port) in {s[:3] for s in sockets}
    assert {address for _name, address, _port, _pid in sockets} <= LOOPBACK, sockets


def test_backfill_of_three_nights_through_the_api(airflow_server, tuning_run, bucket, mnist_subset):
    """A backfill created through the API (as the UI's backfill dialog does) over three past nights,
    scored with the champion the tuning run above exported: three runs, three partitions."""
    from sparktf import predictions
    from sparktf_dev.testing import land_partition

    assert airflow_server.wait_for_run("tuning_pipeline", tuning_run)["state"] == "success"
    workspace = f"s3://{bucket}/{REST_WORKSPACE}"
    _tx, _ty, test_x, test_y = mnist_subset
    landed = {}
    for n, date in enumerate(BACKFILL_RUNS.values()):
        count = 6 + 2 * n  # a different number per day, so a mixed-up partition shows
        land_partition(workspace + "/incoming/", date, test_x[300 + 10 * n :][:count], test_y[300 + 10 * n :][:count], with_bad=False)
        landed[date] = count
    airflow_server.wait_for_dag("nightly_inference")
    # No dag_run_conf: a backfill's inputs come from each run's data interval and the deployment's defaults.
    request = {"dag_id": "nightly_inference", "from_date": "2026-11-10T00:00:00Z", "to_date": "2026-11-12T23:00:00Z", "max_active_runs": 2}
    for _attempt in range(10):
        status, backfill = airflow_server.request("POST", "/api/v2/backfills", request)
        if status != 503:  # SQLite only: "Database is locked ... under concurrent access"; retryable
            break
        time.sleep(3)
    assert status == 200, backfill
    # Running runs of a paused DAG are not scheduled: unpause, as the UI offers with a backfill.
    status, body = airflow_server.request("PATCH", "/api/v2/dags/nightly_inference", {"is_paused": False})
    assert status == 200
    assert body["is_paused"] is False
    runs: list[dict] = []

    def backfill_finished() -> bool:
        listing = airflow_server.get("/api/v2/dags/nightly_inference/dagRuns?run_type=backfill&limit=50")
        runs[:] = listing["dag_runs"]  # this server's only backfill
        return len(runs) == 3 and all(r["state"] in ("success", "failed") for r in runs)

    airflow_server.wait_for(backfill_finished, "backfill of nightly_inference", 1200)

    def utc(stamp: str) -> str:
        return stamp.replace("Z", "+00:00")

    assert sorted(utc(r["run_after"]) for r in runs) == sorted(BACKFILL_RUNS), runs
    assert [r["state"] for r in runs] == ["success"] * 3, runs
    for run in runs:
        date = BACKFILL_RUNS[utc(run["run_after"])]
        assert utc(run["data_interval_start"]).startswith(date + "T02:30")
        found = airflow_server.xcom("nightly_inference", run["dag_run_id"], "find_new_images")
        published = airflow_server.xcom("nightly_inference", run["dag_run_id"], "publish")
        assert (found["date"], found["date_from"]) == (date, "data_interval")
        assert published["date"] == date
        assert published["model_version"] == 1
        assert (published["scored"], published["set_aside"]) == (landed[date], 0)
        assert published["output_uri"] == f"{workspace}/predictions/digits/{date}/"
        rows, errors = predictions.read_predictions(published["output_uri"])
        assert len({r["key"] for r in rows}) == len(rows) == landed[date]
        assert errors == []
        assert all(r["key"].startswith(f"{REST_WORKSPACE}/incoming/{date}/") for r in rows)
        assert TEST_SECRET_KEY not in json.dumps([found, published])
        # Each night's note: counts, reasons, label histogram, model version; its log: per-task progress.
        note = airflow_server.get(f"/api/v2/dags/nightly_inference/dagRuns/{run['dag_run_id']}")["note"]
        assert f"**Nightly inference succeeded: {date}**" in note
        assert f"**{landed[date]} scored**, **0 set aside** of {landed[date]} images, with model `digits` v1." in note
        labels = published["label_histogram"]
        assert "| images | " + " | ".join(str(n) for n in labels.values()) + " |" in note
        assert sum(labels.values()) == landed[date]
        log = airflow_server.task_log("nightly_inference", run["dag_run_id"], "batch_inference")
        tasks = [line for line in log.splitlines() if "inference progress: task" in line]
        assert len(tasks) == published["tasks"], log[-4000:]
        assert f"{published['tasks']}/{published['tasks']} tasks, {landed[date]}/{landed[date]} images" in tasks[-1]


# ---------------------------------------------------------------------------------------------
# Approval before promotion (tuning Param promotion = approve), answered through the REST API
# ---------------------------------------------------------------------------------------------

APPROVAL_MODEL = "digits-approved"


def trigger_for_approval(server: AirflowServer, tiny_mnist: str, bucket: str, **conf) -> str:
    """A one-trial tuning run with promotion approve; waits until its approval task waits for a person."""
    server.wait_for_dag("tuning_pipeline")
    status, _body = server.request("PATCH", "/api/v2/dags/tuning_pipeline", {"is_paused": False})
    assert status == 200
    conf = {
        "dataset_uri": tiny_mnist,
        "workspace_uri": f"s3://{bucket}/{REST_WORKSPACE}",
        "model_name": APPROVAL_MODEL,
        "learning_rates": [0.003],
        "hidden_units": [32],
        "epochs": 1,
        "batch_sizes": [32],
        "model_family": "mlp",
        "promotion": "approve",
        **conf,
    }
    status, run = server.request("POST", "/api/v2/dags/tuning_pipeline/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, run
    run_id = run["dag_run_id"]

    def waiting() -> bool:
        state = server.task_state("tuning_pipeline", run_id, "approve_promotion")
        assert state not in ("skipped", "failed", "upstream_failed"), state
        return state == "awaiting_input"

    server.wait_for(waiting, f"approve_promotion of {run_id} waiting for a person", 1200)
    # Airflow 3.3 race: an answer given before the scheduler has processed the parking process's
    # exit finds the resumed task "queued", and the late exit event marks it up_for_retry. A person
    # cannot answer that fast; the test waits for the scheduler's record of the parked attempt.
    parked = f"TaskInstance Finished: dag_id=tuning_pipeline, task_id=approve_promotion, run_id={run_id},"
    log_file = server.home / "airflow-scheduler.log"
    server.wait_for(
        lambda: any(parked in line and "state=awaiting_input" in line for line in log_file.read_text(errors="replace").splitlines()),
        "the scheduler's record of the parked approval",
        120,
    )
    return run_id


def answer(server: AirflowServer, run_id: str, option: str) -> dict:
    """Answer the approval as the UI's Required Actions page does (PATCH .../hitlDetails)."""
    path = f"/api/v2/dags/tuning_pipeline/dagRuns/{run_id}/taskInstances/approve_promotion/-1/hitlDetails"
    detail = server.get(path)
    status, body = server.request("PATCH", path, {"chosen_options": [option]})
    assert status == 200, body
    return detail


@pytest.fixture(scope="module")
def approved_run(airflow_server, tiny_mnist, bucket) -> tuple[str, dict]:
    """No champion yet: the version would become it, so a person is asked, and approves."""
    run_id = trigger_for_approval(airflow_server, tiny_mnist, bucket)
    from sparktf import registry

    assert registry.read_champion(f"s3://{bucket}/{REST_WORKSPACE}/models/", APPROVAL_MODEL) is None  # not moved before the answer
    detail = answer(airflow_server, run_id, "Approve")
    assert airflow_server.wait_for_run("tuning_pipeline", run_id)["state"] == "success"
    return run_id, detail


def test_an_approved_version_becomes_champion(airflow_server, approved_run, bucket):
    from sparktf import registry

    run_id, detail = approved_run
    assert detail["options"] == ["Approve", "Reject"]
    assert detail["subject"] == f"Make {APPROVAL_MODEL} v1 the champion?"
    body = detail["body"]
    assert "would become the champion: no champion yet." in body
    assert "| # | lr | hidden | val % | test % | epochs | s |" in body  # the leaderboard
    assert "[Figure: test error vs learning rate](/sparktf/figure/tuning_pipeline/" in body
    exported = airflow_server.xcom("tuning_pipeline", run_id, "export_best_model")
    assert (exported["awaiting_approval"], exported["promoted"]) == (True, False)
    final = airflow_server.xcom("tuning_pipeline", run_id, "promote_approved")
    assert final["promoted"] is True
    assert final["promotion_reason"].startswith("approved by ")
    assert final["promotion_reason"].endswith("; no champion yet")
    champion = registry.read_champion(f"s3://{bucket}/{REST_WORKSPACE}/models/", APPROVAL_MODEL)
    assert (champion["version"], champion["source_run"]) == (1, run_id)
    assert champion["approved_by"] == final["approval"]["responded_by"]
    note = airflow_server.get(f"/api/v2/dags/tuning_pipeline/dagRuns/{run_id}")["note"]
    assert f"`{APPROVAL_MODEL}` v1 **promoted to champion**: approved by " in note


def test_a_rejected_version_stays_registered_and_the_champion_stays(airflow_server, approved_run, tiny_mnist, bucket):
    from sparktf import registry

    # champion_policy replace: v2 would replace v1 without comparing, so a person is asked; and rejects.
    run_id = trigger_for_approval(airflow_server, tiny_mnist, bucket, champion_policy="replace")
    answer(airflow_server, run_id, "Reject")
    assert airflow_server.wait_for_run("tuning_pipeline", run_id)["state"] == "success"
    final = airflow_server.xcom("tuning_pipeline", run_id, "promote_approved")
    assert (final["version"], final["promoted"], final["champion_version"]) == (2, False, 1)
    assert final["promotion_reason"].startswith("rejected by ")
    assert "v2 stays registered, not champion (it would have been: champion_policy 'replace'" in final["promotion_reason"]
    models = f"s3://{bucket}/{REST_WORKSPACE}/models/"
    assert registry.read_champion(models, APPROVAL_MODEL)["version"] == 1
    assert [m["version"] for m in registry.list_versions(models, APPROVAL_MODEL)] == [1, 2]
    note = airflow_server.get(f"/api/v2/dags/tuning_pipeline/dagRuns/{run_id}")["note"]
    assert f"`{APPROVAL_MODEL}` v2 **not promoted** (champion stays v1): rejected by " in note


def test_no_answer_in_time_counts_as_reject(airflow_server, approved_run, tiny_mnist, bucket):
    """approval_timeout_hours 0.01 (36 s): nobody answers, the scheduler applies the default, Reject."""
    from sparktf import registry

    run_id = trigger_for_approval(airflow_server, tiny_mnist, bucket, champion_policy="replace", approval_timeout_hours=0.01)
    assert airflow_server.wait_for_run("tuning_pipeline", run_id, timeout=300)["state"] == "success"
    final = airflow_server.xcom("tuning_pipeline", run_id, "promote_approved")
    assert (final["promoted"], final["approval"]["timed_out"], final["approval"]["responded_by"]) == (False, True, None)
    assert final["promotion_reason"].startswith(f"no answer within 0.01 h (counted as Reject): v{final['version']} stays registered, not champion")
    assert registry.read_champion(f"s3://{bucket}/{REST_WORKSPACE}/models/", APPROVAL_MODEL)["version"] == 1


# ---------------------------------------------------------------------------------------------
# A late night: the nightly deadline alert, fired by the scheduler, called in the triggerer
# ---------------------------------------------------------------------------------------------


def test_a_night_past_its_deadline_logs_one_late_line_and_calls_the_notifier(airflow_server):
    airflow_server.wait_for_dag("nightly_inference")
    # A night long past: its deadline (data interval end + 240 min) passed before the run exists.
    logical = "2026-10-05T02:30:00Z"
    status, run = airflow_server.request("POST", "/api/v2/dags/nightly_inference/dagRuns", {"logical_date": logical, "conf": {}})
    assert status == 200, run
    run_id = run["dag_run_id"]
    log_file = airflow_server.home / "airflow-triggerer.log"
    lines: list[str] = []

    def late_line_logged() -> bool:
        lines[:] = [line for line in log_file.read_text(errors="replace").splitlines() if "late night:" in line and run_id in line]
        return bool(lines)

    airflow_server.wait_for(late_line_logged, f"the late-night line of {run_id}", 180)
    assert len(lines) == 1, lines
    assert f"DAG nightly_inference run {run_id} has not published partition 2026-10-04 by its deadline 2026-10-05T06:30:00+00:00" in lines[0]
    assert "(240 min after the data interval end; run " in lines[0]
    assert re.search(r"\): \d+ h \d\d min late", lines[0]), lines[0]
    # The notifier got the same facts (print: its dict in the same log).
    airflow_server.wait_for(lambda: f"'run_id': '{run_id}'" in log_file.read_text(errors="replace"), "the notifier's call", 60)
