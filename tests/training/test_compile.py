"""trainer.compile: each decoder layer's forward compiled after checkpointing; equal to eager; recompiles logged."""

import logging

import pytest
import torch

from persimmon_train.model import PersimmonForCausalLM
from persimmon_train.parallel.activation_checkpointing import apply_activation_checkpointing
from persimmon_train.parallel.compile import compile_decoder_layers
from tests.helpers import parity_config, randomize


def _pair(attention="sdpa"):
    config = parity_config(num_hidden_layers=3, max_position_embeddings=128, attention=attention)
    eager = PersimmonForCausalLM.from_config(config)
    randomize(eager, seed=1)
    compiled = PersimmonForCausalLM.from_config(config)
    compiled.load_state_dict(eager.state_dict())
    return eager.train(), compiled.train()


def _step(model, ids, pos):
    model.zero_grad(set_to_none=True)
    loss = model(ids, position_ids=pos, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_compiled_equals_eager(backend, caplog):
    eager, compiled = _pair()
    apply_activation_checkpointing(compiled, 1)
    with caplog.at_level(logging.INFO, logger="persimmon_train"):
        watch = compile_decoder_layers(compiled, backend=backend)
        names_before = list(eager.state_dict())
        g = torch.Generator().manual_seed(0)
        for split in (20, 31):  # packed rows whose document boundary moves: same shapes, no recompile
            ids = torch.randint(1, 160, (2, 48), generator=g)
            pos = torch.cat([torch.arange(split), torch.arange(48 - split)]).expand(2, 48)
            a, ga = _step(eager, ids, pos)
            b, gb = _step(compiled, ids, pos)
            assert abs(a.item() - b.item()) <= 1e-5
            for name in ga:
                assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name
        assert watch.recompiles == 0 and watch.forwards == 2
        ids = torch.randint(1, 160, (2, 40), generator=g)  # a new length: one recompile, logged
        _step(compiled, ids, torch.arange(40).expand(2, 40))
    assert watch.recompiles >= 1
    assert any("graph(s) compiled for the decoder layers" in r.message for r in caplog.records)
    assert any("recompiled" in r.message for r in caplog.records)
    assert list(compiled.state_dict()) == names_before  # no _orig_mod. prefixes


def test_compiled_layers_equal_eager_and_log_recompiles(caplog):
    torch._dynamo.reset()
    # aot_eager traces and runs the same graphs as inductor minus code generation, in seconds.
    _check_compiled_equals_eager("aot_eager", caplog)


@pytest.mark.slow
def test_compiled_layers_inductor(caplog):
    torch._dynamo.reset()
    _check_compiled_equals_eager("inductor", caplog)  # minutes on a 2-core CI machine (C++ codegen)


def test_compile_config_key_reaches_the_layers():
    from persimmon_train.training.builders import prepare_for_training
    from persimmon_train.training.config import RunConfig

    cfg = RunConfig()
    cfg.trainer.compile = True
    model = PersimmonForCausalLM.from_config(parity_config())
    prepare_for_training(model, cfg)
    layer = model.model.layers[0]
    assert "forward" in layer.__dict__ and hasattr(layer.forward, "_torchdynamo_orig_callable")


def test_model_attention_key_is_checked_and_reaches_the_model():
    from persimmon_train.errors import ConfigError
    from persimmon_train.training.builders import _config_overrides
    from persimmon_train.training.config import RunConfig, validate_run_config

    cfg = RunConfig()
    cfg.model.attention = "flash9"
    with pytest.raises(ConfigError, match="model.attention"):
        validate_run_config(cfg)
    cfg.model.attention = "segments"
    assert _config_overrides(cfg, None, None)["attention"] == "segments"
