"""The ``sparktf`` Airflow plugin: run notes attached as runs end, figures served behind the login.

Loaded by every Airflow component from the plugins folder (``plugins/sparktf_plugin.py`` imports
the class). It adds:

* a **listener**: when a DAG run succeeds or fails, the note its ``report`` task rendered becomes
  the run's note (:func:`sparktf.airflow.run_notes.attach_note`). It runs where the state change
  happens (the scheduler; the api-server when a person marks a run) with that process's database
  session;
* a **FastAPI app** on the api-server under ``/sparktf``: ``GET /sparktf/figure/<dag>/<run>/<task>``
  returns the PNG whose ``s3://`` URI the task recorded in its XCom (``figure_uri``). Access is
  checked by Airflow's auth manager like any XCom read (the UI's session cookie or a bearer
  token); the object is read with the ``aws_default`` connection on the server, so the browser
  never sees a storage credential or a presigned URL.

  An XCom is not trusted to name what the server reads: only a ``.png`` inside that run's own
  folder (``<workspace_uri>/runs/<dag>/<run id | path_safe>/``, the DAGs' ``RUN_URI``, with the
  run's ``workspace_uri`` Param) is served, and only up to :data:`MAX_FIGURE_BYTES`, checked with
  a HEAD before any GET. The body is streamed, never held whole.

The app is built on first request, so components other than the api-server (and task processes,
which load plugins too) never import FastAPI's Airflow security stack for it.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, ClassVar

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_FIGURE_BYTES = 8 << 20  # the tuning figure is ~100 KB; anything this large is not one


class FigureRefused(Exception):
    """A figure the endpoint will not serve: ``status`` is the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RunNoteListener:
    """Attach the ``report`` task's note to a run when the run ends."""

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        from sparktf.airflow import run_notes

        run_notes.attach_note(dag_run)

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        from sparktf.airflow import run_notes

        run_notes.attach_note(dag_run)


def figure_uri_of(dag_id: str, run_id: str, task_id: str) -> str | None:
    """The ``figure_uri`` a task instance recorded in its return value (XCom), if any."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=task_id, key="return_value")).first()
        value = XComModel.deserialize_value(row) if row is not None else None
    uri = value.get("figure_uri") if isinstance(value, dict) else None
    return uri if isinstance(uri, str) else None


def workspace_of(dag_id: str, run_id: str) -> str | None:
    """The run's ``workspace_uri`` Param: its conf's, else the DAG's default (None if unknown)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        conf = session.scalar(select(DagRun.conf).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if isinstance(conf, dict) and isinstance(conf.get("workspace_uri"), str):
            return conf["workspace_uri"]
        dag = SerializedDagModel.get_dag(dag_id, session=session)
    value = dag.params.get("workspace_uri") if dag is not None and "workspace_uri" in dag.params else None
    return value if isinstance(value, str) else None


def run_folder_uri(workspace_uri: str, dag_id: str, run_id: str) -> str:
    """``<workspace>/runs/<dag>/<run id | path_safe>/``: everything a run writes (the DAGs' ``RUN_URI``)."""
    from sparktf import storage
    from sparktf.airflow.pipeline_settings import path_safe

    return storage.prefix_uri(storage.join_uri(workspace_uri, "runs", dag_id, path_safe(run_id)))


def figure_refusal(uri: str, run_folder: str) -> str | None:
    """Why ``uri`` is not a figure of the run whose folder is ``run_folder`` (None: it is one).

    Same bucket, a key inside the folder with no empty, ``.`` or ``..`` segment, ending in ``.png``.
    """
    from sparktf import storage

    try:
        target, folder = storage.parse_uri(uri), storage.parse_uri(run_folder)
    except ValueError:
        return "the recorded figure is not an S3 URI"
    inside = target.key[len(folder.key) :] if target.key.startswith(folder.key) else None
    if target.bucket != folder.bucket or not inside:
        return "the recorded figure is not in the run's own folder"
    if any(part in ("", ".", "..") for part in inside.split("/")) or not inside.endswith(".png"):
        return "the recorded figure is not a .png file of the run's folder"
    return None


