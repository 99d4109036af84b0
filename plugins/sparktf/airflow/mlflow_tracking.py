"""MLflow tracking, when a team has it: tuning runs, trials, model versions, the champion alias, nightly runs.

**Optional, and free when unused.** MLflow is configured by an Airflow connection ``mlflow_default``
(its host is the tracking URI, e.g. ``http://mlflow:5000``; login/password for a server with basic
auth) or by the environment variable ``MLFLOW_TRACKING_URI``. Without either, the DAGs' ``mlflow``
task is skipped and nothing here talks to anything.

**No ``mlflow`` package in the Airflow venv.** The tasks speak MLflow's REST API (``/api/2.0/mlflow``,
the API ``mlflow.MlflowClient`` itself calls) with ``requests``: every ``mlflow-skinny`` release pins
``cachetools<8``, which Airflow 3.3's venv has, so the client cannot be installed beside Airflow
without changing it. Users read the runs with MLflow's UI or client as usual.

**What is logged** (from the driver side, after the Spark jobs, from their XComs and the files they wrote):

* a tuning run: MLflow run ``<Airflow run id>`` in experiment ``<model name>/tuning`` with the Params,
  the prepared data's content hash, ``leaderboard.json`` (a table artifact) and the error-vs-learning-rate
  figure; one child run per trial with its hyperparameters, per-epoch ``train_*``/``val_*`` metrics,
  status and reason;
* the exported version as an MLflow model version of the same name (source: the registry's ``.keras``
  in S3, tags ``sparktf.version`` and ``model_sha256``), and the ``champion`` alias set to the version
  the S3 champion pointer names (S3 is the source of truth: the alias follows it, never the other way);
* a ``register_model`` run: the imported version as an MLflow model version (as above, without a run),
  and the ``champion`` alias synced the same way (so a ``promote`` moves it at once);
* a nightly run: MLflow run ``<Airflow run id>`` in experiment ``<model name>/nightly`` with the date,
  the model version, the counts, the set-aside reasons and the label histogram.

**Never fails a run.** MLflow down or refusing is caught: the task returns what was and was not
logged, and the run's note says so. Clearing the ``mlflow`` task (or a later retry) fills it in:
runs are found by the tags ``sparktf.airflow_run_id`` (and ``sparktf.trial_id``), model versions by
``sparktf.version``, so nothing is created twice; a run already marked ``sparktf.complete`` is left
as it is.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from typing import Any

log = logging.getLogger(__name__)

CONN_ID = "mlflow_default"
ENV_URI = "MLFLOW_TRACKING_URI"
TASK_ID = "mlflow"
API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
TAG_RUN = "sparktf.airflow_run_id"
TAG_DAG = "sparktf.dag_id"
TAG_TRIAL = "sparktf.trial_id"
TAG_KIND = "sparktf.kind"  # "run" (a DAG run) or "trial" (its child): the parent's search key excludes children
TAG_COMPLETE = "sparktf.complete"
TAG_VERSION = "sparktf.version"
CHAMPION_ALIAS = "champion"
TIMEOUT_SECONDS = 10
BATCH_METRICS = 1000  # MLflow's log-batch limits
BATCH_PARAMS = 100
MAX_PARAM_CHARS = 6000
HISTORY_NAMES = {
    "loss": "train_loss",
    "accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "learning_rate": "learning_rate",
}


class MlflowUnavailable(Exception):
    """The tracking server cannot be reached or refused a call (never a verdict on the run)."""


# ---------------------------------------------------------------------------------------------
# Configuration (no connection lookup at parse time: only inside the task)
# ---------------------------------------------------------------------------------------------


def tracking_settings() -> dict[str, Any] | None:
    """``{"uri", "auth"}`` from the ``mlflow_default`` connection, else ``MLFLOW_TRACKING_URI``; None without either."""
    try:
        from airflow.sdk import Connection

        conn = Connection.get(CONN_ID)
    except Exception:  # noqa: BLE001 - no such connection (AirflowNotFoundException) or outside Airflow
        conn = None
    if conn is not None and conn.host:
        host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}" + (f":{conn.port}" if conn.port else "")
        auth = (conn.login, conn.password or "") if conn.login else None
        return {"uri": host.rstrip("/"), "auth": auth}
    uri = os.environ.get(ENV_URI, "").strip()
    if uri.startswith(("http://", "https://")):
        return {"uri": uri.rstrip("/"), "auth": None}
    return None


def shown_uri(uri: str) -> str:
    """The tracking URI without any credential in it (for logs, XCom and the note)."""
    parts = urllib.parse.urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


# ---------------------------------------------------------------------------------------------
# What to log: pure functions of the jobs' results
# ---------------------------------------------------------------------------------------------


def param_value(value: Any) -> str:
    """A Param as MLflow stores it: text, lists and mappings as JSON, cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_CHARS]


