"""The development harness of ``sparktf``: what tests, benchmarks and scripts share, kept out of the library.

* :mod:`sparktf_dev.testing`: local S3 server, local Spark, ports and waits, landing MNIST and
  images, registering a small model, running a DAG, the DAG-test helpers.
* :mod:`sparktf_dev.faults`: a fault-injecting HTTP proxy in front of the S3 server.

Installed (editable) by ``scripts/setup.sh``; never imported by the library or shipped to executors.
"""
