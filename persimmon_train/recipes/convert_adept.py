"""Convert ADEPT's original Persimmon release to a Hugging Face model folder.

    persimmon-train convert-adept checkpoint=PATH tokenizer=PATH output_dir=OUT \
        [dtype=bf16|fp32] [max_shard_size=5GB]

checkpoint: ``model_optim_rng.pt`` or its ``mp_rank_00`` / ``iter_N`` / release folder;
tokenizer: ``adept_vocab.model``. See docs/conversion.md. Plain ``key=value`` arguments (no Hydra:
there is nothing to compose). User errors print ``error: ...`` on one line and exit 2.
"""

from __future__ import annotations

import torch

from persimmon_train.cli import prog
from persimmon_train.cli_args import as_bool, parse_key_values, run_main
from persimmon_train.errors import ConfigError

USAGE = (
    f"usage: {prog('convert_adept')} checkpoint=PATH tokenizer=PATH output_dir=OUT "
    "[dtype=bf16|fp32] [max_shard_size=5GB] [overwrite=false]"
)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
REQUIRED = ("checkpoint", "tokenizer", "output_dir")
OPTIONAL = {"dtype": "bf16", "max_shard_size": "5GB", "overwrite": "false"}


def parse_args(argv: list[str]) -> dict[str, str]:
    values = parse_key_values(argv, REQUIRED, OPTIONAL, USAGE)
    if values["dtype"] not in DTYPES:
        raise ConfigError(f"dtype={values['dtype']!r} is not one of bf16, fp32")
    return values


def main(argv: list[str]) -> None:
    from persimmon_train.export.adept import convert_adept_checkpoint

    values = parse_args(argv)
    result = convert_adept_checkpoint(
        values["checkpoint"],
        values["tokenizer"],
        values["output_dir"],
        dtype=DTYPES[values["dtype"]],
        max_shard_size=values["max_shard_size"],
        overwrite=as_bool(values, "overwrite"),
    )
    config = result.config
    print(
        f"converted {result.checkpoint_file}"
        + (f" (iteration {result.iteration})" if result.iteration is not None else "")
    )
    print(
        f"  {result.num_parameters:,} parameters, {values['dtype']}, "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
        f"rope_theta {config.rope_theta:g}, bos/eos {config.bos_token_id}/{config.eos_token_id}"
    )
    print(
        f"wrote {result.output_dir} ({', '.join(result.weight_files)}, config.json, "
        "generation_config.json, tokenizer.model)"
    )


def run(argv: list[str] | None = None) -> None:
    run_main(main, USAGE, argv)
