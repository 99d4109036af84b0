"""The benchmarks' shared harness: every JSON result says what produced it."""

from __future__ import annotations

import json
import subprocess

from sparktf_dev.testing import ROOT


def test_benchmark_json_records_the_commit_and_the_package_versions(tmp_path, bench_module):
    _harness = bench_module("_harness")
    out = tmp_path / "nested" / "result.json"
    _harness.write_json(out, {"speedup": 1.9})
    written = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert written["speedup"] == 1.9
    assert written["provenance"]["commit"].split("+")[0] == head
    packages = written["provenance"]["packages"]
    assert packages["pyspark"]
    assert packages["keras"]
    assert packages["tensorflow-cpu"]
