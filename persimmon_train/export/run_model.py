"""Rebuild what a run trained on, from its config alone: tokenizer, head, model config, frozen base.

The checkpoint holds only trainable weights. The frozen base comes back the way the trainer
built it: from `model.path` (streamed file by file, tensor by tensor) or, for a random init, by
repeating the trainer's seeded construction (`builders`, same seed, same order) -- small models
only, it is materialised. The label names of a classification run come from its data (as in
training), so those runs need their data files (the tokenized cache makes this quick).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch

from persimmon_train.errors import ConfigError


@dataclass
class RunModel:
    cfg: object  # RunConfig
    tokenizer: object  # persimmon_train.data.Tokenizer
    model_class: type
    config: object  # PersimmonConfig
    _random_state: dict | None = None  # the seeded random init, when there is no model.path

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            shell = self.model_class(self.config)
        return {name: tuple(t.shape) for name, t in shell.state_dict().items()}

    def iter_base(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The frozen base weights (HF names), one tensor at a time."""
        if self._random_state is not None:
            yield from self._random_state.items()
            return
        from persimmon_train.export.safetensors_stream import iter_weights_folder

        yield from iter_weights_folder(self.cfg.model.path)


def rebuild_run_model(cfg) -> RunModel:
    from persimmon_train.training import builders

    if cfg.model.path and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path: {cfg.model.path!r} (the run's base model) is gone or not a model folder "
                          f"(no config.json)")
    tokenizer = builders.build_tokenizer(cfg)
    data = None
    if cfg.task != "causal_lm":
        # The trainer sized the head and named the labels from the data; do exactly the same.
        from persimmon_train.parallel.single import SingleDeviceStrategy

        one_process = SingleDeviceStrategy(precision="fp32", device="cpu")
        data = builders.build_data_bundle(cfg, tokenizer, one_process)
    model_class = builders.model_class(cfg.task)
    if cfg.model.path:
        return RunModel(cfg, tokenizer, model_class, _config_over_path(cfg, tokenizer, data))
    builders.set_seed(cfg.trainer.seed)  # the trainer seeds right before building the model
    model = builders.build_model(cfg, tokenizer, data)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    return RunModel(cfg, tokenizer, model_class, model.config, _random_state=state)


def _config_over_path(cfg, tokenizer, data):
    """What `builders.build_model` ends up with over model.path, without loading its weights."""
    from persimmon_train.model import PersimmonConfig
    from persimmon_train.training import builders

    overrides = builders._config_overrides(cfg, tokenizer, data)
    if cfg.model.rope_scaling:
        overrides["rope_scaling"] = dict(cfg.model.rope_scaling)
    config = PersimmonConfig.from_json_file(cfg.model.path)
    if overrides:
        config = config.replace(**overrides)
    if config.pad_token_id is None and tokenizer.pad_id is not None:
        config.pad_token_id = tokenizer.pad_id
    return config