def epoch_metrics(history: dict[str, list[float]] | None, timestamp: int) -> list[dict[str, Any]]:
    """Keras' per-epoch history as MLflow metrics (``train_loss``, ``val_accuracy``...), one step per epoch."""
    metrics = []
    for key, values in sorted((history or {}).items()):
        name = HISTORY_NAMES.get(key, key if key.startswith("val_") else f"train_{key}")
        metrics += [{"key": name, "value": float(v), "timestamp": timestamp, "step": step} for step, v in enumerate(values) if _finite(v)]
    return metrics


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and value not in (float("inf"), float("-inf"))


def _summary_metrics(source: dict[str, Any], keys: tuple[str, ...], timestamp: int, prefix: str = "") -> list[dict[str, Any]]:
    return [{"key": prefix + k, "value": float(source[k]), "timestamp": timestamp, "step": 0} for k in keys if _finite(source.get(k))]


def trial_run(record: dict[str, Any], timestamp: int) -> dict[str, Any]:
    """A trial's child run: hyperparameters, per-epoch metrics, final metrics, status and reason."""
    final = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "epochs_run", "train_seconds")
    status = record.get("status") or "failed"
    tags = {TAG_TRIAL: record["trial_id"], "status": status}
    if record.get("reason"):
        tags["reason"] = str(record["reason"])[:5000]
    if record.get("reused"):
        tags["reused"] = "true"
    return {
        "name": record["trial_id"],
        "tags": tags,
        "params": {k: param_value(v) for k, v in sorted((record.get("params") or {}).items())},
        "metrics": epoch_metrics(record.get("history"), timestamp) + _summary_metrics(record, final, timestamp, "final_"),
        "status": "FINISHED" if status == "ok" else "FAILED",
    }


def leaderboard_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The leaderboard in the layout ``mlflow.log_table`` writes (``columns`` + ``data``), shown as a table in the UI."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}


def tuning_plan(
    *, run_id: str, params: dict[str, Any], prepared: dict[str, Any] | None, tune: dict[str, Any], results: dict[str, Any], timestamp: int
) -> dict[str, Any]:
    """Everything a tuning run logs: the parent run (Params, data hash, best metrics, artifacts) and one child per trial."""
    prepared = prepared or {}
    parent_params = {k: param_value(v) for k, v in sorted(params.items())}
    parent_params["prepared_content_sha256"] = str(prepared.get("content_sha256"))
    best = tune.get("best") or {}
    metrics = _summary_metrics(tune, ("trials", "succeeded", "failed", "wall_seconds"), timestamp)
    metrics += _summary_metrics(best, ("val_accuracy", "test_accuracy"), timestamp, "best_")
    tags = {
        TAG_RUN: run_id,
        TAG_DAG: "tuning_pipeline",
        "model_name": str(params.get("model_name")),
        "prepared_content_sha256": str(prepared.get("content_sha256")),
        "best_trial_id": str(best.get("trial_id")),
        "selection_metric": str(tune.get("selection_metric")),
        "mlflow.loggedArtifacts": json.dumps([{"path": "leaderboard.json", "type": "table"}]),
    }
    return {
        "experiment": f"{params.get('model_name')}/tuning",
        "parent": {"name": run_id, "tags": tags, "params": parent_params, "metrics": metrics, "status": "FINISHED"},
        "children": [trial_run(record, timestamp) for record in results.get("trials") or []],
        "artifacts": {"leaderboard.json": json.dumps(leaderboard_table(results.get("leaderboard") or []), default=str).encode()},
        "figure_uri": tune.get("figure_uri"),
    }


