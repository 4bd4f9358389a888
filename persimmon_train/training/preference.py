"""Preference objectives in the loop: DPO (policy vs reference) and Bradley-Terry reward models.

The Trainer hands each batch of packed pairs (data/preference.py) to the objective instead of
calling the head with labels. Per the gradient contract each micro-batch's loss is the sum of its
pairs' losses / the number of pairs in the whole global batch. Metrics are TRL's names
(rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
logps/rejected; eval_ prefixed in eval), averaged over the global batch's pairs.

The reference model is never a second copy: under LoRA it is the same model with its adapters
disabled (peft's `disable_adapter`); under full fine-tuning the reference log-probs are computed
before the first step, by the model itself (whose weights then are the reference's), over every
train and eval row, and stored beside the prepared data (`reference_logps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from persimmon_train.model.preference import (
    bradley_terry_loss,
    document_last,
    document_sums,
    dpo_loss,
    num_docs,
    pair_mask,
    pairs,
)

log = logging.getLogger("persimmon_train")
MODEL_INPUTS = ("input_ids", "position_ids")


def _adapters_off(model):
    """peft's disable_adapter context of `model` (a PeftModel, also once FSDP2 has wrapped it)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else None


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def policy_logps(model, batch: dict, docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts per document: two [B, docs] tensors."""
    out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], return_token_logps=True)
    return document_sums(out.token_logps, batch["labels"], batch["doc_ids"], docs)


class PreferenceObjective:
    def __init__(self, cfg, strategy, reference: str, pad_token_id: int | None = None):
        self.kind = cfg.objective  # dpo | reward
        self.pad_token_id = pad_token_id  # reward: pooled at each document's last non-pad token
        self.dpo = cfg.dpo
        self.margin = cfg.reward.margin
        self.strategy = strategy
        self.reference = reference  # dpo: "adapters_off" | "stored"; reward: "none"
        self._sums: dict[str, torch.Tensor] = {}

    # -- counting and the loss -------------------------------------------------------------------
    def count_items(self, batch: dict) -> int:
        return int(pair_mask(batch["doc_ids"], num_docs(batch["doc_ids"])).sum())

    def _reference_logps(self, model, batch: dict, docs: int) -> torch.Tensor:
        if self.reference == "stored":
            return batch["ref_logps"][:, :docs].float()
        with torch.no_grad(), _adapters_off(model), _eval_mode(model):
            return policy_logps(model, batch, docs)[0]

    def pair_terms(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-pair losses (this batch's pairs) and per-pair metric values."""
        doc_ids = batch["doc_ids"]
        docs = num_docs(doc_ids)
        mask = pair_mask(doc_ids, docs)
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        if self.kind == "reward":
            last = document_last(doc_ids, docs, batch["input_ids"], self.pad_token_id)
            scores = model(**inputs, doc_last=last).logits.squeeze(-1).float()
            sc, sr = (x[mask] for x in pairs(scores))
            losses = bradley_terry_loss(sc, sr, self.margin)
            sc, sr = sc.detach(), sr.detach()
            return losses, {
                "accuracy": (sc > sr).float(),
                "rewards/chosen": sc,
                "rewards/rejected": sr,
                "rewards/margins": sc - sr,
            }
        # the reference first: its forward's transient logits never add to the policy's live activations
        ref = self._reference_logps(model, batch, docs)
        sums, counts = policy_logps(model, batch, docs)
        if self.dpo.loss == "ipo":  # TRL: IPO on log-probs averaged over each response's tokens
            sums, ref = sums / counts.clamp(min=1), ref / counts.clamp(min=1)
        (pc, pr), (rc, rr) = pairs(sums), pairs(ref)
        pc, pr, rc, rr = pc[mask], pr[mask], rc[mask], rr[mask]
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, self.dpo.beta, self.dpo.loss, self.dpo.label_smoothing)
        return losses, {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "rewards/margins": chosen - rejected,
            "logps/chosen": pc.detach(),
            "logps/rejected": pr.detach(),
        }

    def loss(self, model, batch: dict, global_items: torch.Tensor) -> torch.Tensor:
        losses, values = self.pair_terms(model, batch)
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v.sum().double()
        return losses.sum() / global_items

    def train_metrics(self, global_items: torch.Tensor) -> dict:
        """This step's metrics (means over the global batch's pairs); resets the sums."""
        sums, self._sums = self._sums, {}
        if not sums:
            return {}
        names = sorted(sums)
        totals = self.strategy.reduce_sum(torch.stack([torch.as_tensor(sums[k]).double() for k in names]))
        n = float(global_items)
        return {k: float(v) / n for k, v in zip(names, totals.tolist())}

    # -- eval ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        model, strategy = trainer.model, trainer.strategy
        model.eval()
        names = None
        totals = None
        for batch in trainer.eval_batches():
            with strategy.autocast():
                losses, values = self.pair_terms(model, batch)
            values = {"loss": losses.detach().float(), **values}
            names = names or sorted(values)
            row = torch.stack(
                [torch.tensor(float(losses.numel()), dtype=torch.float64, device=strategy.device)]
                + [values[k].double().sum() for k in names]
            )
            totals = row if totals is None else totals + row
        model.train()
        if totals is None:
            return {}
        totals = strategy.reduce_sum(totals)
        n = max(float(totals[0]), 1.0)
        return {f"eval_{k}": float(v) / n for k, v in zip(names, totals[1:].tolist())}


