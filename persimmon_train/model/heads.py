"""The three Persimmon heads over the shared decoder, with HF-folder loading and saving."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from persimmon_train.errors import ConfigError

from .config import PersimmonConfig
from .decoder import PersimmonModel
from .loss import IGNORE_INDEX, causal_token_logps, chunked_causal_lm_loss

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None  # causal LM, return_token_logps: [B, T], 0 where no target


def init_weights(module: nn.Module, std: float) -> None:
    """transformers' initialisation: normal(0, std) for Linear/Embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PersimmonPreTrainedModel(nn.Module):
    """Shared plumbing: construction, `from_pretrained` / `save_pretrained` over an HF folder."""

    # Parameters a checkpoint of another head may lack; they start from a fresh initialisation.
    head_prefixes: tuple[str, ...] = ()
    # Parameters of another head a checkpoint may carry; they are not loaded.
    foreign_head_keys: tuple[str, ...] = ()

    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        init_weights(self, self.config.initializer_range)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_config(cls, config: PersimmonConfig, device=None, dtype=None):
        """A randomly initialised model (on `device`; "meta" builds shapes only)."""
        with torch.device(device or "cpu"):
            model = cls(config)
        if str(device) != "meta":
            model.init_weights()
        if dtype is not None:
            model.to(dtype)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, **config_overrides):
        """Load an HF model folder (config.json + single or sharded safetensors).

        The model is built on the meta device and each tensor is read straight from its file into
        place, so the weights are never held twice. `dtype` defaults to float32 (the master-weight
        precision training wants); pass torch.bfloat16 for inference. Keyword arguments override
        config.json keys (e.g. `hidden_dropout=0.0`, `num_labels=3`).
        """
        from persimmon_train.storage import load_safetensors_into, read_weight_map

        path = os.fspath(path)
        config = PersimmonConfig.from_json_file(path)
        if config_overrides:
            try:
                config = config.replace(**config_overrides)
            except TypeError as e:
                raise ConfigError(f"{path}: bad model override ({e})") from None
        file_keys = set(read_weight_map(path))
        with torch.device("meta"):
            model = cls(config)
        fresh = [
            name for name, _ in model.named_parameters() if name not in file_keys and name.startswith(cls.head_prefixes)
        ]
        for prefix in {name.rsplit(".", 1)[0] for name in fresh}:
            module = model.get_submodule(prefix)
            module.to_empty(device="cpu")
            init_weights(module, config.initializer_range)
            log.info("%s: %s is not in the checkpoint; initialised fresh for fine-tuning", path, prefix)
        # Fresh head parameters are already real; ignoring them keeps the strict key check for the rest.
        ignore = [k for k in file_keys if k in cls.foreign_head_keys] + fresh
        load_safetensors_into(model, path, dtype=dtype or torch.float32, strict=True, ignore_keys=ignore)
        model.to(dtype or torch.float32)
        return model

    def save_pretrained(
        self, path: str | os.PathLike, max_shard_size: int | str = "5GB", state_dict: dict | None = None, tokenizer=None
    ) -> None:
        """Write config.json (+ generation_config.json) and safetensors shards transformers loads.

        Like transformers, an existing folder is updated: our files are replaced (stale shards of
        an earlier save removed), anything else in it is left alone.
        """
        from persimmon_train.storage import write_hf_folder

        state = state_dict if state_dict is not None else self.state_dict()
        write_hf_folder(
            os.fspath(path),
            state.items(),
            architecture=type(self).__name__,
            config=self.config,
            tokenizer=tokenizer,
            max_shard_size=max_shard_size,
            overwrite=True,
            key="path",
        )


class LMHead(nn.Linear):
    """The output projection; given labels it returns the fused chunked loss instead of logits.

    The loss runs inside this module's own forward on purpose: sharding engines (DeepSpeed ZeRO-3,
    FSDP2) gather a module's weights around its own forward (and backward) only, and the fused loss
    reads `weight` chunk by chunk in forward, where it also computes the weight's gradient
    (loss.py); backward hands that gradient to the engine like any Linear's.
    """

    def forward(self, hidden, labels=None, chunk_size: int = 1024, num_items_in_batch=None, token_logps=False):
        if labels is None:
            return super().forward(hidden)
        if token_logps:
            return causal_token_logps(hidden, self.weight, labels, chunk_size)
        return chunked_causal_lm_loss(hidden, self.weight, labels, chunk_size, num_items_in_batch)


