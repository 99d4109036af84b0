"""Create the workspace bucket and upload the shipped demo data set (MNIST subset) into it.

Usage: python scripts/seed_demo.py   (uses the aws_default settings of scripts/env.sh)
"""

from __future__ import annotations

import os
import sys

from sparktf_dev import testing

from sparktf import storage
from sparktf.airflow.aws_connection import settings_from_json


def use_local_stack() -> str:
    """Point the storage layer at the stack's aws_default settings; the workspace URI."""
    storage.configure(settings_from_json(os.environ["AIRFLOW_CONN_AWS_DEFAULT"]))
    workspace = os.environ.get("SPARKTF_WORKSPACE_URI", "s3://ml-pipeline")
    storage.create_bucket(storage.parse_uri(workspace).bucket)
    return workspace


def main() -> int:
    workspace = use_local_stack()
    target = storage.join_uri(workspace, "datasets", "mnist-demo")
    testing.upload_files(testing.DEMO_MNIST_DIR, target, suffix=".gz")
    print(f"demo data set uploaded to {target}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
