"""FSDP and ZeRO-3 checkpoints of 2-rank CPU runs export to the weights of the single-process run.

The run's own final/ is exported from its last checkpoint by rank 0 after training (no gather), so
it must equal a later `recipes/export.py` of the same checkpoint bit for bit. The full fine-tuning
runs are the session's 2-rank runs (the `runs` fixture, tests/helpers.py JOBS: also the equality
and checkpoint tests' runs), launched here only when those tests did not run first.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.export.conftest import QUICK
from tests.helpers import REPO, STEPS, load_tensors, run_recipe_here

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _needs(strategy: str):
    """The strategy's checkpoint reader exists (a missing one is a failure, not a skip)."""
    from persimmon_train.storage.checkpoint_weights import READERS

    assert callable(READERS.get(strategy)), strategy


@pytest.mark.parametrize("strategy, job", [("fsdp", "fsdp"), ("deepspeed", "zero3")])
def test_sharded_checkpoint_exports_like_single(strategy, job, runs, tmp_path):
    """Full fine-tuning (every weight moves, so any difference between the strategies shows), 2 ranks
    x 4 rows against the single-process run's 1 x 8 rows. That run's export equals its final/ bit
    for bit (test_merged_export), so final/ stands for it here."""
    _needs(strategy)
    single_final = load_tensors(runs.get("single") / "final")
    out = runs.get(job)
    step = out / "checkpoints" / f"step_{STEPS}"
    assert json.loads((step / "manifest.json").read_text())["strategy"]["name"] == strategy
    exported = tmp_path / "export"
    ran = run_recipe_here("export", f"checkpoint={step}", f"output_dir={exported}", "dtype=fp32", env=runs.env)
    assert f"({strategy} checkpoint" in ran.stdout
    weights = load_tensors(exported)
    # Exactly what the sharded run itself gathered into final/ at the same step ...
    own_final = load_tensors(out / "final")
    assert sorted(weights) == sorted(own_final) == sorted(single_final)
    for name, tensor in own_final.items():
        assert torch.equal(weights[name], tensor), name
    # ... and the single-process run's weights up to reduction order (measured after 10 steps:
    # 5e-6 at most). k_layernorm.bias has an exactly-zero true gradient (softmax ignores a shift
    # shared by all keys), so AdamW turns float noise into lr-sized steps there (measured 1.6e-4):
    # compared loosely, as in tests/distributed/test_checkpoints.py.
    for name, tensor in single_final.items():
        atol = 1e-3 if "k_layernorm.bias" in name else 2e-5
        torch.testing.assert_close(weights[name], tensor, atol=atol, rtol=1e-4, msg=name)


LORA_JOB = [
    *QUICK,
    "peft=lora",
    "peft.r=4",
    "optim.lr=2e-2",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum_steps=1",
]


@pytest.mark.parametrize(
    "overrides", [["strategy=fsdp"], ["strategy=deepspeed", "strategy.stage=3"]], ids=["fsdp", "zero3"]
)
def test_two_rank_lora_run_writes_an_adapter_peft_loads(overrides, base_dir, tmp_path, export_env):
    """The run's adapter/ (any strategy, any world size), in the dtype it was trained in, gives in peft
    over transformers' Persimmon the logits of the run's merged final/."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "recipes" / "finetune.py"),
        *LORA_JOB,
        *overrides,
        f"model.path={base_dir}",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**export_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(".lora_A." in k for k in weights) and all(t.dtype == torch.float32 for t in weights.values())
    base = transformers.PersimmonForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = transformers.PersimmonForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(input_ids=ids)
        a, b = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (a - plain.logits).abs().max() > 1e-4  # training moved the adapter
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
