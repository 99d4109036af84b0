"""S3 settings on the Airflow side: the ``aws_default`` connection mapped to the storage layer.

The connection may carry ``login``/``password`` (access key id / secret) and, in its extra,
``endpoint_url`` and ``region_name`` (as the Amazon provider's AWS connection does). Without the
connection, boto3's own chain applies (environment, profile, instance role). This module only
maps; every S3 call goes through :mod:`sparktf.storage`.

A connection given as an ``AIRFLOW_CONN_<ID>`` variable that does not parse is refused with a
message naming it (:class:`ConnectionUnusable`): Airflow itself reports it as "isn't defined",
and the Spark provider quietly falls back to YARN.
"""

from __future__ import annotations

import json
import os

from sparktf import storage


class ConnectionUnusable(ValueError):
    """A connection is missing or its ``AIRFLOW_CONN_<ID>`` value cannot be parsed (the message names it)."""


def env_variable(conn_id: str) -> str:
    """The environment variable Airflow reads a connection from (``AIRFLOW_CONN_<ID>``)."""
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def parse_problem(conn_id: str) -> str | None:
    """Why the connection's ``AIRFLOW_CONN_<ID>`` value is unusable, or None (unset, a URI, or valid JSON).

    The message names the variable and the parse error, never the value (it holds secrets).
    """
    name = env_variable(conn_id)
    value = os.environ.get(name)
    if value is None or not value.lstrip().startswith("{"):
        return None  # unset, or a connection URI (Airflow parses those leniently)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        return (
            f"{name} is not valid JSON ({error.msg} at character {error.pos} of {len(value)}); "
            "unset it and source scripts/env.sh again, or fix the value"
        )
    if not isinstance(parsed, dict) or not parsed.get("conn_type"):
        return f"{name} is not a JSON object with a conn_type"
    return None


def unusable_message(conn_id: str) -> str:
    """What to tell the user when Airflow cannot load ``conn_id``."""
    problem = parse_problem(conn_id)
    if problem:
        return f"connection {conn_id!r} cannot be read: {problem}"
    return (
        f"connection {conn_id!r} is not defined: define it in Airflow (Admin > Connections, "
        f"`airflow connections add`) or as {env_variable(conn_id)} (scripts/env.sh does)"
    )


def storage_settings(conn_id: str = "aws_default") -> storage.StorageSettings:
    """The connection's endpoint, region and credentials (empty settings if it does not exist).

    Raises:
        ConnectionUnusable: ``AIRFLOW_CONN_<ID>`` is set but does not parse (falling back to
            boto3's own chain would send the pipeline's requests to another store).
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        if parse_problem(conn_id):
            raise ConnectionUnusable(unusable_message(conn_id)) from None
        return storage.StorageSettings()
    return settings_of(conn.login, conn.password, conn.extra_dejson)


def settings_from_environment(conn_id: str = "aws_default") -> storage.StorageSettings:
    """The settings of ``AIRFLOW_CONN_<ID>`` (a JSON connection), for scripts that run outside Airflow.

    Raises:
        ConnectionUnusable: the variable is unset or does not parse (the message names it).
    """
    name = env_variable(conn_id)
    if name not in os.environ:
        raise ConnectionUnusable(f"connection {conn_id!r} is not defined: {name} is not set (source scripts/env.sh first)")
    problem = parse_problem(conn_id)
    if problem:
        raise ConnectionUnusable(f"connection {conn_id!r} cannot be read: {problem}")
    return settings_from_json(os.environ[name])


def settings_from_json(text: str) -> storage.StorageSettings:
    """The settings of a connection given as JSON (an ``AIRFLOW_CONN_AWS_DEFAULT`` value)."""
    conn = json.loads(text)
    return settings_of(conn.get("login"), conn.get("password"), conn.get("extra"))


def settings_of(login: str | None, password: str | None, extra: dict | None) -> storage.StorageSettings:
    extra = extra or {}
    service = (extra.get("service_config") or {}).get("s3") or {}
    return storage.StorageSettings(
        endpoint_url=extra.get("endpoint_url") or service.get("endpoint_url") or None,
        region_name=extra.get("region_name") or None,
        aws_access_key_id=login or extra.get("aws_access_key_id") or None,
        aws_secret_access_key=password or extra.get("aws_secret_access_key") or None,
        aws_session_token=extra.get("aws_session_token") or None,
    )


def use_connection(conn_id: str = "aws_default") -> storage.StorageSettings:
    """Make the connection's settings this process's storage default (call at the top of a task)."""
    settings = storage_settings(conn_id)
    storage.configure(settings)
    return settings
