"""Tiny models and in-memory loaders for trainer unit tests."""

from __future__ import annotations

import torch

from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
from persimmon_train.parallel import SingleDeviceStrategy
from persimmon_train.training.config import RunConfig
from persimmon_train.training.optim import build_optimizer, build_scheduler
from persimmon_train.training.trackers import NullTracker
from persimmon_train.training.trainer import Trainer

VOCAB = 64


def tiny_config(**kw) -> PersimmonConfig:
    args = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    args.update(kw)
    return PersimmonConfig(**args)


def tiny_model(seed: int = 0, **kw) -> PersimmonForCausalLM:
    torch.manual_seed(seed)
    return PersimmonForCausalLM.from_config(tiny_config(**kw))


def causal_rows(n: int, seq: int = 16, seed: int = 0) -> list[dict]:
    """Rows with different numbers of target tokens (so per-micro-batch means would be wrong)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (seq,), generator=g)
        labels = ids.clone()
        labels[: 2 + 3 * (i % 4)] = -100  # prompt-like masked prefix of varying length
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class ListLoader:
    """Serves fixed rows in order, `batch` rows at a time, forever; resumable."""

    def __init__(self, rows: list[dict], batch: int):
        self.rows, self.batch, self.position = rows, batch, 0

    def __iter__(self):
        while True:
            picked = [self.rows[(self.position + i) % len(self.rows)] for i in range(self.batch)]
            self.position += self.batch
            yield {k: torch.stack([r[k] for r in picked]) for k in picked[0]}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, sd):
        self.position = sd["position"]


def make_trainer(
    model,
    rows,
    *,
    micro: int,
    accum: int,
    steps: int,
    output_dir,
    lr=1e-2,
    clip=None,
    every=0,
    max_nonfinite=3,
    eval_rows=None,
    sgd=False,
):
    cfg = RunConfig()
    cfg.trainer.max_steps = steps
    cfg.trainer.micro_batch_size = micro
    cfg.trainer.grad_accum_steps = accum
    cfg.trainer.precision = "fp32"
    cfg.trainer.progress_bar = False
    cfg.trainer.max_nonfinite_steps = max_nonfinite
    cfg.optim.lr = lr
    cfg.optim.grad_clip = clip
    cfg.optim.schedule = "constant"
    cfg.checkpoint.every_n_steps = every
    strategy = SingleDeviceStrategy(precision="fp32", device="cpu")
    # SGD makes the update proportional to the gradient (AdamW would amplify float noise in
    # near-zero gradients, e.g. of the k_layernorm bias, to full-size steps).
    make = (lambda m: torch.optim.SGD(m.parameters(), lr=lr)) if sgd else (lambda m: build_optimizer(m, cfg.optim))
    model, optimizer = strategy.wrap(model, make)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)

    class Metrics:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step):
            self.rows.append({"step": step, **metrics})

    return Trainer(
        cfg,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=ListLoader(rows, micro),
        eval_loader=None if eval_rows is None else ListLoader(eval_rows, micro),
        tracker=NullTracker(),
        metrics_file=Metrics(),
        output_dir=str(output_dir),
        id2label=None,
    )


def lora_steps_from_folder(strategy, folder, *, steps: int = 4, batch: int = 2, seq: int = 16, data_seed: int = 0):
    """LoRA on `folder` (an HF model folder) the way a run builds it: meta model, peft, strategy.wrap
    (which loads model.path), then `steps` AdamW steps under the strategy's autocast.

    Returns (losses, {trainable name: float32 tensor after training}, {parameter name: dtype}).
    """
    from persimmon_train.adapters import apply_lora
    from persimmon_train.training.config import PeftConfig

    config = PersimmonConfig.from_json_file(folder)
    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
    model = apply_lora(model, PeftConfig(method="lora", r=4, alpha=8.0, dropout=0.0), "causal_lm")
    model, optimizer = strategy.wrap(
        model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    )
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(data_seed)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=generator)  # one batch, learnt
    losses = []
    for _ in range(steps):
        with strategy.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    trained = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            trained[name] = value.detach().float().clone()
    return losses, trained, dtypes
