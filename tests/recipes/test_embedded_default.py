"""`python recipes/finetune.py` with no overrides: the embedded default trains and says where it wrote."""

from __future__ import annotations

import pytest

from tests.helpers import eval_losses, recipe_env, run_recipe


@pytest.mark.slow
def test_embedded_default_run(tmp_path):
    out = tmp_path / "default"
    # output_dir only redirects the files; every training setting is the shipped default.
    proc = run_recipe("finetune", f"output_dir={out}", env=recipe_env(tmp_path), timeout=400)
    losses = eval_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses
    assert f"final model:  {out / 'final'}" in proc.stdout
    assert "eval loss:" in proc.stdout
    assert (out / "final" / "config.json").is_file() and (out / "loss_curve.png").is_file()
