"""QLoRA (peft.quantize_base=nf4), in process: NF4 itself against the QLoRA paper's code values, an
NF4 Linear under CPU autocast with peft's LoRA over it, the refusals, loading model.path one tensor
at a time into NF4, and a 4-step run: it trains, resumes bit-exactly, and its merged export (the
LoRA delta on model.path's original weights, loaded by transformers) gives the training model's
logits up to NF4's error. The 2-rank FSDP2 run is in tests/distributed/test_qlora_fsdp.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from persimmon_train.errors import ConfigError, WeightsError
from persimmon_train.parallel.nf4 import BLOCK_SIZE, is_nf4, nf4_api
from tests.helpers import demo_tokenizer, save_tiny_base, tiny_config

NF4Tensor, to_nf4 = nf4_api()

# Dettmers et al. 2023 (QLoRA), Appendix E: the 16 NormalFloat-4 values.
QLORA_CODES = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float64,
)
# Hidden 256 / intermediate 1024: every decoder matrix (and each half of it, for the 2-rank FSDP
# test) holds a multiple of 64 x 256 values, as torchao's double quantization needs.
SIZES = dict(hidden_size=256, intermediate_size=1024)


# ---------------------------------------------------------------------------- NF4 itself


def _codes(nf4) -> torch.Tensor:
    """The 4-bit code of every value, in order (two per byte, high nibble first)."""
    packed = nf4.quantized_data
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten().long()


def test_nf4_block_dequantizes_to_the_qlora_code_values_times_absmax():
    # A known block of 64 values (absmax 2.5): the 16 code values themselves and points 0.1, 0.25,
    # 0.75 (and for 3 gaps 0.9) of the way between neighbours, shuffled; then 255 blocks of other
    # scales so the double quantization (int8 absmaxes around their mean, blocks of 256) has a spread.
    lo, hi = QLORA_CODES[:-1], QLORA_CODES[1:]
    between = [lo + f * (hi - lo) for f in (0.1, 0.25, 0.75)] + [(lo + 0.9 * (hi - lo))[:3]]
    known = torch.cat([QLORA_CODES, *between]) * 2.5
    known = known[torch.randperm(BLOCK_SIZE, generator=torch.Generator().manual_seed(1))]
    others = torch.randn(255 * BLOCK_SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    others *= torch.linspace(0.2, 3.0, 255, dtype=torch.float64).repeat_interleave(BLOCK_SIZE)
    values = torch.cat([known, others]).float()
    nf4 = to_nf4(values.view(128, 128), BLOCK_SIZE, 256)

    blocks = values.double().view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax[:, None]
    nearest = (scaled[..., None] - QLORA_CODES).abs().argmin(dim=-1)
    # Each value's code is the nearest QLoRA value (precondition: no value of the known block sits
    # within 1e-3 of a midpoint between codes, where torchao's 4-decimal table could round the other way).
    midpoints = (QLORA_CODES[1:] + QLORA_CODES[:-1]) / 2
    assert (scaled[0, :, None] - midpoints).abs().min() > 1e-3
    codes = _codes(nf4).view(-1, BLOCK_SIZE)
    assert torch.equal(codes[0], nearest[0])
    assert sorted(set(codes[0].tolist())) == list(range(16))  # every code value is exercised
    assert (codes != nearest).float().mean() < 1e-3  # elsewhere: only near-midpoint ties may differ

    # By hand: code value x the block's absmax, the absmax double-quantized as the scheme says
    # (subtract the mean of all absmaxes, int8 round-to-nearest in blocks of 256 by their own absmax).
    mean = absmax.float().mean()
    centred = (absmax.float() - mean).view(-1, 256)
    factor = 256 / (2 * centred.abs().amax(dim=1, keepdim=True))
    dq_absmax = ((centred * factor).round().clamp(-128, 127) / factor).flatten() + mean
    by_hand = QLORA_CODES[codes].float() * dq_absmax[:, None]
    torchao = nf4.get_original_weight().view(-1, BLOCK_SIZE)
    # torchao's table rounds the code values to 4 decimals (|error| <= 5e-5 of absmax).
    assert torch.allclose(torchao, by_hand, rtol=0, atol=6e-5 * float(absmax.max()))
    # The double-quantized absmax is within one int8 step of the true one (half a step from
    # rounding; a full step where the largest, +128 steps, clamps to 127).
    step = 1 / factor.flatten().repeat_interleave(256)
    assert ((dq_absmax - absmax.float()).abs() <= step + 1e-6).all()
    # The known block against the true absmax: off by at most the absmax's rounding.
    err = (torchao[0].double() - QLORA_CODES[codes[0]] * absmax[0]).abs()
    assert (err <= QLORA_CODES[codes[0]].abs() * step[0] + 1e-4).all()


def test_nf4_linear_with_lora_under_cpu_autocast_matches_its_dequantized_bf16_weight():
    """peft's LoRA over an nn.Linear whose weight is an NF4 Parameter: under torch.autocast(cpu, bf16)
    the output is the one a plain bf16 weight (the dequantized values) gives, and backward reaches
    the input and both adapter matrices."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(256, 128, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(One(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B.default.weight.normal_()  # peft starts B at zero: no gradient would reach A
    layer.base_layer.weight = nn.Parameter(to_nf4(layer.base_layer.weight.detach().bfloat16()), requires_grad=False)
    dequantized = layer.base_layer.weight.get_original_weight()
    a, b = layer.lora_A.default.weight, layer.lora_B.default.weight

    x = torch.randn(3, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = F.linear(x_ref, dequantized) + F.linear(F.linear(x_ref, a_ref), b_ref) * 2.0
    y_ref.float().square().sum().backward()

    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    for got, want in ((x.grad, x_ref.grad), (a.grad, a_ref.grad), (b.grad, b_ref.grad)):
        assert torch.allclose(got, want, rtol=2e-2, atol=1e-2 * want.abs().max())
    assert layer.base_layer.weight.grad is None


# ---------------------------------------------------------------------------- refusals


def _load(overrides):
    from persimmon_train.cli import load_config

    return load_config("finetune", list(overrides))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["peft=none", "peft.quantize_base=nf4"], "peft.quantize_base"),
        (["peft=lora", "peft.quantize_base=int4"], "peft.quantize_base: 'int4' is not one of none, nf4"),
        (["peft=lora", "peft.quantize_base=nf4", "strategy=deepspeed", "strategy.stage=2"], "strategy=deepspeed"),
    ],
)
def test_quantize_base_refusals_in_the_config(overrides, words):
    with pytest.raises(ConfigError) as info:
        _load(overrides)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_nf4_refuses_a_float32_run_after_resolving_auto(monkeypatch):
    from persimmon_train.parallel import single

    with pytest.raises(ConfigError, match="nf4 needs bf16 compute but trainer.precision resolved to fp32"):
        single.SingleDeviceStrategy(precision="fp32", device="cpu", quantize_base="nf4")
    monkeypatch.setattr(single, "cpu_flags", lambda: set())  # a CPU without AMX: auto -> fp32
    with pytest.raises(ConfigError, match="resolved to fp32"):
        single.SingleDeviceStrategy(precision="auto", device="cpu", quantize_base="nf4")
    assert single.SingleDeviceStrategy(precision="bf16", device="cpu", quantize_base="nf4").precision == "bf16"


