"""Frozen weights held in bf16 (parallel/frozen_weights.py) change no number of a bf16 LoRA run.

The reference is the same run with float32 storage of the frozen base (`hold_frozen_for` turned
off): autocast rounds each matrix to bf16 before every matmul either way, and the embedding's rows
are upcast as they are looked up, so over a bf16 checkpoint the two runs are bit-identical. Over a
float16 checkpoint the stored bf16 embedding rows are the fp16 values rounded to bf16, where the
float32 run looks up the exact fp16 values: equal to bf16 rounding, not to the bit.
"""

from __future__ import annotations

import pytest
import torch

from persimmon_train.parallel import SingleDeviceStrategy
from persimmon_train.parallel.frozen_weights import hold_frozen_in
from tests.helpers import lora_steps_from_folder, tiny_model


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"base_{request.param}")
    tiny_model(seed=3).to(getattr(torch, request.param)).save_pretrained(folder)
    return request.param, folder


def _run(folder, monkeypatch, hold: bool):
    if not hold:  # today's float32 storage of the frozen base: the reference
        monkeypatch.setattr("persimmon_train.parallel.single.hold_frozen_for", lambda model, precision: 0)
    strategy = SingleDeviceStrategy(precision="bf16", device="cpu", model_path=str(folder), seed=0)
    result = lora_steps_from_folder(strategy, folder)
    monkeypatch.undo()
    return result


def test_bf16_frozen_base_equals_float32_storage(base, monkeypatch):
    dtype, folder = base
    ref_losses, ref_trained, ref_dtypes = _run(folder, monkeypatch, hold=False)
    losses, trained, dtypes = _run(folder, monkeypatch, hold=True)
    assert set(ref_dtypes.values()) == {torch.float32}
    if dtype == "bfloat16":
        assert losses == ref_losses
        for name, value in ref_trained.items():
            assert torch.equal(trained[name], value), name
    else:
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        assert rel < 2e-3, (losses, ref_losses)
    assert losses[-1] < losses[0]  # it trained


def test_what_a_bf16_lora_run_holds(base, monkeypatch):
    _, folder = base
    _, _, dtypes = _run(folder, monkeypatch, hold=True)
    for name, got in dtypes.items():
        if ".lora_" in name:
            assert got == torch.float32, name  # trainable: float32 masters
        elif name.endswith(("layernorm.weight", "layernorm.bias", ".bias")):
            assert got == torch.float32, name  # small 1-D frozen tensors
        else:
            assert got == torch.bfloat16, name  # frozen matrices: embedding, base layers, lm_head
    assert any(name.endswith("embed_tokens.weight") for name in dtypes)


def test_fp32_runs_and_full_finetuning_keep_float32():
    model = tiny_model()
    for p in model.model.layers.parameters():
        p.requires_grad_(False)  # a frozen body
    assert hold_frozen_in(model, torch.bfloat16) == 8  # 2 layers x 4 matrices; 1-D tensors stay
    assert model.lm_head.weight.dtype == torch.float32  # still trainable
    assert model.model.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.dense_h_to_4h.bias.dtype == torch.float32
    full = tiny_model()
    assert hold_frozen_in(full, torch.bfloat16) == 0
    assert {p.dtype for p in full.parameters()} == {torch.float32}


def test_a_cpu_process_maps_large_blocks_before_it_builds_anything(monkeypatch):
    """On CPU, tensors of 1 MiB and more go back to the OS when freed (glibc's heap would keep their
    holes resident: bench/persimmon_8b.py --layers 8 peaks 0.45 GiB lower); set before the tokenizer,
    data and weights are built. Not for a GPU process: its tensors are device memory."""
    from types import SimpleNamespace

    from persimmon_train.storage import safetensors_io
    from persimmon_train.training import builders, run

    events = []
    monkeypatch.setattr(safetensors_io, "map_large_blocks", lambda threshold=1 << 20: events.append("map"))

    def first_build_step(cfg):
        events.append("tokenizer")
        raise LookupError("stop here")

    monkeypatch.setattr(builders, "build_tokenizer", first_build_step)
    for device, expected in (("cpu", ["map", "tokenizer"]), ("cuda", ["tokenizer"])):
        events.clear()
        with pytest.raises(LookupError, match="stop here"):
            run.build(None, SimpleNamespace(device=torch.device(device)), training=True)
        assert events == expected, device
