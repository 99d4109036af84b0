"""S3 settings on the Airflow side, from the ``aws_default`` connection (or the standard AWS chain).

The connection may carry ``login``/``password`` (access key id / secret) and, in its extra,
``endpoint_url`` and ``region_name`` (as the Amazon provider's AWS connection does). Without the
connection, boto3's own chain applies (environment, profile, instance role).
"""

from __future__ import annotations

from typing import Any


def connection_settings(conn_id: str = "aws_default") -> dict[str, Any]:
    """Endpoint, region and credentials of the connection; empty if it does not exist."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        return {}
    extra = conn.extra_dejson or {}
    settings = {
        "endpoint_url": extra.get("endpoint_url") or (extra.get("service_config", {}).get("s3", {}) or {}).get("endpoint_url"),
        "region_name": extra.get("region_name"),
        "aws_access_key_id": conn.login or extra.get("aws_access_key_id"),
        "aws_secret_access_key": conn.password or extra.get("aws_secret_access_key"),
        "aws_session_token": extra.get("aws_session_token"),
    }
    return {k: v for k, v in settings.items() if v}


def s3_client(conn_id: str = "aws_default"):
    """A boto3 S3 client for the Airflow worker, configured from the connection."""
    import boto3
    from botocore.config import Config

    settings = connection_settings(conn_id)
    return boto3.session.Session().client(
        "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
        **settings,
    )


def job_environment(conn_id: str = "aws_default") -> dict[str, str]:
    """The standard AWS environment variables a Spark job needs to reach the same storage."""
    settings = connection_settings(conn_id)
    names = {
        "endpoint_url": "AWS_ENDPOINT_URL", "region_name": "AWS_DEFAULT_REGION",
        "aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "aws_session_token": "AWS_SESSION_TOKEN",
    }
    return {names[k]: str(v) for k, v in settings.items()}
