"""Config errors exit 2 with ONE line naming the key and no traceback (real recipe processes)."""

from __future__ import annotations

import pytest

from tests.helpers import recipe_env, run_recipe


@pytest.mark.parametrize(
    "job, overrides, key",
    [
        ("finetune", ["trainer.max_stepz=3"], "trainer.max_stepz"),  # unknown key
        ("finetune", ["+trainer.foo=1"], "trainer.foo"),  # unknown key added with +
        ("finetune", ["trainer.max_steps=many"], "trainer.max_steps"),  # wrong type
        ("finetune", ["peft=lora", "peft.r=0"], "peft.r"),
        ("finetune", ["data.seq_len=4096"], "data.seq_len"),  # tiny has 512 positions, no rope scaling
        ("classify", ["model=persimmon_8b", "data.train_files=[x.jsonl]"], "model.path"),
        ("finetune", ["resume=/does/not/exist", "output_dir=OUT"], "resume"),
    ],
)
def test_config_error_is_one_line(tmp_path, job, overrides, key):
    overrides = [o.replace("OUT", str(tmp_path / "out")) for o in overrides]
    proc = run_recipe(job, *overrides, env=recipe_env(tmp_path), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert key in errors[0], errors[0]


def test_local_rank_argument_is_accepted(tmp_path):
    """The deepspeed launcher appends --local_rank=N; it must not reach Hydra."""
    proc = run_recipe(
        "finetune", "--print-config", "--local_rank=0", "trainer.max_steps=7", env=recipe_env(tmp_path), timeout=120
    )
    assert "max_steps: 7" in proc.stdout
