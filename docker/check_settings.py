"""Refuse to start the compose stack with weak settings (docker-compose.yaml's ``check-settings`` service).

Usage: python3 check_settings.py   (reads the .env values from its environment)

``${VAR:?}`` in docker-compose.yaml only stops a variable that is unset or empty; this refuses
what it lets through: the ``change-me`` placeholders of .env.example, an empty or malformed Fernet
key, secrets too short to be random, values that would break the JSON connection strings or the
database URL they are put into, and one S3 access key shared by two roles (minio-init would attach
both roles' policies to it). Every other service waits for this one to complete successfully.
Each problem is printed on its own line, naming the variable, never its value; exit status 1.
Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import sys

PLACEHOLDER = "change-me"
SAFE_VALUE = re.compile(r"[A-Za-z0-9_-]+")  # put into URLs and JSON without escaping (see .env.example)
FERNET_KEY = "AIRFLOW_FERNET_KEY"
# name -> (minimum length, maximum length); the limits of MinIO keys are MinIO's own.
SECRETS = {
    "POSTGRES_PASSWORD": (16, 128),
    "AIRFLOW_ADMIN_PASSWORD": (12, 128),
    "AIRFLOW_JWT_SECRET": (32, 256),
    "AIRFLOW_API_SECRET_KEY": (32, 256),
    "SPARK_AUTH_SECRET": (32, 256),
    "MINIO_ROOT_PASSWORD": (16, 40),
    "S3_PIPELINE_SECRET_ACCESS_KEY": (16, 40),
    "S3_EXECUTOR_SECRET_ACCESS_KEY": (16, 40),
    "S3_REGISTRY_SECRET_ACCESS_KEY": (16, 40),
    "S3_MLFLOW_SECRET_ACCESS_KEY": (16, 40),
}
ACCESS_KEYS = {
    "MINIO_ROOT_USER": (3, 20),
    "S3_PIPELINE_ACCESS_KEY_ID": (3, 20),
    "S3_EXECUTOR_ACCESS_KEY_ID": (3, 20),
    "S3_REGISTRY_ACCESS_KEY_ID": (3, 20),
    "S3_MLFLOW_ACCESS_KEY_ID": (3, 20),
}
CHECKED = (*SECRETS, *ACCESS_KEYS, FERNET_KEY)
GENERATE = {
    FERNET_KEY: 'python3 -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"',
}


def fernet_problem(value: str) -> str | None:
    """Why ``value`` is not a Fernet key (32 bytes, URL-safe base64), or None."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}=", value):
        return "is not a Fernet key (44 characters of URL-safe base64)"
    try:
        if len(base64.urlsafe_b64decode(value)) != 32:
            return "is not a Fernet key (it must decode to 32 bytes)"
    except (binascii.Error, ValueError):
        return "is not a Fernet key (not URL-safe base64)"
    return None


def value_problem(name: str, value: str) -> str | None:
    """Why the value of variable ``name`` is refused, or None."""
    if not value:
        return "is empty"
    if PLACEHOLDER in value.lower():
        return f"is still the {PLACEHOLDER} placeholder of .env.example"
    if name == FERNET_KEY:
        return fernet_problem(value)
    if not SAFE_VALUE.fullmatch(value):
        return "may hold only letters, digits, '-' and '_' (it is put into URLs and JSON unescaped)"
    low, high = SECRETS.get(name) or ACCESS_KEYS[name]
    if not low <= len(value) <= high:
        return f"must be {low} to {high} characters long (it has {len(value)})"
    return None


def problems(env: dict[str, str]) -> list[str]:
    """Every refused setting of ``env``, one sentence each."""
    found = []
    for name in CHECKED:
        problem = value_problem(name, env.get(name, ""))
        if problem:
            hint = f"; generate one with {GENERATE[name]}" if name in GENERATE else "; e.g. `openssl rand -hex 16`" if name in SECRETS else ""
            found.append(f"{name} in .env {problem}{hint}")
    keys = [name for name in ACCESS_KEYS if env.get(name)]
    for n, name in enumerate(keys):
        for other in keys[n + 1 :]:
            if env[name] == env[other]:
                found.append(f"{name} and {other} in .env are the same key: each role needs its own MinIO user")
    return found


def main() -> int:
    found = problems(dict(os.environ))
    for problem in found:
        print(f"refusing to start: {problem}", file=sys.stderr)
    if found:
        print("Edit .env (see .env.example), then run `docker compose up -d` again.", file=sys.stderr)
        return 1
    print(f"settings checked: {len(CHECKED)} secrets and keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
