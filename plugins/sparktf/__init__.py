"""Library shared by the Spark jobs (shipped to executors as a zip) and the Airflow side.

Nothing here imports Airflow; heavy modules (TensorFlow, PySpark, boto3, Pillow) are imported
inside the functions that need them, so the DAG files can import the light parts cheaply.
"""

__version__ = "0.1.0"
