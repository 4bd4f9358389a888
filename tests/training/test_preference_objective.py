"""The DPO reference without a second copy, the stored reference, reward pooling, refused options."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from persimmon_train.data.preference import PreferenceLoader, pack_pairs
from persimmon_train.errors import ConfigError
from persimmon_train.model.preference import num_docs
from persimmon_train.parallel import SingleDeviceStrategy
from persimmon_train.training.config import PeftConfig, RunConfig, validate_preference
from persimmon_train.training.preference import PreferenceObjective, compute_reference, policy_logps
from tests.helpers import VOCAB, tiny_model


def _loader(n=8, seq_len=48, seed=0, micro=2, eos=None):
    rng = np.random.default_rng(seed)
    items = [
        [list(map(int, rng.integers(3, VOCAB, rng.integers(lo, hi)))) for lo, hi in ((2, 7), (1, 6), (1, 6))]
        for _ in range(n)
    ]
    if eos is not None:  # responses end with the eos, which is also the pad token (the released tokenizer's way)
        items = [(p, c + [eos], r + [eos]) for p, c, r in items]
    arrays, _ = pack_pairs(items, seq_len, 0)
    return PreferenceLoader(arrays, micro, seed=0, train=False)


def _dpo_cfg(**dpo):
    cfg = RunConfig(objective="dpo")
    for k, v in dpo.items():
        setattr(cfg.dpo, k, v)
    return cfg


def _strategy():
    return SingleDeviceStrategy(device="cpu", precision="fp32")


def test_lora_reference_is_the_model_with_adapters_disabled():
    from persimmon_train.adapters import apply_lora

    base = tiny_model(seed=0)
    frozen = copy.deepcopy(base).eval()  # a separate frozen copy: the oracle
    policy = apply_lora(base, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0), "causal_lm")
    with torch.no_grad():  # adapters that change the output (peft starts lora_B at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    objective = PreferenceObjective(_dpo_cfg(), _strategy(), "adapters_off")
    policy.train()
    for batch in _loader():
        docs = num_docs(batch["doc_ids"])
        ref = objective._reference_logps(policy, batch, docs)
        with torch.no_grad():
            expected = policy_logps(frozen, batch, docs)[0]
            adapted = policy_logps(policy, batch, docs)[0]
        torch.testing.assert_close(ref, expected, rtol=0, atol=1e-5)
        assert (adapted - expected).abs().max() > 1e-2  # the adapters do act on the policy
        assert policy.training  # the reference pass leaves the mode as it was


def test_stored_reference_equals_a_live_reference_model():
    model = tiny_model(seed=1)
    live = copy.deepcopy(model).eval()
    loader = _loader(n=10, seed=2, micro=3)
    stored = compute_reference(model, loader, _strategy(), micro_batch_size=4)
    loader.arrays = dict(loader.arrays, ref_logps=stored)
    with torch.no_grad():  # training moves the policy away; the stored reference stays the initial model's
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    objective = PreferenceObjective(_dpo_cfg(), _strategy(), "stored")
    seen = 0
    for batch in loader:
        docs = num_docs(batch["doc_ids"])
        with torch.no_grad():
            expected = policy_logps(live, batch, docs)[0]
        torch.testing.assert_close(objective._reference_logps(model, batch, docs), expected, rtol=0, atol=1e-5)
        seen += int((batch["doc_ids"] >= 0).any(dim=1).sum())
    assert seen == loader.num_rows


def test_dpo_loss_in_the_objective_counts_pairs_and_logs_trl_names():
    model = tiny_model(seed=0)
    loader = _loader()
    cfg = _dpo_cfg(loss="ipo", beta=0.3)
    loader.arrays = dict(loader.arrays, ref_logps=compute_reference(model, loader, _strategy(), 4))
    batch = next(iter(loader))
    objective = PreferenceObjective(cfg, _strategy(), "stored")
    n = objective.count_items(batch)
    assert n == int(batch["doc_ids"].max(dim=1).values.add(1).sum()) // 2
    loss = objective.loss(model, batch, torch.tensor(float(n)))
    # at the reference every logit is 0: IPO's loss is (0 - 1 / (2 beta))^2 per pair
    assert float(loss.detach()) == pytest.approx((1 / (2 * 0.3)) ** 2, rel=1e-5)
    metrics = objective.train_metrics(torch.tensor(float(n)))
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
    # away from the reference: IPO on log-probs averaged over each response's tokens (TRL), by hand
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        sums, counts = policy_logps(model, batch, num_docs(batch["doc_ids"]))
    hand = []
    for row in range(sums.shape[0]):
        for k in range(int(batch["doc_ids"][row].max()) // 2 + 1):
            c, r = 2 * k, 2 * k + 1
            ref = batch["ref_logps"][row]
            x = (sums[row, c] - ref[c]) / counts[row, c] - (sums[row, r] - ref[r]) / counts[row, r]
            hand.append((float(x) - 1 / (2 * 0.3)) ** 2)
    loss = objective.loss(model, batch, torch.tensor(float(n)))
    assert float(loss.detach()) == pytest.approx(sum(hand) / n, rel=1e-5)
    assert abs(sum(hand) / n - (1 / (2 * 0.3)) ** 2) > 1e-3


def test_reward_scores_at_each_documents_last_token_equal_transformers():
    transformers = pytest.importorskip("transformers")
    from persimmon_train.model import PersimmonForSequenceClassification
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    ours = PersimmonForSequenceClassification.from_config(tiny_config(num_labels=1)).eval()
    theirs = transformers.PersimmonForSequenceClassification(
        transformers.PersimmonConfig.from_dict(ours.config.to_dict())
    )
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    cfg = RunConfig(objective="reward", task="sequence_classification")
    cfg.reward.margin = 0.5
    objective = PreferenceObjective(cfg, _strategy(), "none", pad_token_id=ours.config.pad_token_id)
    for batch in _loader(seed=4, eos=ours.config.pad_token_id):
        losses, values = objective.pair_terms(ours, batch)
        hand_c, hand_r = [], []
        for ids, docs in zip(batch["input_ids"], batch["doc_ids"]):
            for d in range(int(docs.max()) + 1):
                doc = ids[docs == d][None]
                score = float(theirs(input_ids=doc).logits[0, 0])
                (hand_c if d % 2 == 0 else hand_r).append(score)
        hand_c, hand_r = torch.tensor(hand_c), torch.tensor(hand_r)
        torch.testing.assert_close(values["rewards/chosen"], hand_c, rtol=0, atol=1e-5)
        torch.testing.assert_close(values["rewards/rejected"], hand_r, rtol=0, atol=1e-5)
        expect = -torch.nn.functional.logsigmoid(hand_c - hand_r - 0.5)
        torch.testing.assert_close(losses.detach(), expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(objective="sft", dpo=dict(beta=0.5)), r"dpo\.beta: dpo\.\* keys configure `persimmon-train dpo`"),
        (dict(objective="dpo", reward=dict(margin=1.0)), r"reward\.margin: reward\.\* keys"),
        (dict(objective="sft", data=dict(format="preference")), r"data\.format: preference pairs train with"),
        (dict(objective="dpo", data=dict(format="chat")), r"data\.format \(objective dpo\)"),
        (dict(objective="dpo", task="sequence_classification"), r"task: objective=dpo trains the causal_lm head"),
        (dict(objective="dpo", strategy=dict(name="deepspeed")), r"strategy: objective=dpo runs under"),
        (dict(objective="dpo", dpo=dict(loss="hinge")), r"dpo\.loss: 'hinge' is not one of sigmoid, ipo"),
        (dict(objective="dpo", dpo=dict(loss="ipo", label_smoothing=0.1)), r"dpo\.label_smoothing: conservative"),
        (dict(objective="dpo", dpo=dict(beta=0.0)), r"dpo\.beta: must be > 0"),
    ],
)
def test_options_not_honoured_are_refused(changes, message):
    cfg = RunConfig()
    cfg.data.format = "preference"
    for key, value in changes.items():
        if isinstance(value, dict):
            for k, v in value.items():
                setattr(getattr(cfg, key), k, v)
        else:
            setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        validate_preference(cfg)


def test_reference_key_follows_the_weights(tmp_path):
    from persimmon_train.training.preference import reference_key

    cfg = RunConfig(objective="dpo")
    a = reference_key(cfg, "data1", "fp32")
    assert a == reference_key(cfg, "data1", "fp32")
    assert a != reference_key(cfg, "data2", "fp32") and a != reference_key(cfg, "data1", "bf16")
    cfg.trainer.seed = 7  # another random init
    assert reference_key(cfg, "data1", "fp32") != a
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    cfg.model.path = str(tmp_path)
    b = reference_key(cfg, "data1", "fp32")
    (tmp_path / "model.safetensors").write_bytes(b"xy")  # other weights at the same path
    assert reference_key(cfg, "data1", "fp32") != b


def test_commands_compose_their_objective_and_refuse_the_others_keys():
    from persimmon_train.cli import load_config

    dpo = load_config("dpo", ["dpo.loss=ipo", "dpo.beta=0.2"])
    assert (dpo.objective, dpo.task, dpo.data.format, dpo.dpo.loss) == ("dpo", "causal_lm", "preference", "ipo")
    reward = load_config("reward", ["reward.margin=0.5"])
    assert (reward.objective, reward.task, reward.reward.margin) == ("reward", "sequence_classification", 0.5)
    with pytest.raises(ConfigError, match=r"^dpo\.beta: dpo\.\* keys configure `persimmon-train dpo`"):
        load_config("finetune", ["dpo.beta=0.5"])
    with pytest.raises(ConfigError, match=r"^reward\.margin: "):
        load_config("dpo", ["reward.margin=1.0"])
    with pytest.raises(ConfigError, match=r"^strategy: objective=reward runs under"):
        load_config("reward", ["strategy=deepspeed", "strategy.stage=2"])
