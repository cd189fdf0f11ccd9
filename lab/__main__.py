"""``python -m lab run [pytest args]``: boot the kernel lab once, run the kernel_lab tests."""

import sys

from lab.vm import main

sys.exit(main())
