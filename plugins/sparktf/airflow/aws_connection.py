"""S3 settings on the Airflow side: the ``aws_default`` connection mapped to the storage layer.

The connection may carry ``login``/``password`` (access key id / secret) and, in its extra,
``endpoint_url`` and ``region_name`` (as the Amazon provider's AWS connection does). Without the
connection, boto3's own chain applies (environment, profile, instance role). This module only
maps; every S3 call goes through :mod:`sparktf.storage`.
"""

from __future__ import annotations

from sparktf import storage


def storage_settings(conn_id: str = "aws_default") -> storage.StorageSettings:
    """The connection's endpoint, region and credentials (empty settings if it does not exist)."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        return storage.StorageSettings()
    return settings_of(conn.login, conn.password, conn.extra_dejson)


def settings_from_json(text: str) -> storage.StorageSettings:
    """The settings of a connection given as JSON (an ``AIRFLOW_CONN_AWS_DEFAULT`` value), for
    scripts that run outside Airflow."""
    import json

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