def test_nf4_refuses_a_matrix_it_cannot_block():
    from persimmon_train.parallel.nf4 import check_quantizable

    check_quantizable("ok", (128, 128), 1)
    with pytest.raises(WeightsError, match=r"layers.0.dense.weight has shape \[64, 64\]"):
        check_quantizable("layers.0.dense", (64, 64), 1)
    with pytest.raises(WeightsError, match="each of 2 shards"):
        check_quantizable("layers.0.dense", (128, 128), 2)


# ---------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tokenizer = demo_tokenizer()
    path = tmp_path_factory.mktemp("qlora") / "base"
    save_tiny_base(path, tokenizer, tiny_config(tokenizer, **SIZES), seed=7)
    return path


def _overrides(base: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "peft=lora",
        "peft.quantize_base=nf4",
        "peft.dropout=0.0",
        "trainer.precision=bf16",
        f"model.path={base}",
        "data.seq_len=64",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=4",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=0",
        "trainer.eval_max_batches=1",
        "trainer.progress_bar=false",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        f"output_dir={output_dir}",
        *extra,
    ]


def _training_model(cfg, monkeypatch=None):
    """What a run builds: meta model -> LoRA -> strategy=single (quantize while loading)."""
    from persimmon_train.parallel import SingleDeviceStrategy
    from persimmon_train.training import builders
    from persimmon_train.training.optim import build_optimizer

    tokenizer = builders.build_tokenizer(cfg)
    model = builders.prepare_for_training(builders.build_model(cfg, tokenizer, meta=True), cfg)
    strategy = SingleDeviceStrategy.from_run_config(cfg)
    model, _ = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
    return model, strategy


