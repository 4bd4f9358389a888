"""A LoRA run over a bfloat16 base, exported as float32: the merge is done in float32 on the
upcast base, exactly as peft's merge_and_unload on transformers' Persimmon loaded in float32
(peft is the oracle; merging in bf16 and casting afterwards loses the small LoRA delta)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from persimmon_train.export import export_checkpoint
from tests.export.conftest import _train, checkpoint_of
from tests.helpers import demo_tokenizer, load_tensors, tiny_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, export_env) -> Path:
    from persimmon_train.model import PersimmonForCausalLM

    tokenizer = demo_tokenizer(Path(export_env["PERSIMMON_TRAIN_CACHE"]) / "demo")
    path = tmp_path_factory.mktemp("base") / "tiny-bf16"
    torch.manual_seed(4321)
    model = PersimmonForCausalLM.from_config(tiny_config(tokenizer)).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_lora_run(tmp_path_factory, export_env, bf16_base) -> Path:
    return _train(
        tmp_path_factory,
        export_env,
        "finetune",
        "lora_bf16_base",
        "peft=lora",
        "peft.r=8",
        "peft.alpha=16",
        "optim.lr=2e-2",
        f"model.path={bf16_base}",
    )


def test_fp32_export_of_a_bf16_base_equals_peft_float32_merge(
    bf16_lora_run, bf16_base, tmp_path, monkeypatch, export_env
):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", export_env["PERSIMMON_TRAIN_CACHE"])
    assert all(t.dtype == torch.bfloat16 for t in load_tensors(bf16_base).values())
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    export_checkpoint(str(checkpoint_of(bf16_lora_run)), str(merged), dtype="fp32")
    export_checkpoint(str(checkpoint_of(bf16_lora_run)), str(adapter), dtype="fp32", merge=False)
    ours = load_tensors(merged)

    base = transformers.PersimmonForCausalLM.from_pretrained(bf16_base, dtype=torch.float32)
    oracle = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    assert sorted(ours) == sorted(oracle)
    changed = 0
    for name, want in oracle.items():
        assert ours[name].dtype == torch.float32, name
        torch.testing.assert_close(ours[name], want, atol=1e-7, rtol=1e-6, msg=name)
        changed += not torch.equal(want, want.to(torch.bfloat16).float())  # a delta bf16 cannot hold
    assert changed  # the adapter moved weights off the bf16 grid: a bf16 merge would be caught