def model_version_request(metadata: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    """An MLflow model version naming the registry's copy (S3 stays the source of truth) and its sha256."""
    tags = {TAG_VERSION: str(metadata["version"]), "model_sha256": metadata["model_sha256"], "registry_uri": str(metadata.get("uri"))}
    for key in ("trial_id", "source_run", "saved_model_sha256"):
        if metadata.get(key):
            tags[key] = str(metadata[key])
    body = {
        "name": metadata["name"] if "name" in metadata else metadata["model_name"],
        "source": metadata["model_uri"],
        "tags": [{"key": k, "value": v} for k, v in tags.items()],
        "description": f"sparktf registry version {metadata['version']} ({metadata.get('uri')}); sha256 {metadata['model_sha256']}",
    }
    if run_id:
        body["run_id"] = run_id
    return body


def nightly_plan(*, run_id: str, summary: dict[str, Any], timestamp: int) -> dict[str, Any]:
    """A nightly run: date and model as Params, counts as metrics, reasons and labels as metrics and a table."""
    counts = ("listed", "scored", "set_aside", "markers_skipped", "storage_retries", "images_per_second")
    metrics = _summary_metrics(summary, counts, timestamp)
    reasons, labels = summary.get("reasons") or {}, summary.get("label_histogram") or {}
    metrics += [{"key": f"set_aside_{_metric_name(k)}", "value": float(v), "timestamp": timestamp, "step": 0} for k, v in sorted(reasons.items())]
    metrics += [{"key": f"label_{_metric_name(k)}", "value": float(v), "timestamp": timestamp, "step": 0} for k, v in sorted(labels.items())]
    params = {k: param_value(summary.get(k)) for k in ("date", "model_name", "model_version", "output_uri")}
    tags = {
        TAG_RUN: run_id,
        TAG_DAG: "nightly_inference",
        "date": str(summary.get("date")),
        "model_name": str(summary.get("model_name")),
        "model_version": str(summary.get("model_version")),
        "mlflow.loggedArtifacts": json.dumps([{"path": "label_histogram.json", "type": "table"}]),
    }
    histogram = {"columns": ["label", "images"], "data": [[k, v] for k, v in labels.items()]}
    return {
        "experiment": f"{summary.get('model_name')}/nightly",
        "parent": {"name": f"{summary.get('date')} {run_id}", "tags": tags, "params": params, "metrics": metrics, "status": "FINISHED"},
        "children": [],
        "artifacts": {"label_histogram.json": json.dumps(histogram).encode(), "set_aside_reasons.json": json.dumps(reasons).encode()},
        "figure_uri": None,
    }


def _metric_name(text: Any) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / space``: anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(text))


def note_lines(outcome: dict[str, Any] | None) -> list[str]:
    """The note's line about MLflow: only when something was not logged (nothing when unconfigured or complete)."""
    if not outcome or not outcome.get("not_logged"):
        return []
    missing = ", ".join(outcome["not_logged"])
    from sparktf.airflow.run_notes import escape_markdown

    where, why = escape_markdown(outcome.get("tracking_uri")), escape_markdown(outcome.get("error"))
    return [f"MLflow ({where}): **not logged**: {escape_markdown(missing)} ({why}); clear the `mlflow` task to fill it in"]


# ---------------------------------------------------------------------------------------------
# The REST client (thin: one call per MLflow endpoint used)
# ---------------------------------------------------------------------------------------------


