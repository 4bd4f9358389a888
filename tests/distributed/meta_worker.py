"""Run under `torchrun --nproc_per_node 2` by test_meta_sharding.py; writes OUT/rank<r>.json.

1. The released 8B config built on the meta device and sharded with fully_shard over the gloo
   group: this rank's parameter bytes (nothing is allocated: meta shards).
2. A small HF safetensors folder loaded shard-wise into a meta-built model: this rank's peak
   host memory (VmHWM reset before the load, or VmRSS sampled during it where the reset is not
   allowed) against the model's full size.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from bench.host_memory import RssSampler, reset_peak, status_kib
from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
from persimmon_train.parallel.fsdp import FSDPStrategy


def _local_bytes(model) -> int:
    return sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def main(out_dir: str, small_model: str) -> None:
    strategy = FSDPStrategy(precision="fp32", device="cpu")
    report = {"rank": strategy.rank, "world_size": strategy.world_size}

    with torch.device("meta"):
        big = PersimmonForCausalLM(PersimmonConfig())  # the defaults: the released 8B
    report["8b_full_bytes"] = sum(p.numel() * p.element_size() for p in big.parameters())
    strategy.parallelize(big)
    report["8b_rank_bytes"] = _local_bytes(big)
    report["8b_all_meta"] = all(p.to_local().is_meta for p in big.parameters())
    del big

    config = PersimmonConfig.from_json_file(small_model)
    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
    report["small_full_bytes"] = sum(p.numel() * 4 for p in model.parameters())
    strategy.model_path = small_model
    rss_before = status_kib("VmRSS")
    # Rank 1 always samples, so the fallback is exercised everywhere. Where clear_refs is not
    # writable (some containers), VmHWM still holds the peak of the imports and the 8B step above;
    # VmRSS is sampled during the load instead. A whole extra copy of the model lives for the
    # whole copy loop, far longer than one sampling interval.
    reset = strategy.rank != 1 and reset_peak()  # VmHWM measures the load alone
    report["peak_method"] = "VmHWM" if reset else "sampled VmRSS"
    sampler = RssSampler() if report["peak_method"] != "VmHWM" else None
    strategy.wrap(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    peak = sampler.stop() if sampler is not None else status_kib("VmHWM")
    report["load_peak_delta_bytes"] = (peak - rss_before) * 1024
    report["small_rank_bytes"] = _local_bytes(model)
    report["loaded_tensors"] = strategy.load_report["loaded"]
    # Correctness: this rank's shards are the file's slices.
    from safetensors import safe_open

    from persimmon_train.parallel.sharded_load import local_slices

    with safe_open(os.path.join(small_model, "model.safetensors"), framework="pt") as handle:
        report["shards_match_file"] = all(
            torch.equal(p.to_local(), handle.get_tensor(name)[local_slices(p)]) for name, p in model.named_parameters()
        )
    with open(os.path.join(out_dir, f"rank{strategy.rank}.json"), "w") as f:
        json.dump(report, f)
    strategy.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
