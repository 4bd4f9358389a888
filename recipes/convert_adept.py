"""Convert ADEPT's original release: `python recipes/convert_adept.py checkpoint=PATH tokenizer=PATH output_dir=OUT`
(the same as `persimmon-train convert-adept ...`).

A thin entry point: the recipe lives in persimmon_train/recipes/convert_adept.py, inside the package, so an
installed wheel has it too.
"""

import sys
from pathlib import Path

# Run this checkout's package, not whatever copy of persimmon_train is installed elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persimmon_train.recipes.convert_adept import USAGE, main, parse_args, run  # noqa: E402,F401

if __name__ == "__main__":
    run()
