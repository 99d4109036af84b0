"""The skeleton every spark-submit application of this package shares: logging, the
SparkSession, and handing the job's small JSON result to the operator that submitted it.

Driver-side only: code that runs on executors imports :mod:`sparktf.executor` instead.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sparktf import storage
from sparktf.knobs import parse_bool  # noqa: F401 - the jobs' flags use job.parse_bool

log = logging.getLogger("sparktf")


class FinalFailure(RuntimeError):
    """A failure that running the job again cannot fix (same inputs, same outcome), e.g. a
    breached failure ratio or a lost publish race.

    :func:`run_spark_job` writes the job's result with ``final_failure`` set to the message before
    failing, so the submitting operator can fail the Airflow task without retrying it.
    """

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


@contextlib.contextmanager
def tasks_settled_on_failure(sc, description: str, *, timeout: float = 120.0) -> Iterator[None]:
    """Run the block's Spark jobs as one job group; if the block fails, cancel the group and wait
    (at most ``timeout`` seconds) until none of its tasks is still running, then re-raise.

    A job fails as soon as one task does, while its other tasks may still be writing (a task's
    Python worker is killed only seconds after the job failed): clean-up that runs after this
    block cannot race their last writes.
    """
    group = f"sparktf-{uuid.uuid4().hex[:12]}"
    sc.setJobGroup(group, description)
    try:
        yield
    except BaseException:
        sc.cancelJobGroup(group)
        started = time.monotonic()
        running = running_tasks(sc, group)
        while running and time.monotonic() - started < timeout:
            time.sleep(0.2)
            running = running_tasks(sc, group)
        if running:
            log.warning("%d tasks of the failed job were still running after %.0f s", running, timeout)
        else:
            log.info("every task of the failed job ended (%.1f s after it failed)", time.monotonic() - started)
        raise
    finally:
        sc.setJobGroup(None, None)  # later jobs of this thread are not in the group


def running_tasks(sc, group: str) -> int:
    """Tasks of the job group ``group`` that have started and not ended (Spark's status tracker)."""
    tracker = sc.statusTracker()
    running = 0
    for job_id in tracker.getJobIdsForGroup(group):
        info = tracker.getJobInfo(job_id)
        for stage_id in info.stageIds if info else ():
            stage = tracker.getStageInfo(stage_id)
            running += stage.numActiveTasks if stage else 0
    return running


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def quiet_py4j() -> None:
    """Keep py4j's connection chatter (INFO) out of the log handlers.

    py4j logs "Closing down clientserver connection" at INFO from ``ClientServerConnection.close()``,
    which ``__del__`` calls, so the driver's own connections log it while the interpreter shuts
    down. By then a handler's stream may already be closed (pytest closes its capture files; a
    handler configured on import by Airflow still points at them) and logging prints a
    ``--- Logging error ---`` traceback. py4j's warnings and errors still get through.
    """
    logging.getLogger("py4j").setLevel(logging.WARNING)


def spark_session(app_name: str):
    """The job's SparkSession; master and resources come from spark-submit, never from code."""
    from pyspark.sql import SparkSession

    quiet_py4j()
    spark = SparkSession.builder.appName(app_name).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    # The operator turns this line into the task's "Spark UI" link (sparktf.airflow.spark_ui).
    log.info("Spark UI of application %s: %s", spark.sparkContext.applicationId, spark.sparkContext.uiWebUrl or "disabled (spark.ui.enabled=false)")
    return spark


def write_result(result_uri: str | None, result: dict[str, Any]) -> None:
    """Hand the job's small JSON summary to the Airflow operator that submitted it."""
    if result_uri:
        storage.write_json(result_uri, result)
    log.info("job result: %s", result)


def _run_and_report(run: Callable[[], dict[str, Any]], result_uri: str | None) -> None:
    try:
        write_result(result_uri, run())
    except FinalFailure as failure:
        write_result(result_uri, {**failure.result, "final_failure": str(failure)})
        raise


def run_spark_job(app_name: str, run: Callable[[Any, Any], dict[str, Any]], args) -> int:
    """A job's main(): ``run(spark, args)`` in a SparkSession, its result written to ``--result-uri``."""
    configure_logging()
    spark = spark_session(app_name)
    try:
        _run_and_report(lambda: run(spark, args), args.result_uri)
    finally:
        spark.stop()
    return 0


def run_driver_job(app_name: str, run: Callable[[Any], dict[str, Any]], args) -> int:
    """A job's main() for work done on the driver alone (exporting, registering): ``run(args)``,
    its result written to ``--result-uri`` as :func:`run_spark_job` does, but no SparkSession.

    spark-submit still launches it (the DAG ships the code and reads the logs and the result the
    same way), but no SparkContext, executors or Spark UI are started only to be discarded.
    """
    configure_logging()
    log.info("%s runs on the driver only: no SparkSession", app_name)
    _run_and_report(lambda: run(args), args.result_uri)
    return 0
