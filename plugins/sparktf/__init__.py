"""Library shared by the Spark jobs (shipped to executors as a zip) and the Airflow side.

Nothing at this level imports Airflow; heavy modules (TensorFlow, PySpark, boto3, Pillow) are
imported inside the functions that need them, so the DAG files can import the light parts cheaply.
"""

from __future__ import annotations

import os

__version__ = "0.2.0"

# Set by the submitting operator to the sha256 of the shipped sources (see sparktf.airflow).
CODE_SHA256_ENV = "SPARKTF_CODE_SHA256"
# A registered model's name (the registry's folder, the DAGs' Params): lower case, digits, '.', '_', '-'.
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def code_version() -> str:
    """Package version plus the hash of the shipped code (when submitted by the operator)."""
    shipped = os.environ.get(CODE_SHA256_ENV, "")
    return f"{__version__}+{shipped[:12]}" if shipped else __version__
