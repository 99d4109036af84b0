"""Airflow loads plugins from the top level of this folder (``sparktf/`` is in .airflowignore).

The ``sparktf`` plugin (run notes and figures): see :mod:`sparktf.airflow.ui_plugin`.
"""

from __future__ import annotations

from sparktf.airflow.ui_plugin import SparktfPlugin

__all__ = ["SparktfPlugin"]
