"""What a checkpoint's run trained on, rebuilt from the checkpoint's manifest alone.

The checkpoint holds only trainable weights; its manifest says everything else: the head
(model class), the exact model config (labels of a classifier included), the peft settings, and
where the frozen base came from -- `model.path` (streamed file by file, tensor by tensor) or a
seeded random init (repeated here: same seed, same constructor; small models only, it is
materialised). The tokenizer is the copy saved inside the checkpoint. No run config.yaml and no
data file is read: those may have been rewritten or moved since.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from persimmon_train.errors import CheckpointError, WeightsError


@dataclass
class ModelSource:
    path: str  # the checkpoint
    manifest: dict
    model_class: type
    config: object  # PersimmonConfig
    tokenizer: object  # persimmon_train.data.Tokenizer

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            shell = self.model_class(self.config)
        return {name: tuple(t.shape) for name, t in shell.state_dict().items()}

    def iter_base(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The frozen base weights (HF names), one at a time: from `model.path` as `StoredTensor`s
        (read when written or merged), else a random init's tensors."""
        from persimmon_train.storage import iter_weights_folder

        base = self.manifest["model"]["base"]
        if base.get("path"):
            if not os.path.isdir(base["path"]):
                raise WeightsError(
                    f"{self.path}/manifest.json: the run's base model {base['path']} is gone; "
                    f"the LoRA adapter cannot be merged without it (export merge=false still works)"
                )
            yield from iter_weights_folder(base["path"], lazy=True)
            return
        # The trainer seeds right before building a random-init model; do exactly the same.
        from persimmon_train.training.builders import set_seed

        set_seed(int(base["seed"]))
        model = self.model_class.from_config(self.config)
        yield from ((name, t.detach()) for name, t in model.state_dict().items())


def load_model_source(path: str, manifest: dict) -> ModelSource:
    from persimmon_train.data import Tokenizer
    from persimmon_train.model import HEADS, PersimmonConfig
    from persimmon_train.storage.checkpoints import TOKENIZER_DIR

    where = os.path.join(path, "manifest.json")
    model = manifest.get("model") or {}
    classes = {cls.__name__: cls for cls in HEADS.values()}
    if model.get("architecture") not in classes or not isinstance(model.get("config"), dict):
        raise CheckpointError(f"{where}: no usable model architecture/config (written by an older version?)")
    config = PersimmonConfig.from_dict(model["config"], source=where)
    tokenizer = Tokenizer(os.path.join(path, TOKENIZER_DIR))
    return ModelSource(path, manifest, classes[model["architecture"]], config, tokenizer)
