"""The Airflow side of the package: shared DAG settings, the Spark job operator, and the mapping
of the ``aws_default`` connection to :class:`sparktf.storage.StorageSettings`.

Imported by the DAG files and by their tasks, never by code on executors (the operator leaves
this subpackage out of the ``--py-files`` zip).
"""