def test_loading_puts_each_frozen_decoder_matrix_in_nf4_one_tensor_at_a_time(base, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from persimmon_train.parallel import single
    from persimmon_train.parallel.sharded_load import file_name

    seen = {}
    real_load = single.load_into_meta_model

    def spy(model, *args, **kwargs):  # before loading: NF4 placeholders on meta, no bf16 matrices
        seen.update(
            {n: (p.is_meta, is_nf4(p)) for n, p in model.named_parameters() if n.endswith(".base_layer.weight")}
        )
        return real_load(model, *args, **kwargs)

    monkeypatch.setattr(single, "load_into_meta_model", spy)
    cfg = _load(_overrides(base, tmp_path / "unused"))
    model, _ = _training_model(cfg)
    assert len(seen) == 8 and all(meta and nf4 for meta, nf4 in seen.values()), seen

    original = load_file(str(base / "model.safetensors"))
    quantized = 0
    for name, param in model.named_parameters():
        source = original[file_name(name)] if file_name(name) in original else None
        if ".lora_" in name:
            assert param.requires_grad and param.dtype == torch.float32
        elif ".layers." in name and name.endswith(".weight") and param.ndim == 2:
            assert is_nf4(param) and not param.requires_grad, name
            expected = to_nf4(source.bfloat16())
            assert torch.equal(param.quantized_data, expected.quantized_data), name
            assert torch.equal(param.get_original_weight(), expected.get_original_weight()), name
            quantized += 1
        elif param.ndim == 2:  # embedding, lm_head: bf16 as frozen_weights.py holds them
            assert not is_nf4(param) and param.dtype == torch.bfloat16 and torch.equal(param, source.bfloat16())
        else:  # norms, biases
            assert param.dtype == torch.float32 and torch.equal(param, source), name
    assert quantized == 4 * 2  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h x 2 layers


def test_a_nan_in_a_matrix_bound_for_nf4_is_refused_naming_it(base, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.1.mlp.dense_h_to_4h.weight"][3, 5] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="model.layers.1.mlp.dense_h_to_4h.weight in .* holds NaN/Inf"):
        _training_model(_load(_overrides(broken, tmp_path / "unused")))


def test_a_random_init_base_is_quantized_from_its_bf16_values(tmp_path):
    """No model.path: the seeded init is built, held in bf16 and quantized; a step trains the adapters."""
    overrides = [o for o in _overrides(Path("unused"), tmp_path) if not o.startswith("model.path")]
    sizes = [f"model.{k}={v}" for k, v in SIZES.items()] + ["model.num_hidden_layers=1", "model.num_attention_heads=4"]
    cfg = _load([*overrides, *sizes])
    torch.manual_seed(0)
    model, strategy = _training_model(cfg)
    bases = {n: p for n, p in model.named_parameters() if n.endswith(".base_layer.weight")}
    assert len(bases) == 4 and all(is_nf4(p) and p.device.type == "cpu" for p in bases.values())
    ids = torch.randint(4, 500, (2, 32))
    with strategy.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora = [p for n, p in model.named_parameters() if ".lora_B." in n]  # A gets none while B is 0
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


# ---------------------------------------------------------------------------- a run


def _train(overrides):
    from persimmon_train.training.run import train

    return train(_load(overrides), "finetune")


def _losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def qlora_run(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora") / "run"
    _train(_overrides(base, out))
    return out


def test_qlora_trains_and_resumes_bit_exactly(qlora_run, base, tmp_path):
    from safetensors.torch import load_file

    losses = _losses(qlora_run)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1] - 0.3
    manifest = json.loads((qlora_run / "checkpoints" / "step_4" / "manifest.json").read_text())
    assert manifest["peft"]["quantize_base"] == "nf4"
    saved = load_file(str(qlora_run / "checkpoints" / "step_4" / "model.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # adapters only: the NF4 base is never saved

    resumed = tmp_path / "resumed"
    _train(_overrides(base, resumed, f"resume={qlora_run / 'checkpoints' / 'step_2'}"))
    again = _losses(resumed)
    assert {s: again[s] for s in (3, 4)} == {s: losses[s] for s in (3, 4)}
    after = load_file(str(resumed / "checkpoints" / "step_4" / "model.safetensors"))
    assert sorted(after) == sorted(saved) and all(torch.equal(after[k], saved[k]) for k in saved)


def test_qlora_resume_refuses_another_base_precision(qlora_run, base, tmp_path):
    from persimmon_train.errors import CheckpointError

    overrides = _overrides(base, tmp_path / "r", f"resume={qlora_run / 'checkpoints' / 'step_2'}")
    overrides[1] = "peft.quantize_base=none"
    with pytest.raises(CheckpointError, match="peft.quantize_base is none but .* was trained with nf4"):
        _train(overrides)


# Bound for the export test. NF4 moves each decoder matrix by ~0.09 of its norm (QLoRA's block-64
# NF4 on Gaussian weights; 0.092 on these). Embedding, lm_head, norms and the LoRA delta are the
# same in both models, so the logits differ only through what the decoder layers add to them (the
# logits minus the logits with every layer skipped: the "decoder part"). Each layer chains two
# quantized matrices per path (qkv -> dense; h_to_4h -> relu^2 -> 4h_to_h, where relu^2 doubles the
# first's relative error), so independent errors come to about sqrt(1 + 1) * 0.09 = 0.13
# (attention) and sqrt(4 + 1) * 0.09 = 0.20 (MLP) of what each path adds. 0.25 of the decoder part
# bounds that with some room (measured: 0.105). It still matters: the same model without its
# adapters is 0.80 away. That the delta lands on the ORIGINAL weights is checked exactly, apart.
NF4_LOGIT_BOUND = 0.25


def test_merged_export_matches_the_nf4_training_model_up_to_nf4_error(qlora_run, base, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from persimmon_train.adapters.lora import lora_scale
    from persimmon_train.export import export_checkpoint

    step = qlora_run / "checkpoints" / "step_4"
    merged = tmp_path / "merged"
    export_checkpoint(str(step), str(merged), dtype="fp32")

    # The delta lands on model.path's ORIGINAL weights (not on NF4's dequantized ones): exactly.
    from types import SimpleNamespace

    peft_cfg = SimpleNamespace(**json.loads((step / "manifest.json").read_text())["peft"])
    original, adapters, out = (
        load_file(str(base / "model.safetensors")),
        load_file(str(step / "model.safetensors")),
        load_file(str(merged / "model.safetensors")),
    )
    name = "model.layers.1.mlp.dense_4h_to_h.weight"
    a = adapters[f"base_model.model.{name[:-7]}.lora_A.default.weight"]
    b = adapters[f"base_model.model.{name[:-7]}.lora_B.default.weight"]
    want = original[name].float() + (b.float() @ a.float()) * lora_scale(peft_cfg)
    assert b.abs().sum() > 0 and torch.equal(out[name], want)

    # Logits: transformers on the merged export (float32) vs the training model (NF4 + adapters).
    cfg = _load(_overrides(base, tmp_path / "unused"))
    model, strategy = _training_model(cfg)
    strategy.load_state(str(step))
    model.eval()
    ids = torch.randint(4, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with strategy.autocast():
            ours = model(input_ids=ids).logits.float()
            skipped_layers = _logits_without_layers(model, ids).float()
        oracle = transformers.PersimmonForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
        theirs = oracle(input_ids=ids).logits
    decoder_part = (theirs - skipped_layers).norm()
    error = (ours - theirs).norm()
    assert error <= NF4_LOGIT_BOUND * decoder_part, f"{error / decoder_part:.3f} of the decoder's part"
    # The bound is tight enough to matter: the base alone (no adapters) is far outside it.
    with torch.no_grad(), strategy.autocast(), model.disable_adapter():
        no_adapters = model(input_ids=ids).logits.float()
    assert (no_adapters - theirs).norm() > 2 * NF4_LOGIT_BOUND * decoder_part


def _logits_without_layers(model, ids):
    """lm_head(final_norm(embedding)): the logits with every decoder layer skipped."""
    inner = model.get_base_model()
    hidden = inner.model.embed_tokens(ids).float()
    return F.linear(inner.model.final_layernorm(hidden), inner.lm_head.weight.float())
