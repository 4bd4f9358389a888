"""Our Persimmon against transformers' on random weights (float32, max abs diff <= 1e-5)."""

import pytest
import torch

from persimmon_train.model import PersimmonConfig
from persimmon_train.model.decoding import generate
from tests.helpers import parity_config, twins

transformers = pytest.importorskip("transformers")
ATOL = 1e-5


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(partial_rotary_factor=0.25),
        dict(partial_rotary_factor=0.5),
        dict(partial_rotary_factor=1.0),
        dict(qk_layernorm=False),
        dict(hidden_size=96, num_attention_heads=6, num_hidden_layers=3, intermediate_size=200, rope_theta=10000.0),
        dict(layer_norm_eps=1e-6, rope_theta=25000.0, partial_rotary_factor=0.5, num_hidden_layers=4),
    ],
)
def test_causal_lm_logits_match(overrides):
    ours, hf = twins(parity_config(**overrides))
    ids = torch.randint(1, 160, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= ATOL


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
@pytest.mark.parametrize("length", [48, 100])  # max_position_embeddings is 64: 100 runs past it
def test_rope_scaling_past_max_positions(kind, length):
    ours, hf = twins(parity_config(rope_scaling={"type": kind, "factor": 2.0}))
    ids = torch.randint(1, 160, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(side):
    ours, hf = twins(parity_config())
    ids = torch.randint(1, 160, (3, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 5, 11]):
        if n_pad:
            sl = slice(0, n_pad) if side == "left" else slice(24 - n_pad, 24)
            mask[row, sl] = 0
            ids[row, sl] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(a).all()
    assert max_diff(a[real], b[real]) <= ATOL


def test_explicit_position_ids():
    ours, hf = twins(parity_config())
    ids = torch.randint(1, 160, (2, 16), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(5, 21).expand(2, 16)
    with torch.no_grad():
        assert max_diff(ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits) <= ATOL


def test_causal_lm_loss_matches():
    ours, hf = twins(parity_config())
    ids = torch.randint(1, 160, (2, 30), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :7] = -100
    ours.loss_chunk_size = 8  # several chunks
    a = ours(ids, labels=labels).loss
    b = hf(ids, labels=labels).loss
    assert abs(a.item() - b.item()) <= ATOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("problem", ["regression", "single_label_classification", "multi_label_classification", None])
def test_sequence_classification(side, problem):
    num_labels = 1 if problem == "regression" else 3
    config = parity_config(num_labels=num_labels, problem_type=problem)
    ours, hf = twins(config, head="sequence_classification")
    ids = torch.randint(1, 160, (4, 20), generator=torch.Generator().manual_seed(6))
    for row, n_pad in enumerate([0, 3, 9, 15]):
        if n_pad:
            ids[row, (slice(0, n_pad) if side == "left" else slice(20 - n_pad, 20))] = 0
    mask = (ids != 0).long()
    g = torch.Generator().manual_seed(7)
    if problem == "regression":
        labels = torch.randn(4, generator=g)
    elif problem == "multi_label_classification":
        labels = (torch.rand(4, 3, generator=g) > 0.5).float()
    else:
        labels = torch.randint(0, 3, (4,), generator=g)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels)
        b = hf(ids, attention_mask=mask, labels=labels)
        # Without a mask both pool at the rightmost non-pad token (pads are then attended to).
        c, d = ours(ids, labels=labels), hf(ids, labels=labels)
    assert a.logits.shape == (4, num_labels)
    assert max_diff(a.logits, b.logits) <= ATOL
    assert max_diff(c.logits, d.logits) <= ATOL
    assert abs(a.loss.item() - b.loss.item()) <= ATOL


def test_token_classification():
    ours, hf = twins(parity_config(num_labels=5), head="token_classification")
    ids = torch.randint(1, 160, (2, 18), generator=torch.Generator().manual_seed(8))
    labels = torch.randint(0, 5, (2, 18), generator=torch.Generator().manual_seed(9))
    labels[:, ::3] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels), hf(ids, labels=labels)
    assert max_diff(a.logits, b.logits) <= ATOL
    assert abs(a.loss.item() - b.loss.item()) <= ATOL


def test_greedy_generation_matches_transformers():
    ours, hf = twins(parity_config(eos_token_id=None, bos_token_id=None))
    prompt = torch.randint(1, 160, (1, 7), generator=torch.Generator().manual_seed(10))
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=20, eos_token_id=None)
    assert torch.equal(got, expected)


def test_greedy_generation_stops_at_eos():
    ours, _ = twins(parity_config(eos_token_id=None))
    prompt = torch.randint(1, 160, (1, 7), generator=torch.Generator().manual_seed(10))
    free = ours.generate(prompt, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 7 + 3])
    first = int((free[0, 7:] == eos).nonzero()[0])
    stopped = ours.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    assert stopped.shape[1] == 7 + first + 1 and int(stopped[0, -1]) == eos


