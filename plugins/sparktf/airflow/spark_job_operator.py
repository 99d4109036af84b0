"""SparkJobOperator: spark-submit one of this package's jobs and push its JSON result to XCom.

Spark applications cannot return values to Airflow. This operator gives the job a result
location (``--result-uri``, an object in the bucket), runs it through the Spark provider's
SparkSubmitOperator, then reads that small JSON document back and returns it, so it lands in
XCom. XCom therefore carries summaries and URIs, never data or models.

It also ships the ``sparktf`` package to the driver and executors as a ``--py-files`` zip built
from the plugins folder (how code reaches a real cluster), and passes S3 settings from the
``aws_default`` connection to the job as the standard AWS environment variables, outside any
templated field so they are never rendered into the UI or logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

import sparktf
from sparktf.airflow import aws_connection, pipeline_settings, spark_ui

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# jobs/ sits next to plugins/ in the repository (and in a deployment that copies both).
JOBS_DIR = Path(os.environ.get("SPARKTF_JOBS_DIR", PACKAGE_DIR.parents[1] / "jobs"))
# Airflow-side code never runs on executors: it stays out of the --py-files zip.
EXCLUDED_FROM_ZIP = ("airflow",)
# Package data read with importlib.resources (it works from inside the zip too).
DATA_DIR = "data"


def package_zip(package_dir: Path = PACKAGE_DIR) -> tuple[str, str]:
    """Build (once per content) a zip of the ``sparktf`` package (sources and ``data/``) for ``--py-files``.

    Returns:
        ``(zip_path, sha256 of the sources)``; the zip's name carries the hash, so a changed
        package never reuses a stale zip.
    """
    sources = sorted(
        p
        for p in package_dir.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix == ".py" or p.relative_to(package_dir).parts[0] == DATA_DIR)
        and p.relative_to(package_dir).parts[0] not in EXCLUDED_FROM_ZIP
    )
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(package_dir.parent).as_posix().encode())
        digest.update(path.read_bytes())
    sha = digest.hexdigest()
    out_dir = Path(tempfile.gettempdir()) / "sparktf-pyfiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"sparktf-{sha[:16]}.zip"
    if not target.exists():
        partial = out_dir / f".{target.name}.{os.getpid()}.tmp"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sources:
                archive.write(path, path.relative_to(package_dir.parent).as_posix())
        os.replace(partial, target)  # atomic: concurrent tasks never see half a zip
    return str(target), sha


def job_path(name: str) -> str:
    """Absolute path of a job script in ``jobs/`` (DAGs reference jobs by file)."""
    return str(JOBS_DIR / name)


class SparkJobOperator(SparkSubmitOperator):
    """Run a ``jobs/`` application with spark-submit and return its JSON result (to XCom).

    What every Spark step repeats is the default: ``name`` = the task id, ``conf`` =
    :data:`~sparktf.airflow.pipeline_settings.SPARK_CONF`, driver and executor memory from
    :mod:`~sparktf.airflow.pipeline_settings`, ``conn_id="spark_default"``.

    Args:
        result_uri: S3 URI where the job writes its result (templated); default: the run's
            ``_results/<task id>.json`` (:data:`~sparktf.airflow.pipeline_settings.RESULT_URI`). Deleted before
            the job starts, so a retry never reads an earlier attempt's result. A failed job whose result
            carries ``final_failure`` fails the task without retries, with that message.
        aws_conn_id: Airflow connection with the S3 endpoint and credentials. If it does not
            exist, the job uses the standard AWS chain of the machine it runs on.
        **kwargs: passed to SparkSubmitOperator (``application``, ``application_args``, ``conf``...).
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "result_uri")
    # "Spark UI" on the task page, live while the job runs (see sparktf.airflow.spark_ui).
    operator_extra_links = (spark_ui.SparkUILink(),)

    def __init__(self, *, result_uri: str = pipeline_settings.RESULT_URI, aws_conn_id: str = "aws_default", **kwargs: Any) -> None:
        kwargs.setdefault("conn_id", "spark_default")
        kwargs.setdefault("name", kwargs.get("task_id"))
        kwargs.setdefault("conf", dict(pipeline_settings.SPARK_CONF))
        kwargs.setdefault("driver_memory", pipeline_settings.DRIVER_MEMORY)
        kwargs.setdefault("executor_memory", pipeline_settings.EXECUTOR_MEMORY)
        super().__init__(**kwargs)
        self.result_uri = result_uri
        self.aws_conn_id = aws_conn_id

    def _get_hook(self):
        # The hook reports the driver's UI as it starts: the task's "Spark UI" link, live.
        return spark_ui.watch_output(super()._get_hook(), spark_ui.publisher(self))

    def _check_spark_connection(self) -> None:
        """Fail (without retries) when the Spark connection cannot be loaded, naming it: the provider
        would log "Could not load connection string" and spark-submit against YARN instead."""
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

        try:
            BaseHook.get_connection(self._conn_id)
        except AirflowNotFoundException:
            raise AirflowFailException(aws_connection.unusable_message(self._conn_id)) from None

    def execute(self, context: Any) -> dict[str, Any]:
        from sparktf import storage

        self._check_spark_connection()
        zip_path, code_sha = package_zip()
        self.py_files = ",".join(p for p in (self.py_files, zip_path) if p)
        # str(): an XComArg argument (a model version) renders to its native value.
        self.application_args = [*(str(a) for a in self.application_args or []), "--result-uri", self.result_uri]
        settings = aws_connection.use_connection(self.aws_conn_id)
        self.env_vars = {**(self.env_vars or {}), **settings.environment(), sparktf.CODE_SHA256_ENV: code_sha, "PYTHONHASHSEED": "0"}
        storage.delete_object(self.result_uri)
        self._hook = None  # rebuild the hook with the arguments set above

        try:
            super().execute(context)
        except Exception:
            final = self._final_failure()
            if final:
                # The job says another try would end the same way (see sparktf.job.FinalFailure).
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(final) from None
            raise

        try:
            result = storage.read_json(self.result_uri)
        except storage.ObjectNotFound:
            raise RuntimeError(f"the Spark job finished without writing its result to {self.result_uri}") from None
        self.log.info("job result: %s", json.dumps(result, sort_keys=True)[:2000])
        return result

    def _final_failure(self) -> str | None:
        """The message of a failed job that asked not to be retried, if it wrote one."""
        from sparktf import storage

        try:
            result = storage.read_json_if_exists(self.result_uri)
        except Exception:  # noqa: BLE001 - the job's own failure is the one to report
            return None
        return (result or {}).get("final_failure")
