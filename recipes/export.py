"""Export a training checkpoint to a plain Hugging Face model folder (or a PEFT adapter).

    python recipes/export.py checkpoint=PATH output_dir=OUT [dtype=bf16|fp32] [merge=true|false]
        [max_shard_size=5GB] [config=PATH]

checkpoint: `output_dir/checkpoints/step_N` of any strategy (single, FSDP, DeepSpeed), or a run's
output_dir (its newest checkpoint). merge=true: config.json + generation_config.json + safetensors
shards + index + tokenizer, LoRA folded into the base, streamed tensor by tensor. merge=false: the
LoRA adapter alone (adapter_config.json + adapter_model.safetensors) for peft. config: the run's
config.yaml if it is not at output_dir/config.yaml. See docs/export.md.
"""

from __future__ import annotations

from persimmon_train.cli_args import as_bool, parse_key_values, run_main

USAGE = ("usage: python recipes/export.py checkpoint=PATH output_dir=OUT [dtype=bf16|fp32] "
         "[merge=true|false] [max_shard_size=5GB] [config=PATH]")
REQUIRED = ("checkpoint", "output_dir")
OPTIONAL = {"dtype": "bf16", "merge": "true", "max_shard_size": "5GB", "config": ""}


def main(argv: list[str]) -> None:
    from persimmon_train.export import export_checkpoint
    from persimmon_train.export.safetensors_stream import map_large_blocks

    map_large_blocks()  # freed tensors go back to the OS: peak memory stays near one shard
    values = parse_key_values(argv, REQUIRED, OPTIONAL, USAGE)
    result = export_checkpoint(values["checkpoint"], values["output_dir"], dtype=values["dtype"],
                               merge=as_bool(values, "merge"), max_shard_size=values["max_shard_size"],
                               config=values["config"] or None)
    what = {"merged": "LoRA merged into the base", "full": "full fine-tuned weights",
            "adapter": "PEFT LoRA adapter"}[result.kind]
    print(f"exported {result.checkpoint} ({result.strategy} checkpoint, {what}, {result.model_class}, "
          f"{values['dtype']})")
    print(f"wrote {result.output_dir} ({', '.join(result.files)})")


if __name__ == "__main__":
    run_main(main, USAGE)
