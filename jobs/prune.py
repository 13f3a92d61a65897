"""Entry point for `python jobs/prune.py` (and, later, `ray job submit -- python jobs/prune.py`)."""

import sys

from rayprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
