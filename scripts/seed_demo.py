"""Create the workspace bucket and upload the shipped demo data set (MNIST subset) into it.

Usage: python scripts/seed_demo.py   (uses the aws_default settings of scripts/env.sh)
"""

from __future__ import annotations

import os
import sys

from sparktf import storage
from sparktf.airflow import aws_connection
from sparktf_dev import testing


def use_local_stack() -> str:
    """Point the storage layer at the stack's aws_default settings; the workspace URI.

    An unset or unparsable ``AIRFLOW_CONN_AWS_DEFAULT`` stops the script with a message naming it.
    """
    try:
        storage.configure(aws_connection.settings_from_environment("aws_default"))
    except aws_connection.ConnectionUnusable as error:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: {error}") from None
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
