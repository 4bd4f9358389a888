"""2-rank FSDP2 DPO equals single-process DPO on the same global batch (loss, grad norm, rewards)."""

from __future__ import annotations

import pytest

from tests.helpers import COMMON, launch_command, read_metrics, recipe_env, run_command, run_recipe_here, strategy_of

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TOLERANCE = 1e-4
STEPS = 6
DPO = [
    *[o for o in COMMON if not o.startswith("trainer.max_steps")],
    f"trainer.max_steps={STEPS}",
    "data.seq_len=128",
    "data.eval_files=[]",
]


def _run(tmp_path, name: str, overrides: list[str]):
    """The dpo recipe: strategy=single in this process, strategy=fsdp through launch/torchrun.sh."""
    out = tmp_path / name
    if strategy_of(overrides) == "single":
        run_recipe_here("dpo", *DPO, *overrides, f"output_dir={out}", env=recipe_env(tmp_path))
        return _rows(out)
    cmd, env = launch_command(out, overrides, recipe_env(tmp_path), common=DPO)
    script = [i for i, a in enumerate(cmd) if str(a).endswith("finetune.py")][0]
    cmd[script] = str(cmd[script]).replace("finetune.py", "dpo.py")  # the same launchers, the dpo recipe
    run_command(cmd, env=env, timeout=600)
    return _rows(out)


def _rows(out):
    return {r["step"]: r for r in read_metrics(out) if "loss" in r and "eval_loss" not in r}


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_fsdp_dpo_matches_single(tmp_path, peft):
    """LoRA: the reference is the model with adapters off; none: the stored reference (each run its own)."""
    from persimmon_train.data import demo_assets

    pairs = tmp_path / "pairs.jsonl"  # 200 demo pairs: the full-FT reference pass reads every row once
    with open(demo_assets().preference_train_files[0], encoding="utf-8") as f:
        pairs.write_text("".join(f.readlines()[:200]))
    extra = [f"data.train_files=[{pairs}]", f"peft={peft}"] + (["peft.dropout=0.0"] if peft == "lora" else [])
    single = _run(tmp_path, "single", ["strategy=single", *extra, "trainer.micro_batch_size=8"])
    fsdp = _run(tmp_path, "fsdp", ["strategy=fsdp", *extra, "trainer.micro_batch_size=4"])
    assert sorted(single) == sorted(fsdp) == list(range(1, STEPS + 1))
    for step in single:
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert abs(single[step][key] - fsdp[step][key]) <= TOLERANCE * max(1.0, abs(single[step][key])), (
                step,
                key,
                single[step][key],
                fsdp[step][key],
            )
    assert single[STEPS]["loss"] < single[1]["loss"]  # it trained
