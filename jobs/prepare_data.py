"""spark-submit entry point of :mod:`sparktf.jobs.prepare_data` (its docstring has the usage).

The code reaches the driver and the executors as the operator's ``--py-files`` zip of ``sparktf``.
"""

import sys

from sparktf.jobs.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
