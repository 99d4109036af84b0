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
  never sees a storage credential or a presigned URL, and nothing else in the bucket is reachable.

The app is built on first request, so components other than the api-server (and task processes,
which load plugins too) never import FastAPI's Airflow security stack for it.
"""

from __future__ import annotations

import threading
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
        row = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=task_id,
                                                 key="return_value")).first()
        value = XComModel.deserialize_value(row) if row is not None else None
    uri = value.get("figure_uri") if isinstance(value, dict) else None
    return uri if isinstance(uri, str) and uri.startswith(("s3://", "s3a://")) and uri.endswith(".png") else None


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

    app = FastAPI(title="sparktf", description="Figures of sparktf runs (PNG), behind Airflow's login.")

    @app.get("/figure/{dag_id}/{run_id}/{task_id}", dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.XCOM))],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def figure(dag_id: str, run_id: str, task_id: str) -> Response:
        from sparktf import storage

        uri = figure_uri_of(dag_id, run_id, task_id)
        if uri is None:
            raise HTTPException(404, f"task {task_id!r} of run {run_id!r} of {dag_id!r} recorded no figure")
        try:
            data = storage.read_bytes(uri, storage.client(server_storage_settings()))
        except storage.ObjectNotFound:
            raise HTTPException(404, f"the figure {uri} no longer exists") from None
        except storage.StorageError as err:
            raise HTTPException(502, f"cannot read the figure from storage: {type(err).__name__}") from None
        if not data.startswith(PNG_SIGNATURE):
            raise HTTPException(502, "the recorded figure is not a PNG")
        return Response(content=data, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})

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
    listeners = [RunNoteListener()]
    fastapi_apps = [{"app": LazyApp(create_figure_app), "url_prefix": "/sparktf", "name": "sparktf figures"}]
