"""The benchmark scripts' modules, imported as the scripts import each other (``bench/`` first on the path)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType

import pytest

from sparktf_dev.testing import ROOT


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], ModuleType]:
    """``bench_module("bench_tuning_scaling")``: ``bench/<name>.py`` as a module (its imports of ``_harness`` and siblings resolve)."""

    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(ROOT / "bench"))

    return load