class TrackingClient:
    """Calls to one MLflow tracking server; every failure is :class:`MlflowUnavailable`."""

    def __init__(self, uri: str, auth: tuple[str, str] | None = None) -> None:
        import requests

        self.uri = uri
        self.session = requests.Session()
        self.session.auth = auth

    def call(self, method: str, endpoint: str, body: dict | None = None, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """One API call; ``missing_ok``: None for ``RESOURCE_DOES_NOT_EXIST`` instead of raising."""
        import requests

        kwargs = {"params": body} if method == "GET" else {"json": body or {}}
        try:
            response = self.session.request(method, f"{self.uri}{API}/{endpoint}", timeout=TIMEOUT_SECONDS, **kwargs)
        except requests.RequestException as err:
            raise MlflowUnavailable(f"{shown_uri(self.uri)} unreachable ({type(err).__name__})") from None
        if response.ok:
            return response.json() if response.content else {}
        code = _error_code(response)
        if missing_ok and code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise MlflowUnavailable(f"{endpoint} refused: HTTP {response.status_code} {code}")

    def upload(self, artifact_uri: str, path: str, data: bytes) -> None:
        """Upload an artifact to a run whose artifact URI is ``mlflow-artifacts:/...`` (the server proxies the store)."""
        import requests

        if not artifact_uri.startswith("mlflow-artifacts:"):
            raise MlflowUnavailable(f"artifact store {artifact_uri.split(':', 1)[0]}: is not served by the tracking server")
        location = urllib.parse.urlsplit(artifact_uri).path.lstrip("/")
        try:
            response = self.session.put(f"{self.uri}{ARTIFACTS_API}/{location}/{path}", data=data, timeout=TIMEOUT_SECONDS * 3)
        except requests.RequestException as err:
            raise MlflowUnavailable(f"{shown_uri(self.uri)} unreachable ({type(err).__name__})") from None
        if not response.ok:
            raise MlflowUnavailable(f"artifact upload refused: HTTP {response.status_code}")


def _error_code(response: Any) -> str:
    try:
        return str(response.json().get("error_code", ""))
    except ValueError:
        return ""


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def experiment_id(client: TrackingClient, name: str) -> str:
    found = client.call("GET", "experiments/get-by-name", {"experiment_name": name}, missing_ok=True)
    if found is not None:
        return found["experiment"]["experiment_id"]
    return client.call("POST", "experiments/create", {"name": name})["experiment_id"]


def find_run(client: TrackingClient, experiment: str, tags: dict[str, str]) -> dict[str, Any] | None:
    """The run of ``experiment`` carrying every tag in ``tags`` (the idempotency key), or None."""
    query = " and ".join(f"tags.`{k}` = {_quoted(v)}" for k, v in tags.items())
    runs = client.call("POST", "runs/search", {"experiment_ids": [experiment], "filter": query, "max_results": 2}).get("runs") or []
    return runs[0] if runs else None


def log_run(
    client: TrackingClient, experiment: str, spec: dict[str, Any], key: dict[str, str], timestamp: int, parent: str | None = None
) -> tuple[str, str, bool]:
    """Create (or find again) the run keyed by ``key`` and log ``spec`` into it, unless it is complete.

    Returns:
        ``(run id, artifact URI, whether it was logged now)``.
    """
    run = find_run(client, experiment, key)
    if run is not None:
        info, tags = run["info"], {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
        if tags.get(TAG_COMPLETE) == "true":
            return info["run_id"], info["artifact_uri"], False
    else:
        tags = {**spec["tags"], **key, "mlflow.runName": spec["name"]}
        if parent:
            tags["mlflow.parentRunId"] = parent
        body = {
            "experiment_id": experiment,
            "run_name": spec["name"],
            "start_time": timestamp,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        info = client.call("POST", "runs/create", body)["run"]["info"]
    run_id = info["run_id"]
    params = [{"key": k, "value": v} for k, v in spec["params"].items()]
    for start in range(0, len(params), BATCH_PARAMS):
        client.call("POST", "runs/log-batch", {"run_id": run_id, "params": params[start : start + BATCH_PARAMS]})
    # Deterministic timestamps: a metric logged again is the same row (MLflow's store skips it).
    for start in range(0, len(spec["metrics"]), BATCH_METRICS):
        client.call("POST", "runs/log-batch", {"run_id": run_id, "metrics": spec["metrics"][start : start + BATCH_METRICS]})
    return run_id, info["artifact_uri"], True


def finish_run(client: TrackingClient, run_id: str, status: str, timestamp: int) -> None:
    """Mark a run complete (a later fill-in skips it) and finished."""
    client.call("POST", "runs/set-tag", {"run_id": run_id, "key": TAG_COMPLETE, "value": "true"})
    client.call("POST", "runs/update", {"run_id": run_id, "status": status, "end_time": timestamp})


# ---------------------------------------------------------------------------------------------
# Logging a tuning run, its model version and the champion alias; a nightly run
# ---------------------------------------------------------------------------------------------


def log_plan(client: TrackingClient, plan: dict[str, Any], run_id: str, timestamp: int, read_bytes=None) -> str:
    """Log a parent run, its children and artifacts (each only once); returns the parent's MLflow run id."""
    experiment = experiment_id(client, plan["experiment"])
    key = {TAG_RUN: run_id, TAG_KIND: "run"}
    parent_id, artifact_uri, fresh = log_run(client, experiment, plan["parent"], key, timestamp)
    if not fresh:
        return parent_id
    for child in plan["children"]:
        child_key = {**key, TAG_KIND: "trial", TAG_TRIAL: child["tags"][TAG_TRIAL]}
        child_id, _uri, child_fresh = log_run(client, experiment, child, child_key, timestamp, parent=parent_id)
        if child_fresh:
            finish_run(client, child_id, child["status"], timestamp)
    for path, data in plan["artifacts"].items():
        client.upload(artifact_uri, path, data)
    if plan.get("figure_uri") and read_bytes is not None:
        client.upload(artifact_uri, "test_error_vs_learning_rate.png", read_bytes(plan["figure_uri"]))
    finish_run(client, parent_id, plan["parent"]["status"], timestamp)
    return parent_id


def _model_versions(client: TrackingClient, name: str) -> dict[str, dict[str, Any]]:
    """MLflow's versions of a registered model, by the registry version they name (tag ``sparktf.version``)."""
    found, token = {}, None
    while True:
        body = {"filter": f"name = {_quoted(name)}", "max_results": 200, **({"page_token": token} if token else {})}
        page = client.call("GET", "model-versions/search", body)
        for version in page.get("model_versions") or []:
            tags = {t["key"]: t["value"] for t in version.get("tags") or []}
            if TAG_VERSION in tags:
                found.setdefault(tags[TAG_VERSION], version)
        token = page.get("next_page_token")
        if not token:
            return found


def register_version(client: TrackingClient, metadata: dict[str, Any], run_id: str | None) -> str:
    """The MLflow model version naming registry version ``metadata`` (created once); returns its MLflow number."""
    request = model_version_request(metadata, run_id)
    name = request["name"]
    if client.call("GET", "registered-models/get", {"name": name}, missing_ok=True) is None:
        client.call("POST", "registered-models/create", {"name": name, "description": "Mirrors the sparktf S3 registry (the source of truth)."})
    existing = _model_versions(client, name).get(str(metadata["version"]))
    if existing is not None:
        return existing["version"]
    return client.call("POST", "model-versions/create", request)["model_version"]["version"]


def sync_champion_alias(client: TrackingClient, models_uri: str, name: str) -> str | None:
    """Point MLflow's ``champion`` alias at the version the S3 champion pointer names (S3 decides).

    Returns:
        The registry version now aliased, or None when S3 has no champion.
    """
    from sparktf import registry

    pointer = registry.read_champion(models_uri, name)
    if pointer is None:
        return None
    metadata = registry.resolve(models_uri, name, pointer["version"])
    # A version this run exported is registered (with its run) by the step before; an older one without.
    number = register_version(client, {**metadata, "name": name}, None)
    # The registered model lists its aliases (asking for a missing alias is a 400, not a 404).
    model = client.call("GET", "registered-models/get", {"name": name})["registered_model"]
    current = {a["alias"]: a["version"] for a in model.get("aliases") or []}.get(CHAMPION_ALIAS)
    if current != number:
        client.call("POST", "registered-models/alias", {"name": name, "alias": CHAMPION_ALIAS, "version": number})
    return str(pointer["version"])


def outcome(settings: dict[str, Any], steps: list[tuple[str, Any]]) -> dict[str, Any]:
    """Run the steps in order; the first MLflow failure stops them and names what was not logged.

    Args:
        settings: :func:`tracking_settings`.
        steps: ``(what, callable taking the client)``; ``what`` is how the note names it.
    """
    result: dict[str, Any] = {"tracking_uri": shown_uri(settings["uri"]), "logged": [], "not_logged": [], "error": None}
    client = TrackingClient(settings["uri"], settings["auth"])
    for index, (what, step) in enumerate(steps):
        try:
            value = step(client)
        except Exception as err:  # noqa: BLE001 - MLflow (or reading what to log) never fails the run
            result["not_logged"] = [name for name, _ in steps[index:]]
            result["error"] = str(err) if isinstance(err, MlflowUnavailable) else f"{type(err).__name__}: {str(err)[:200]}"
            log.warning("MLflow: %s not logged: %s", ", ".join(result["not_logged"]), err)
            return result
        result["logged"].append(what)
        if value is not None:  # the MLflow run id, model version number, aliased version
            result.setdefault("ids", {})[what] = value
    return result


def tuning_steps(*, run_id: str, params: dict[str, Any], prepared: dict, tune: dict, export: dict, timestamp: int) -> list[tuple[str, Any]]:
    """The steps of a tuning run's logging (results.json and the figure are read from S3 here, the driver side)."""
    from sparktf import storage

    state: dict[str, Any] = {}
    models_uri = params["workspace_uri"] + "/models/"

    def log_tuning(client: TrackingClient) -> str:
        results = storage.read_json(tune["results_uri"])
        plan = tuning_plan(run_id=run_id, params=params, prepared=prepared, tune=tune, results=results, timestamp=timestamp)
        state["run"] = log_plan(client, plan, run_id, timestamp, storage.read_bytes)
        return state["run"]

    def log_version(client: TrackingClient) -> str:
        from sparktf import registry

        metadata = registry.resolve(models_uri, params["model_name"], export["version"])
        return register_version(client, {**metadata, "name": params["model_name"]}, state.get("run"))

    steps = [(f"tuning run and {tune.get('trials', 0)} trials", log_tuning)]
    if export:
        steps.append((f"model version {export['version']}", log_version))
    steps.append(("champion alias", lambda client: sync_champion_alias(client, models_uri, params["model_name"])))
    return steps


def nightly_steps(*, run_id: str, summary: dict[str, Any], timestamp: int) -> list[tuple[str, Any]]:
    plan = nightly_plan(run_id=run_id, summary=summary, timestamp=timestamp)
    return [(f"nightly run {summary.get('date')}", lambda client: log_plan(client, plan, run_id, timestamp))]


def register_steps(*, params: dict[str, Any], registered: dict[str, Any]) -> list[tuple[str, Any]]:
    """The steps of a register_model run's logging: the imported version, then the champion alias (moved or not, S3 decides)."""
    models_uri, name = params["workspace_uri"] + "/models/", params["model_name"]

    def log_version(client: TrackingClient) -> str:
        from sparktf import registry

        metadata = registry.resolve(models_uri, name, registered["version"])
        return register_version(client, {**metadata, "name": name}, None)

    steps = [(f"model version {registered['version']}", log_version)] if registered.get("registered") else []
    steps.append(("champion alias", lambda client: sync_champion_alias(client, models_uri, name)))
    return steps


def run_task(kind: str) -> dict[str, Any]:
    """The DAGs' ``mlflow`` task: skipped without MLflow configured; never raises for MLflow's sake."""
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowSkipException

    settings = tracking_settings()
    if settings is None:
        raise AirflowSkipException(f"MLflow not configured (no {CONN_ID} connection, no {ENV_URI})")
    from sparktf.airflow import aws_connection

    aws_connection.use_connection()
    context = get_current_context()
    ti, dag_run = context["ti"], context["dag_run"]
    timestamp = int(dag_run.run_after.timestamp() * 1000)  # deterministic: a retry logs the same rows
    if kind == "tuning":
        pull = lambda task_id: ti.xcom_pull(task_ids=task_id) or {}
        steps = tuning_steps(
            run_id=ti.run_id,
            params=dict(context["params"]),
            prepared=pull("prepare_data"),
            tune=pull("tune"),
            export=pull("export_best_model"),
            timestamp=timestamp,
        )
    elif kind == "register":
        steps = register_steps(params=dict(context["params"]), registered=ti.xcom_pull(task_ids="check_registered") or {})
    else:
        steps = nightly_steps(run_id=ti.run_id, summary=ti.xcom_pull(task_ids="publish") or {}, timestamp=timestamp)
    result = outcome(settings, steps)
    print(f"MLflow at {result['tracking_uri']}: logged {result['logged'] or 'nothing'}; not logged {result['not_logged'] or 'nothing'}")
    return result
