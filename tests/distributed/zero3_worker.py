"""Run under `torchrun --nproc_per_node 2` by test_zero3_load.py; writes OUT/<mode>_rank<r>.json.

ZeRO-3 from a safetensors folder, two ways, each in its own launch:
- mode "full": every rank `from_pretrained`s the whole model, then deepspeed.initialize (the baseline);
- mode "meta": the model is built on the meta device and DeepSpeedStrategy.wrap fills it module by
  module (parallel/zero3_load.py).
Reports this rank's peak host memory (VmHWM, reset just before the model is built) after the load
(before deepspeed.initialize) and after the wrap, and whether the gathered parameters equal the
file's tensors.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from bench.host_memory import reset_peak, status_kib

# HF's "auto" bucket sizes for the worker's hidden size 512 (DeepSpeed's defaults are sized for big models).
ZERO = {
    "stage3_param_persistence_threshold": 0,
    "reduce_bucket_size": 512 * 512,
    "stage3_prefetch_bucket_size": int(0.9 * 512 * 512),
}


def main(out_dir: str, folder: str, mode: str) -> None:
    import deepspeed
    from safetensors.torch import load_file

    from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
    from persimmon_train.parallel.deepspeed import DeepSpeedStrategy
    from persimmon_train.parallel.ds_config import build_ds_config

    strategy = DeepSpeedStrategy(
        precision="fp32",
        device="cpu",
        model_path=folder,
        make_config=lambda world, prec: build_ds_config(
            stage=3,
            micro_batch_size=1,
            grad_accum_steps=1,
            world_size=world,
            grad_clip=1.0,
            precision=prec,
            extra={"zero_optimization": ZERO},
        ),
    )
    report = {"rank": strategy.rank, "mode": mode}
    # One-time costs of a first model build (lazy imports, meta kernels: ~70 MB) out of the measure.
    with torch.device("meta"):
        PersimmonForCausalLM(
            PersimmonConfig(
                vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
            )
        )
    rss_before = status_kib("VmRSS")
    report["hwm_reset"] = reset_peak()  # VmHWM measures the build + wrap alone
    if mode == "meta":
        from persimmon_train.parallel.zero3_load import materialize_zero3

        config = PersimmonConfig.from_json_file(folder)
        with torch.device("meta"):
            model = PersimmonForCausalLM(config)
        # What wrap() does first for a meta model; called here to measure the load on its own.
        materialize_zero3(model, folder, strategy.ds_config, seed=0, is_main=strategy.is_main, device=strategy.device)
    else:
        model = PersimmonForCausalLM.from_pretrained(folder, dtype=torch.float32)
    report["load_peak_delta_bytes"] = (status_kib("VmHWM") - rss_before) * 1024
    strategy.wrap(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    report["peak_delta_bytes"] = (status_kib("VmHWM") - rss_before) * 1024
    module = strategy.unwrapped_model()
    report["full_bytes"] = sum(p.ds_numel * 4 for p in module.parameters())
    report["partition_bytes"] = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in module.parameters())
    expected = load_file(os.path.join(folder, "model.safetensors")) if strategy.is_main else {}
    same = True
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if strategy.is_main:
                same &= torch.equal(param.detach().cpu(), expected[name])
    report["equal_to_file"] = bool(same)
    with open(os.path.join(out_dir, f"{mode}_rank{strategy.rank}.json"), "w") as f:
        json.dump(report, f)
    strategy.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # End without finalizing the interpreter: gloo's worker threads outlive destroy_process_group
    # (DeepSpeed's parameters and groups module still reference the groups) and so run into the
    # interpreter's finalization, where a thread that touches a Python object aborts the process
    # ("terminate called without an active exception", exit -6; seen once in CI). The report is on disk
    # and closed; nothing is left to run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
