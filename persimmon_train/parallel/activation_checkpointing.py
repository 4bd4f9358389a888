"""Activation checkpointing on decoder layers, leaving parameter names untouched.

Instead of wrapping each layer in a new module (which would add a prefix such as
`_checkpoint_wrapped_module.` to every state-dict name), the layer's bound `forward` is replaced
by one that runs the original under `torch.utils.checkpoint` (non-reentrant). Checkpoints, peft
adapters and exports therefore see the same names with or without checkpointing.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers`, also through peft / strategy wrappers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == "model.layers" or name.endswith(".model.layers")):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder layers at model.layers")


def _checkpointed(original_forward, *args, **kwargs):
    return checkpoint(original_forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, every_k_layers: int) -> list[int]:
    """Checkpoint layers 0, k, 2k, ... (k=1: all of them; k=0: none). Returns the layer indices."""
    if every_k_layers <= 0:
        return []
    done = []
    for index, layer in enumerate(decoder_layers(model)):
        if index % every_k_layers == 0 and "forward" not in layer.__dict__:
            layer.forward = functools.partial(_checkpointed, layer.forward)
            done.append(index)
    return done
