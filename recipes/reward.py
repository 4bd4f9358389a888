"""Reward model: `python recipes/reward.py data.train_files=[...] [key=value ...]`
(the same as `persimmon-train reward ...`).

A thin entry point: the recipe lives in persimmon_train/recipes/reward.py, inside the package, so an
installed wheel has it too.
"""

import sys
from pathlib import Path

# Run this checkout's package, not whatever copy of persimmon_train is installed elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persimmon_train.recipes.reward import main, run  # noqa: E402,F401

if __name__ == "__main__":
    run()
