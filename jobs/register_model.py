"""spark-submit entry point of :mod:`sparktf.jobs.register_model` (its docstring has the usage).

The code reaches the driver and the executors as the operator's ``--py-files`` zip of ``sparktf``.
"""

import sys

from sparktf.jobs.register_model import main

if __name__ == "__main__":
    sys.exit(main())
