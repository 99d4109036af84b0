"""Create the workspace bucket and upload the shipped demo data set (MNIST subset) into it.

Usage: python scripts/seed_demo.py   (uses the aws_default settings of scripts/env.sh)
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def client():
    import boto3

    conn = json.loads(os.environ["AIRFLOW_CONN_AWS_DEFAULT"])
    return boto3.client("s3", endpoint_url=conn["extra"]["endpoint_url"], region_name=conn["extra"]["region_name"],
                        aws_access_key_id=conn["login"], aws_secret_access_key=conn["password"])


def ensure_bucket(s3, bucket: str) -> None:
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


def main() -> int:
    workspace = os.environ.get("SPARKTF_WORKSPACE_URI", "s3://ml-pipeline")
    bucket, _, prefix = workspace[len("s3://"):].partition("/")
    s3 = client()
    ensure_bucket(s3, bucket)
    source = os.path.join(ROOT, "data", "demo", "mnist")
    key_prefix = "/".join(p for p in (prefix, "datasets/mnist-demo") if p)
    for name in sorted(os.listdir(source)):
        if name.endswith(".gz"):
            with open(os.path.join(source, name), "rb") as fh:
                s3.put_object(Bucket=bucket, Key=f"{key_prefix}/{name}", Body=fh.read())
    print(f"demo data set uploaded to s3://{bucket}/{key_prefix}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