def test_left_padded_batch_generates_like_single_rows():
    ours, _ = twins(parity_config(eos_token_id=None))
    g = torch.Generator().manual_seed(11)
    a, b = torch.randint(1, 160, (1, 9), generator=g), torch.randint(1, 160, (1, 5), generator=g)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = (batch != 0).long()
    out = ours.generate(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(out[0, 9:], ours.generate(a, max_new_tokens=8, eos_token_id=None)[0, 9:])
    assert torch.equal(out[1, 9:], ours.generate(b, max_new_tokens=8, eos_token_id=None)[0, 5:])


def test_sampling_is_seeded_and_respects_top_k():
    ours, _ = twins(parity_config(eos_token_id=None))
    prompt = torch.randint(1, 160, (1, 5), generator=torch.Generator().manual_seed(12))
    kw = dict(max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None)
    # top_k=1 sampling is greedy decoding.
    assert torch.equal(ours.generate(prompt, **kw), ours.generate(prompt, max_new_tokens=10, eos_token_id=None))
    kw = dict(max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.3, eos_token_id=None)
    x = ours.generate(prompt, generator=torch.Generator().manual_seed(3), **kw)
    y = ours.generate(prompt, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(x, y)

    z = ours.generate(prompt, generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(x, z)  # it samples: another seed, another continuation


# Sampling, through `generate`, on a model whose next-token logits are always this vector (its
# best tokens deliberately not at the lowest ids). 20000 draws: each frequency is within 0.02 of
# its probability with > 4 sigma to spare, and every allowed token is drawn.
LOGITS = torch.tensor([0.5, -1.0, 3.0, 0.0, 2.0, -2.0, 2.5, 1.0])
RANKED = [2, 6, 4, 7, 0, 3, 1, 5]  # token ids, best first
DRAWS = 20000


class FixedLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = PersimmonConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            eos_token_id=None,
            pad_token_id=None,
        )

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=LOGITS.expand(*input_ids.shape, -1))


def _frequencies(seed=0, **kw) -> torch.Tensor:
    out = generate(
        FixedLogits(),
        torch.zeros(DRAWS, 1, dtype=torch.long),
        max_new_tokens=1,
        do_sample=True,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return torch.bincount(out[:, -1], minlength=len(LOGITS)).double() / DRAWS


def _expected(temperature=1.0, allowed=RANKED) -> torch.Tensor:
    keep = torch.full_like(LOGITS, float("-inf"))
    keep[allowed] = 0.0
    return (LOGITS / temperature + keep).softmax(-1).double()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_temperature_shapes_the_sampled_distribution(temperature):
    freq = _frequencies(temperature=temperature)
    assert (freq - _expected(temperature)).abs().max() < 0.02, freq
    if temperature != 1.0:  # and the temperature really moved it
        assert (freq - _expected(1.0)).abs().max() > 0.08


def test_top_k_never_samples_outside_the_k_best():
    freq = _frequencies(top_k=2, temperature=2.0)
    assert set(freq.nonzero().flatten().tolist()) == {2, 6}
    assert (freq - _expected(2.0, allowed=[2, 6])).abs().max() < 0.02


@pytest.mark.parametrize(
    "temperature, nucleus",
    [
        (1.0, [2, 6, 4]),  # probabilities .44 .27 .16 ...: cumulative .44 .71 .87 -> three tokens reach 0.8
        (2.0, [2, 6, 4, 7, 0]),  # .29 .22 .17 .11 .08: cumulative .29 .51 .69 .79 .87 -> five tokens
    ],
)
def test_top_p_never_samples_outside_the_nucleus(temperature, nucleus):
    freq = _frequencies(top_p=0.8, temperature=temperature)
    assert set(freq.nonzero().flatten().tolist()) == set(nucleus)
    assert (freq - _expected(temperature, allowed=nucleus)).abs().max() < 0.02


def test_sampling_draws_differ_by_seed_and_repeat_by_seed():
    a, b = _frequencies(seed=1), _frequencies(seed=1)
    assert torch.equal(a, b)
    out = [
        generate(
            FixedLogits(),
            torch.zeros(64, 1, dtype=torch.long),
            max_new_tokens=1,
            do_sample=True,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (1, 2)
    ]
    assert not torch.equal(out[0], out[1])


def test_config_json_loads_in_transformers_both_spellings():
    config = parity_config(
        rope_theta=1234.0, partial_rotary_factor=0.25, rope_scaling={"type": "dynamic", "factor": 3.0}
    )
    d = config.to_dict()
    hf = transformers.PersimmonConfig.from_dict(config.to_dict())
    assert hf.rope_parameters["rope_theta"] == 1234.0
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert hf.rope_parameters["rope_type"] == "dynamic" and hf.rope_parameters["factor"] == 3.0
    # The 4.x spelling is written too, so transformers 4.x reads the same numbers.
    assert d["rope_theta"] == 1234.0 and d["partial_rotary_factor"] == 0.25
    assert d["rope_scaling"] == {"type": "dynamic", "factor": 3.0}
    # And we read what transformers 5 writes.
    back = PersimmonConfig.from_dict(hf.to_dict())
    assert (back.rope_theta, back.partial_rotary_factor, back.rope_scaling) == (
        1234.0,
        0.25,
        {"type": "dynamic", "factor": 3.0},
    )
