"""Land demo images for the nightly inference DAG: ~50 MNIST test digits as PNG files under
``<workspace>/incoming/<YYYY-MM-DD>/`` for two dates (nested folders, spaces and non-ASCII in some
names), plus 2 corrupt files that the job must set aside with their reason.

Usage: python scripts/seed_incoming.py [--dates 2026-11-20,2026-11-21] [--per-date 25]
(uses the aws_default settings of scripts/env.sh; safe to run again: same keys, same bytes)
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

from seed_demo import ROOT, client, ensure_bucket


def names(n: int, date: str) -> str:
    """A few layouts an uploader might use."""
    if n % 5 == 1:
        return f"scanner 2/{date} batch/scan {n:03d}.png"
    if n % 5 == 3:
        return f"bureau-é/chiffre_{n:03d}_ü.png"
    return f"camera-{n % 2}/{n:04d}.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dates", default="2026-11-20,2026-11-21", help="comma list of partition dates")
    parser.add_argument("--per-date", type=int, default=25, help="digits landed per date")
    args = parser.parse_args(argv)

    from sparktf import idx
    from sparktf.images import encode_png

    workspace = os.environ.get("SPARKTF_WORKSPACE_URI", "s3://ml-pipeline")
    bucket, _, prefix = workspace[len("s3://"):].partition("/")
    s3 = client()
    ensure_bucket(s3, bucket)
    with open(os.path.join(ROOT, "data", "demo", "mnist", "t10k-images-idx3-ubyte.gz"), "rb") as fh:
        digits = idx.parse_idx(gzip.decompress(fh.read()))
    dates = [d.strip() for d in args.dates.split(",") if d.strip()]
    for d, date in enumerate(dates):
        base = "/".join(p for p in (prefix, "incoming", date) if p)
        for n in range(args.per_date):
            png = encode_png(digits[d * args.per_date + n])
            s3.put_object(Bucket=bucket, Key=f"{base}/{names(n, date)}", Body=png)
        count = args.per_date
        if d == 0:  # two files that are not usable images
            s3.put_object(Bucket=bucket, Key=f"{base}/camera-0/cut off.png", Body=png[: len(png) // 2])
            s3.put_object(Bucket=bucket, Key=f"{base}/camera-1/upload-error.png",
                          Body=b"<html><body>413 Request Entity Too Large</body></html>")
            count += 2
        print(f"{count} files landed under s3://{bucket}/{base}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
