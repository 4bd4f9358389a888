"""finetune.py really runs: full and LoRA lower the eval loss; final/ loads in transformers with
logits equal to ours; W&B offline writes the logged metrics; metrics.jsonl, checkpoints, PNG."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from tests.helpers import FAST, eval_losses, read_metrics, recipe_env, run_recipe, run_recipe_here
from tests.recipes import wandb_reader

pytestmark = pytest.mark.slow  # real recipe runs: a child with W&B, the LoRA run and evaluate in this process

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


def _assert_final_matches_transformers(final_dir):
    transformers = pytest.importorskip("transformers")
    from persimmon_train.model import PersimmonForCausalLM

    assert os.path.isfile(os.path.join(final_dir, "tokenizer.model"))
    assert os.path.isfile(os.path.join(final_dir, "generation_config.json"))
    ours = PersimmonForCausalLM.from_pretrained(final_dir).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_full_finetune_with_wandb_offline(tmp_path):
    out = tmp_path / "full"
    env = recipe_env(tmp_path, WANDB_API_KEY=FAKE_KEY)
    run_recipe(
        "finetune",
        *FAST,
        "peft=none",
        "trainer.max_steps=30",
        "trainer.eval_every_n_steps=10",
        "trainer.eval_max_batches=4",
        "optim.lr=3e-3",
        "checkpoint.every_n_steps=15",
        "tracker=wandb",
        "tracker.mode=offline",
        "tracker.project=tests",
        "tracker.tags=[ci]",
        "trainer.peak_tflops=1.0",
        f"output_dir={out}",
        env=env,
    )
    losses = eval_losses(out)
    assert len(losses) == 4  # step 0, 10, 20, 30
    assert losses[-1] < losses[0] - 0.5, losses

    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    for key in ("lr", "grad_norm", "tokens_per_sec", "mfu", "peak_mem_gb"):
        assert all(key in r for r in train_rows), key
    assert sorted(os.listdir(out / "checkpoints")) == ["step_15", "step_30"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "config.yaml").read_text().count("peft") >= 1
    _assert_final_matches_transformers(str(out / "final"))

    # W&B offline: the run file holds what we logged.
    run_files = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    history = wandb_reader.history(run_files[0])
    logged = {r["_step"]: r for r in history}
    assert set(range(1, 31)) <= set(logged)
    assert logged[30]["loss"] == pytest.approx(train_rows[-1]["loss"])
    assert "eval_loss" in logged[30] and "mfu" in logged[30] and "lr" in logged[30]
    assert wandb_reader.config(run_files[0])["trainer"]["max_steps"] == 30
    # The API key never lands in our files or W&B's.
    for path in glob.glob(str(out / "**" / "*"), recursive=True) + glob.glob(
        str(tmp_path / "wandb_dir" / "**" / "*"), recursive=True
    ):
        if os.path.isfile(path) and not path.endswith((".safetensors", ".pt", ".png")):
            assert FAKE_KEY not in open(path, encoding="utf-8", errors="replace").read(), path


def test_lora_finetune_merges_into_final(tmp_path):
    out, env = tmp_path / "lora", recipe_env(tmp_path)
    run_recipe_here(  # in this process: the run's outputs are checked, not the process
        "finetune",
        *FAST,
        "peft=lora",
        "peft.r=8",
        "trainer.max_steps=30",
        "trainer.eval_every_n_steps=0",
        "trainer.eval_max_batches=4",
        "optim.lr=2e-2",
        "checkpoint.every_n_steps=30",
        f"output_dir={out}",
        env=env,
    )
    losses = eval_losses(out)
    assert losses[-1] < losses[0] - 0.3, losses  # LoRA over a random base learns slower than full
    assert os.path.isfile(out / "adapter" / "adapter_config.json")
    # Only the adapter is checkpointed for LoRA.
    from safetensors.torch import load_file

    names = list(load_file(str(out / "checkpoints" / "step_30" / "model.safetensors")))
    assert names and all("lora_" in n for n in names)
    _assert_final_matches_transformers(str(out / "final"))

    # evaluate on the exported folder reproduces the run's final eval loss.
    proc = run_recipe_here(
        "evaluate",
        "trainer.precision=fp32",
        "data.seq_len=64",
        "trainer.micro_batch_size=8",
        "trainer.eval_max_batches=4",
        f"model.path={out / 'final'}",
        f"output_dir={tmp_path / 'eval'}",
        env=env,
    )
    result = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert result["eval_loss"] == pytest.approx(losses[-1], rel=1e-4), proc.stdout
