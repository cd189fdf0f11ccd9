"""``python -m lab run [pytest args]``: boot the kernel lab once, run the kernel_lab tests.

``python -m lab exec [--timeout S] -- CMD ...``: boot it once, run CMD (a benchmark) and return its exit code.
"""

import sys

from lab.vm import main

sys.exit(main())
