"""`python -m persimmon_train.recipes ...` is `persimmon-train ...` (no console script needed)."""

from persimmon_train.recipes.main import main

main()
