"""Land demo images for the nightly inference DAG: ~50 MNIST test digits as PNG files under
``<workspace>/incoming/<YYYY-MM-DD>/`` for two dates (nested folders, spaces and non-ASCII in some
names), plus 2 corrupt files that the job must set aside with their reason.

Usage: python scripts/seed_incoming.py [--dates 2026-11-20,2026-11-21] [--per-date 25]
(uses the aws_default settings of scripts/env.sh; safe to run again: same keys, same bytes)
"""

from __future__ import annotations

import argparse
import sys

from seed_demo import use_local_stack

from sparktf import storage
from sparktf.images import encode_png
from sparktf_dev import testing


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

    workspace = use_local_stack()
    _train_x, _train_y, digits, _labels = testing.read_mnist()
    dates = [d.strip() for d in args.dates.split(",") if d.strip()]
    for d, date in enumerate(dates):
        base = storage.join_uri(workspace, "incoming", date)
        for n in range(args.per_date):
            png = encode_png(digits[d * args.per_date + n])
            storage.write_bytes(storage.join_uri(base, names(n, date)), png)
        count = args.per_date
        if d == 0:  # two files that are not usable images
            storage.write_bytes(storage.join_uri(base, "camera-0/cut off.png"), png[: len(png) // 2])
            storage.write_bytes(storage.join_uri(base, "camera-1/upload-error.png"), b"<html><body>413 Request Entity Too Large</body></html>")
            count += 2
        print(f"{count} files landed under {base}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