class PersimmonForCausalLM(PersimmonPreTrainedModel):
    foreign_head_keys = ("score.weight", "score.bias")

    def __init__(self, config: PersimmonConfig, loss_chunk_size: int = 1024):
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.loss_chunk_size = loss_chunk_size

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        labels=None,
        num_items_in_batch=None,
        return_logits: bool = False,
        cache=None,
        return_token_logps: bool = False,
    ) -> ModelOutput:
        hidden = self.model(input_ids, attention_mask, position_ids, cache=cache)
        if return_token_logps:  # preference tuning: log p(labels[t+1] | ..t) per token, no loss
            return ModelOutput(token_logps=self.lm_head(hidden, labels, self.loss_chunk_size, token_logps=True))
        loss = logits = None
        if labels is not None:
            loss = self.lm_head(hidden, labels, self.loss_chunk_size, num_items_in_batch)
        if labels is None or return_logits:
            logits = self.lm_head(hidden)
        return ModelOutput(loss=loss, logits=logits)

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """Greedy or sampled decoding with a KV cache; see `persimmon_train.model.decoding`."""
        from .decoding import generate

        return generate(self, input_ids, **kwargs)


def _last_token_index(input_ids, attention_mask, pad_token_id) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    if attention_mask is not None:
        return (positions * attention_mask.to(positions.dtype)).argmax(-1)
    if pad_token_id is not None:
        # transformers' rule: the rightmost token that is not the pad token.
        return (positions * (input_ids != pad_token_id).to(positions.dtype)).argmax(-1)
    if input_ids.shape[0] != 1:
        raise ConfigError(
            "sequence classification of a batch needs an attention_mask or a pad_token_id "
            "in the model config, to find each row's last token"
        )
    return torch.full((1,), input_ids.shape[-1] - 1, device=input_ids.device)


def sequence_classification_loss(logits, labels, config: PersimmonConfig) -> torch.Tensor:
    """Loss chosen by `problem_type` (or inferred from num_labels and label dtype, as transformers does)."""
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    logits = logits.float()
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.float().squeeze())
        return F.mse_loss(logits, labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class PersimmonForSequenceClassification(PersimmonPreTrainedModel):
    """Scores each row at its last real token (`score`: Linear, no bias)."""

    head_prefixes = ("score.",)
    foreign_head_keys = ("lm_head.weight",)

    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, labels=None, doc_last=None, **_
    ) -> ModelOutput:
        hidden = self.model(input_ids, attention_mask, position_ids)
        if doc_last is not None:  # packed rows (reward models): scores at each document's last token
            rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(-1)
            return ModelOutput(logits=self.score(hidden[rows, doc_last.clamp(min=0)]))
        last = _last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = self.score(hidden[rows, last])
        loss = sequence_classification_loss(logits, labels, self.config) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)


class PersimmonForTokenClassification(PersimmonPreTrainedModel):
    """Per-token tags: dropout then `score` (Linear with bias)."""

    head_prefixes = ("score.",)
    foreign_head_keys = ("lm_head.weight",)

    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.model = PersimmonModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None, **_
    ) -> ModelOutput:
        hidden = self.model(input_ids, attention_mask, position_ids)
        logits = self.score(self.dropout(hidden))
        loss = None
        if labels is not None:
            reduction = "mean" if num_items_in_batch is None else "sum"
            loss = F.cross_entropy(
                logits.float().view(-1, self.config.num_labels),
                labels.view(-1),
                ignore_index=IGNORE_INDEX,
                reduction=reduction,
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        return ModelOutput(loss=loss, logits=logits)


HEADS = {
    "causal_lm": PersimmonForCausalLM,
    "sequence_classification": PersimmonForSequenceClassification,
    "token_classification": PersimmonForTokenClassification,
}
