"""Config errors exit 2 with ONE line naming the key and no traceback (the recipe's command, in-process)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import assert_one_line_error, run_in_process


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
def test_config_error_is_one_line(tmp_path, job, overrides, key, monkeypatch):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RANK", raising=False)
    overrides = [o.replace("OUT", str(tmp_path / "out")) for o in overrides]
    assert_one_line_error(run_in_process(job, *overrides), key)


def test_local_rank_argument_is_accepted(monkeypatch):
    """The deepspeed launcher appends --local_rank=N; it must not reach Hydra (it becomes LOCAL_RANK)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ran = run_in_process("finetune", "--print-config", "--local_rank=0", "trainer.max_steps=7")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "max_steps: 7" in ran.stdout and os.environ["LOCAL_RANK"] == "0"