# ------------------------------------------------------------------------------------------------
# the stored reference (full fine-tuning DPO)


def reference_key(cfg, data_key: str, precision: str) -> str:
    """Cache key of stored reference log-probs: the prepared data + the reference weights' identity."""
    m = cfg.model
    if m.path:
        files = sorted(
            f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
            for f in Path(m.path).iterdir()
            if f.suffix in (".json", ".safetensors")
        )
        weights = {"path": str(Path(m.path).resolve()), "files": files}
    else:
        weights = {"random_init_seed": cfg.trainer.seed, "model": {k: v for k, v in vars(m).items()}}
    blob = {"data": data_key, "weights": weights, "precision": precision, "attention": m.attention}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


@torch.no_grad()
def compute_reference(model, loader, strategy, micro_batch_size: int) -> np.ndarray:
    """Summed response log-probs of every document of every row of `loader`: [rows, max docs].

    Every rank runs the same forwards over all rows (FSDP needs that), in eval mode.
    """
    arrays = loader.arrays
    rows = arrays["input_ids"].shape[0]
    docs = max(2, int(np.max(arrays["doc_ids"])) + 1)
    docs += docs % 2
    out = np.zeros((rows, docs), dtype=np.float64)
    with _eval_mode(model):
        for a in range(0, rows, micro_batch_size):
            idx = np.arange(a, min(rows, a + micro_batch_size))
            batch = {
                k: v.to(strategy.device)
                for k, v in loader._make_batch(idx).items()
                if k in ("input_ids", "labels", "position_ids", "doc_ids")
            }
            with strategy.autocast():
                sums, _ = policy_logps(model, batch, docs)
            out[a : a + len(idx)] = sums.double().cpu().numpy()
    return out


def setup_objective(cfg, model, data, strategy) -> PreferenceObjective | None:
    """The run's objective (None for sft); for full-FT DPO, the stored reference log-probs."""
    if cfg.objective == "sft":
        return None
    if cfg.objective == "reward":
        log.info("reward model: Bradley-Terry loss (margin %s) on each document's last-token score", cfg.reward.margin)
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return PreferenceObjective(cfg, strategy, "none", pad_token_id=pad)
    d = cfg.dpo
    if cfg.peft.method == "lora":
        log.info(
            "dpo: loss=%s beta=%s label_smoothing=%s; reference: the same model with its LoRA adapters disabled",
            d.loss,
            d.beta,
            d.label_smoothing,
        )
        return PreferenceObjective(cfg, strategy, "adapters_off")
    key = reference_key(cfg, data.stats.get("key", ""), strategy.precision)
    folder = Path(data.stats["cache"]) if data.stats.get("cache") else None
    for split, loader in (("train", data.train_loader), ("eval", data.eval_loader)):
        if loader is None:
            continue
        path = folder / f"reference_logps-{key}-{split}.npy" if folder else None
        if path is not None and path.is_file():
            ref = np.load(path)
            where = f"stored {path}"
        else:
            ref = compute_reference(model, loader, strategy, cfg.trainer.micro_batch_size)
            where = "computed before training"
            if path is not None and strategy.is_main:
                tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
                np.save(tmp, ref)
                os.replace(tmp, path)
                where += f", stored in {path}"
        loader.arrays = dict(loader.arrays, ref_logps=ref)
        log.info("dpo %s: reference log-probs of the initial weights (%s)", split, where)
    log.info(
        "dpo: loss=%s beta=%s label_smoothing=%s; reference: log-probs of the initial weights, stored "
        "(full fine-tuning holds one model)",
        d.loss,
        d.beta,
        d.label_smoothing,
    )
    return PreferenceObjective(cfg, strategy, "stored")
