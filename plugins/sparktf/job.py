"""The skeleton every spark-submit application of this package shares: logging, the
SparkSession, and handing the job's small JSON result to the operator that submitted it.

Driver-side only: code that runs on executors imports :mod:`sparktf.executor` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sparktf import storage

log = logging.getLogger("sparktf")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def spark_session(app_name: str):
    """The job's SparkSession; master and resources come from spark-submit, never from code."""
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName(app_name).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def write_result(result_uri: str | None, result: dict[str, Any]) -> None:
    """Hand the job's small JSON summary to the Airflow operator that submitted it."""
    if result_uri:
        storage.write_json(result_uri, result)
    log.info("job result: %s", result)


def run_spark_job(app_name: str, run: Callable[[Any, Any], dict[str, Any]], args) -> int:
    """A job's main(): ``run(spark, args)`` in a SparkSession, its result written to ``--result-uri``."""
    configure_logging()
    spark = spark_session(app_name)
    try:
        write_result(args.result_uri, run(spark, args))
    finally:
        spark.stop()
    return 0
