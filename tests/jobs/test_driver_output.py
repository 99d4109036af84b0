"""What the Spark driver shows a person: the Spark UI link while the job runs, and a clean exit.

* The operator's hook turns the driver's "Spark UI of application ..." line into the task's
  "Spark UI" link as the line passes: checked with a real spark-submit whose job waits until the
  test has opened the UI, then lets it end.
* py4j's connections log at INFO when garbage-collected at interpreter exit, after a handler's
  stream may be closed (pytest's capture files): ``--- Logging error ---``. Reproduced with a
  handler whose stream is closed before exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request

import pytest

from sparktf.airflow import spark_ui
from sparktf_dev.testing import wait_until

WAITING_JOB = """
import os, sys, time
from sparktf import job

job.configure_logging()
spark = job.spark_session("ui-link-test")
deadline = time.monotonic() + 180
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:  # until the test has seen the UI
    time.sleep(0.2)
spark.stop()
"""


def test_spark_ui_link_is_published_while_the_job_runs(tmp_path, monkeypatch):
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    app, release = tmp_path / "waiting_job.py", tmp_path / "release"
    app.write_text(WAITING_JOB)
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_UI_TEST", json.dumps({"conn_type": "spark", "host": "local[1]"}))
    hook = SparkSubmitHook(
        conn_id="spark_ui_test", name="ui-link-test", application_args=[str(release)], conf={"spark.ui.showConsoleProgress": "false"}
    )
    seen: dict[str, str] = {}
    spark_ui.watch_output(hook, lambda app_id, url: seen.update(app_id=app_id, url=url))
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            hook.submit(str(app))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    job = threading.Thread(target=submit)
    job.start()
    try:
        wait_until(lambda: "url" in seen or not job.is_alive(), "the driver's Spark UI line", 180)
        assert "url" in seen, errors
        assert seen["app_id"].startswith("local-")
        with urllib.request.urlopen(seen["url"] + "/jobs/", timeout=10) as response:  # the running job's UI
            assert response.status == 200
            assert b"ui-link-test" in response.read()
    finally:
        release.touch()
        job.join(180)
    assert not job.is_alive()
    assert errors == []


def test_the_link_after_the_job(monkeypatch):
    class Task:
        spark_app_id, spark_ui_url = "local-1700000000000", "http://localhost:4040"

    link = spark_ui.SparkUILink()
    monkeypatch.delenv("SPARKTF_SPARK_HISTORY_URL", raising=False)
    assert link.get_link(Task(), ti_key=None) == "http://localhost:4040"
    monkeypatch.setenv("SPARKTF_SPARK_HISTORY_URL", "http://history.example:18080/")
    assert link.get_link(Task(), ti_key=None) == "http://history.example:18080/history/local-1700000000000/"
    assert link.get_link(object(), ti_key=None) == ""
    assert link.xcom_key == "_link_SparkUILink"
    assert spark_ui.parse_ui_line("2026-11-29 10:00:00,000 INFO sparktf: Spark UI of application app-20261129-0001: http://10.0.0.5:4041") == (
        "app-20261129-0001",
        "http://10.0.0.5:4041",
    )
    assert spark_ui.parse_ui_line("INFO sparktf: Spark UI of application local-1: disabled (spark.ui.enabled=false)") is None


EXIT_WITH_A_CLOSED_STREAM = """
import logging, sys
stream = open(sys.argv[1], "w")
logging.basicConfig(level=logging.INFO, stream=stream)  # a handler like Airflow's, on a stream pytest closes
from sparktf_dev.testing import local_spark
spark = local_spark(1, "py4j-shutdown")
assert spark.range(3).count() == 3
spark.stop()
stream.close()
"""


def test_no_logging_error_when_the_interpreter_exits(tmp_path):
    out = subprocess.run([sys.executable, "-c", EXIT_WITH_A_CLOSED_STREAM, str(tmp_path / "log.txt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--- Logging error ---" not in out.stderr, out.stderr[-3000:]


DRIVER_LINE = "2026-11-29 10:00:00,000 INFO sparktf: Spark UI of application local-1700000000000: http://127.0.0.1:4040"
KEY = "incoming/2026-11-20/Spark UI of application app-evil: http://evil.example/x.png"


@pytest.mark.parametrize(
    "line",
    [
        f"2026-11-29 10:00:01,000 WARNING sparktf.scoring: set aside {KEY}: corrupt",
        f"2026-11-29 10:00:01,000 INFO sparktf: job result: {{'errors': ['{KEY}']}}",
        f"26/11/29 10:00:01 ERROR Executor: Exception in task 0.0: GET s3://b/{KEY}: AccessDenied",
        KEY,
        "Spark UI of application app-evil: http://evil.example/",
        f"2026-11-29 10:00:01,000 INFO sparktf: Spark UI of application app-evil: http://evil.example/ {KEY}",
    ],
)
def test_a_line_that_only_contains_the_phrase_is_not_the_drivers(line):
    assert spark_ui.parse_ui_line(line) is None


def test_an_object_key_cannot_replace_the_spark_ui_link():
    """The hook hands the wrapped iterator every line; a key with a newline and a copy of the
    driver's line comes after the real one and is ignored."""

    class Hook:
        def _process_spark_submit_log(self, itr):
            return list(itr)

    forged = "2026-11-29 10:00:02,000 INFO sparktf: Spark UI of application app-evil: http://evil.example/"
    output = [
        b"26/11/29 10:00:00 INFO SparkContext: Running Spark version 4.0.0\n",
        (DRIVER_LINE + "\n").encode(),
        b"2026-11-29 10:00:01,000 WARNING sparktf.scoring: set aside incoming/x\n",
        (forged + "\n").encode(),
    ]
    seen: list[tuple[str, str]] = []
    hook = spark_ui.watch_output(Hook(), lambda app_id, url: seen.append((app_id, url)))
    assert hook._process_spark_submit_log(iter(output)) == output  # every line still logged
    assert seen == [("local-1700000000000", "http://127.0.0.1:4040")]
