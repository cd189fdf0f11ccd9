"""``python -m agent``: the node agent's command line (see agent.cli)."""

import sys

from agent.cli import main

sys.exit(main())
