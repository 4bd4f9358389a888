"""`trainer.compile=true`: torch.compile each decoder layer, and log every recompile.

Order (torchtitan's): activation checkpointing, then compile, then sharding (`fully_shard` per
layer in parallel/fsdp.py). `prepare_for_training` (training/builders.py) runs the first two before the
strategy wraps the model.

What is compiled is each layer's `forward` (after checkpointing replaced it), not the module:
- parameter names stay as they are (no `_orig_mod.` prefix in checkpoints, adapters or exports);
- module hooks (FSDP2's all-gather / reshard, DeepSpeed's) keep running eagerly around the
  compiled code, as they do around torchtitan's compiled blocks.
All layers share one code object, and with dynamo's default `inline_inbuilt_nn_modules` their
parameters are graph inputs, so one graph serves every layer; a new graph after the first step
(a new sequence length, a changed attention layout) is a recompile, and too many silently fall
back to eager. `CompileWatch` counts the graphs after every forward and logs when the count grows.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from persimmon_train.parallel.activation_checkpointing import decoder_layers

log = logging.getLogger("persimmon_train")


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Counts dynamo graphs after each forward of the model; logs the first compile and each recompile."""

    def __init__(self):
        self.start = _graphs_compiled()
        self.seen = self.start
        self.recompiles = 0
        self.forwards = 0

    def __call__(self, module, args, output):
        self.forwards += 1
        now = _graphs_compiled()
        if self.forwards == 1 and now == self.start:
            log.warning(
                "torch.compile: the first forward compiled no graph; the layers run eagerly (a graph "
                "break inside an activation-checkpointed layer, e.g. model.attention=segments, does that)"
            )
        if now != self.seen:
            new = now - self.seen
            if self.seen == self.start:
                log.info("torch.compile: %d graph(s) compiled for the decoder layers", new)
            else:
                self.recompiles += new
                log.warning(
                    "torch.compile: recompiled (%d new graph(s), %d recompiles so far, forward %d); "
                    "changing shapes or attention layouts cause this",
                    new,
                    self.recompiles,
                    self.forwards,
                )
            self.seen = now


def compile_decoder_layers(model: nn.Module, **compile_kwargs) -> CompileWatch:
    """torch.compile every decoder layer's forward in place; returns the watch logging recompiles."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, **compile_kwargs)
    watch = CompileWatch()
    model.register_forward_hook(watch)
    log.info("torch.compile on %d decoder layers (after activation checkpointing, before sharding)", len(layers))
    return watch
