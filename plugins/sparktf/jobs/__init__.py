"""The spark-submit applications, importable for tests and benchmarks.

Each module has ``parse_args(argv)``, ``run(spark, args) -> dict`` (the job's JSON result) and
``main(argv)``; ``jobs/<name>.py`` in the repository is the file spark-submit runs.
"""
