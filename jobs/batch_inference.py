"""spark-submit entry point of :mod:`sparktf.jobs.batch_inference` (its docstring has the usage).

The code reaches the driver and the executors as the operator's ``--py-files`` zip of ``sparktf``.
"""

import sys

from sparktf.jobs.batch_inference import main

if __name__ == "__main__":
    sys.exit(main())