def open_figure(uri: str, run_folder: str, s3, max_bytes: int = MAX_FIGURE_BYTES):
    """``(length, chunks)`` of a run's figure, checked before and while it is read.

    The key must be the run's (:func:`figure_refusal`), the HEAD's size at most ``max_bytes``, and
    the GET reads exactly the version the HEAD saw; the body starts with the PNG signature.

    Raises:
        FigureRefused: 404 (not the run's, or gone), 413 (too large), 502 (storage, not a PNG).
    """
    from sparktf import storage

    refusal = figure_refusal(uri, run_folder)
    if refusal:
        raise FigureRefused(404, refusal)
    try:
        info = storage.head(uri, s3)
        if info is None:
            raise FigureRefused(404, "the recorded figure no longer exists")
        if info["size"] > max_bytes:
            raise FigureRefused(413, f"the recorded figure is {info['size']} bytes, over the {max_bytes}-byte cap")
        length, chunks = storage.open_object(uri, s3, if_match=info["etag"] or None)
        first = next(chunks, b"") if length <= max_bytes else b""
    except (storage.ObjectNotFound, storage.PreconditionFailed):
        raise FigureRefused(404, "the recorded figure changed or vanished while it was read") from None
    except storage.StorageError as err:
        raise FigureRefused(502, f"cannot read the figure from storage: {type(err).__name__}") from None
    if length > max_bytes or not first.startswith(PNG_SIGNATURE):
        chunks.close()
        raise FigureRefused(502 if length <= max_bytes else 413, "the recorded figure is not a PNG of a sane size")
    return length, itertools.chain([first], chunks)


def server_storage_settings(conn_id: str = "aws_default"):
    """The storage settings of the connection, looked up on the server (env, secrets backends, DB)."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from sparktf import storage
    from sparktf.airflow import aws_connection

    try:
        conn = Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        return storage.StorageSettings()
    return aws_connection.settings_of(conn.login, conn.password, conn.extra_dejson)


def create_figure_app():
    """The FastAPI app mounted at ``/sparktf`` on the api-server."""
    from airflow.api_fastapi.core_api.security import DagAccessEntity, requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException, Response
    from fastapi.responses import StreamingResponse

    app = FastAPI(title="sparktf", description="Figures of sparktf runs (PNG), behind Airflow's login.")

    @app.get(
        "/figure/{dag_id}/{run_id}/{task_id}",
        dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.XCOM))],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def figure(dag_id: str, run_id: str, task_id: str) -> Response:
        from sparktf import storage

        uri, workspace = figure_uri_of(dag_id, run_id, task_id), workspace_of(dag_id, run_id)
        if uri is None or workspace is None:
            raise HTTPException(404, f"task {task_id!r} of run {run_id!r} of {dag_id!r} recorded no figure")
        try:
            length, chunks = open_figure(uri, run_folder_uri(workspace, dag_id, run_id), storage.client(server_storage_settings()))
        except FigureRefused as refused:
            raise HTTPException(refused.status, str(refused)) from None
        return StreamingResponse(
            chunks,
            media_type="image/png",
            headers={"Content-Length": str(length), "Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    return app


class LazyApp:
    """An ASGI app built by ``factory`` on its first request."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.app = None
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if self.app is None:
            with self.lock:
                if self.app is None:
                    self.app = self.factory()
        await self.app(scope, receive, send)


class SparktfPlugin(AirflowPlugin):
    """Run notes and figures of the sparktf DAGs."""

    name = "sparktf"
    listeners: ClassVar[list] = [RunNoteListener()]
    fastapi_apps: ClassVar[list[dict]] = [{"app": LazyApp(create_figure_app), "url_prefix": "/sparktf", "name": "sparktf figures"}]
