"""Preference tuning (DPO): `python recipes/dpo.py [key=value ...]`
(the same as `persimmon-train dpo ...`).

A thin entry point: every job lives inside the package (persimmon_train/recipes/__init__.py lists
them), so an installed wheel has it too.
"""

import sys
from pathlib import Path

# Run this checkout's package, not whatever copy of persimmon_train is installed elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persimmon_train.recipes.main import main  # noqa: E402

if __name__ == "__main__":
    main(["dpo", *sys.argv[1:]])
