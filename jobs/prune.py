"""Entry point: `python jobs/prune.py [...]` locally, or under `ray job submit -- python jobs/prune.py [...]`.

The repository root goes first on the import path, so a `ray job submit --working-dir .`
runs the uploaded code even where an older rayprune is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
