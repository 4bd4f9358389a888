"""Export a training checkpoint to a plain Hugging Face model folder (or a PEFT adapter).

    persimmon-train export checkpoint=PATH output_dir=OUT [dtype=bf16|fp32|auto] [merge=true|false]
        [max_shard_size=5GB] [overwrite=false]

checkpoint: `output_dir/checkpoints/step_N` of any strategy (single, FSDP, DeepSpeed), or a run's
output_dir (its newest checkpoint). merge=true: config.json + generation_config.json + safetensors
shards + index + tokenizer, LoRA folded into the base, streamed tensor by tensor. merge=false: the
LoRA adapter alone (adapter_config.json + adapter_model.safetensors) for peft, in the dtype it was
trained in unless dtype= says otherwise. Everything comes from the checkpoint and its manifest (no
run config, no data files). A non-empty output_dir is refused unless overwrite=true, which replaces
only the files the export writes. See docs/export.md.
"""

from __future__ import annotations

from persimmon_train.cli import prog
from persimmon_train.cli_args import as_bool, parse_key_values, run_main

USAGE = (
    f"usage: {prog('export')} checkpoint=PATH output_dir=OUT [dtype=bf16|fp32] "
    "[merge=true|false] [max_shard_size=5GB] [overwrite=false]"
)
REQUIRED = ("checkpoint", "output_dir")
OPTIONAL = {"dtype": "", "merge": "true", "max_shard_size": "5GB", "overwrite": "false"}


def main(argv: list[str]) -> None:
    from persimmon_train.export import export_checkpoint
    from persimmon_train.storage.safetensors_io import map_large_blocks

    map_large_blocks()  # freed tensors go back to the OS: peak memory stays near one shard
    values = parse_key_values(argv, REQUIRED, OPTIONAL, USAGE)
    merge = as_bool(values, "merge")
    # Default: a merged model in bf16 (what inference wants); an adapter as it was trained.
    dtype = values["dtype"] or ("bf16" if merge else "auto")
    result = export_checkpoint(
        values["checkpoint"],
        values["output_dir"],
        dtype=dtype,
        merge=merge,
        max_shard_size=values["max_shard_size"],
        overwrite=as_bool(values, "overwrite"),
    )
    what = {"merged": "LoRA merged into the base", "full": "full fine-tuned weights", "adapter": "PEFT LoRA adapter"}[
        result.kind
    ]
    print(f"exported {result.checkpoint} ({result.strategy} checkpoint, {what}, {result.model_class}, {result.dtype})")
    print(f"wrote {result.output_dir} ({', '.join(result.files)})")


def run(argv: list[str] | None = None) -> None:
    run_main(main, USAGE, argv)
