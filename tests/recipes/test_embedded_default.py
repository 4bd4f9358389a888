"""`persimmon-train finetune` with no overrides (the README's quickstart; `python recipes/finetune.py`
is the same command): the embedded default trains and says where it wrote. In this process: the run
is what is checked (tests/recipes/test_import_path.py and tests/cli/test_command.py check the files
and the console command themselves)."""

from __future__ import annotations

import pytest

from tests.helpers import eval_losses, recipe_env, run_recipe_here


@pytest.mark.slow  # a real run of the shipped default (in this process)
def test_embedded_default_run(tmp_path):
    out = tmp_path / "default"
    # output_dir only redirects the files; every training setting is the shipped default.
    proc = run_recipe_here("finetune", f"output_dir={out}", env=recipe_env(tmp_path))
    losses = eval_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses
    assert f"final model:  {out / 'final'}" in proc.stdout
    assert "eval loss:" in proc.stdout
    assert (out / "final" / "config.json").is_file() and (out / "loss_curve.png").is_file()
