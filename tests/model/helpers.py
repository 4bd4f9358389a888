"""Build twin models (ours and transformers') with identical random weights."""

import torch

from persimmon_train.model import (
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
)

OURS = {
    "causal_lm": PersimmonForCausalLM,
    "sequence_classification": PersimmonForSequenceClassification,
    "token_classification": PersimmonForTokenClassification,
}
HF_NAMES = {
    "causal_lm": "PersimmonForCausalLM",
    "sequence_classification": "PersimmonForSequenceClassification",
    "token_classification": "PersimmonForTokenClassification",
}


def tiny_config(**overrides) -> PersimmonConfig:
    values = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    values.update(overrides)
    return PersimmonConfig(**values)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, LayerNorm weights and all biases included, so all are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def twins(config: PersimmonConfig, head: str = "causal_lm", seed: int = 0):
    import transformers

    ours = OURS[head].from_config(config)
    randomize(ours, seed)
    hf_config = transformers.PersimmonConfig.from_dict(config.to_dict())
    hf = getattr(transformers, HF_NAMES[head])(hf_config)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.eval(), hf.eval()
