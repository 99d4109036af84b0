"""The "Spark UI" link of a Spark task: from the driver's own log line to a button on the task.

The job skeleton (:func:`sparktf.job.spark_session`) logs ``Spark UI of application <id>: <url>``
as soon as the SparkSession exists. spark-submit's output reaches the operator line by line; the
operator has its hook hand each line to :func:`watch_output` before logging it, so when that line
passes, the URL is pushed to the task's XCom under the link's key at once. The UI's extra-link
endpoint reads that XCom, so the button works **while the job runs** (not only once the task
ends, which is when Airflow evaluates links itself).

Where there is no link: ``spark.ui.enabled=false`` (the job then logs "disabled"), or a deploy
mode whose driver runs elsewhere (cluster mode: the driver's output does not reach spark-submit).
The URL is the driver's: in local or client mode, the machine running the Airflow worker (Spark
binds the UI to ``SPARK_LOCAL_IP``, 127.0.0.1 on the embedded stack). Once the job has ended the
driver's UI is gone; with ``SPARKTF_SPARK_HISTORY_URL`` set (a Spark history server), the link
then points at the application's page there instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from airflow.sdk import BaseOperatorLink

# The driver's own line, whole: the job skeleton's log format (sparktf.job.configure_logging:
# "%(asctime)s %(levelname)s %(name)s: %(message)s"), its "sparktf" logger at INFO, and nothing
# after the URL. A message that merely contains the phrase (an object key, an error) never matches.
SPARK_UI_LINE = re.compile(
    r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} INFO sparktf: "
    r"Spark UI of application (?P<app>[A-Za-z0-9_.-]+): (?P<url>https?://[^\s\"'<>]+)\s*$"
)


class SparkUILink(BaseOperatorLink):
    """Extra link "Spark UI" of a SparkJobOperator task (stored in XCom ``_link_SparkUILink``)."""

    name = "Spark UI"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        """Called by the task when it ends: the history server's page, else the driver's UI URL."""
        app_id, url = getattr(operator, "spark_app_id", None), getattr(operator, "spark_ui_url", None)
        history = os.environ.get("SPARKTF_SPARK_HISTORY_URL", "").rstrip("/")
        if history and app_id:
            return f"{history}/history/{app_id}/"
        return url or ""


def parse_ui_line(line: str) -> tuple[str, str] | None:
    """``(application id, UI URL)`` from the driver's own log line (the whole line), or None."""
    match = SPARK_UI_LINE.match(line)
    return (match["app"], match["url"]) if match else None


def watch_output(hook: Any, on_ui: Callable[[str, str], None]) -> Any:
    """Have a SparkSubmitHook call ``on_ui(app_id, url)`` when the driver reports its UI.

    The provider's hook reads spark-submit's output in ``_process_spark_submit_log(iterator)``;
    this wraps that iterator (the hook still logs every line, unchanged).

    Only the first matching line counts: the driver logs it as soon as its session exists, before
    the job reads anything, so a later line built from untrusted text (an object key holding a
    newline and a copy of the line) cannot replace the link.
    """
    process = hook._process_spark_submit_log

    def lines(itr: Iterator[Any]) -> Iterator[Any]:
        found = None
        for line in itr:
            if found is None:
                found = parse_ui_line(line.decode(errors="replace") if isinstance(line, bytes) else str(line))
                if found:
                    on_ui(*found)
            yield line

    hook._process_spark_submit_log = lambda itr: process(lines(itr))
    return hook


def publisher(operator: Any) -> Callable[[str, str], None]:
    """``on_ui`` for :func:`watch_output`: remember the URL and push the link's XCom right away."""
    link = SparkUILink()

    def publish(app_id: str, url: str) -> None:
        from airflow.sdk import get_current_context

        operator.spark_app_id, operator.spark_ui_url = app_id, url
        try:
            get_current_context()["ti"].xcom_push(key=link.xcom_key, value=url)
        except Exception as err:  # noqa: BLE001 - a link is a nicety, never a task failure
            operator.log.warning("could not publish the Spark UI link: %s", err)
        operator.log.info("Spark UI (task link %r while the job runs): %s", link.name, url)

    return publish
