"""Convert ADEPT's original Persimmon release to a Hugging Face model folder.

    python recipes/convert_adept.py checkpoint=PATH tokenizer=PATH output_dir=OUT \
        [dtype=bf16|fp32] [max_shard_size=5GB]

checkpoint: ``model_optim_rng.pt`` or its ``mp_rank_00`` / ``iter_N`` / release folder;
tokenizer: ``adept_vocab.model``. See docs/conversion.md. Plain ``key=value`` arguments (no Hydra:
there is nothing to compose). User errors print ``error: ...`` on one line and exit 2.
"""

from __future__ import annotations

import logging
import sys

import torch

from persimmon_train.errors import ConfigError, PersimmonTrainError

USAGE = ("usage: python recipes/convert_adept.py checkpoint=PATH tokenizer=PATH output_dir=OUT "
         "[dtype=bf16|fp32] [max_shard_size=5GB]")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32}
REQUIRED = ("checkpoint", "tokenizer", "output_dir")
OPTIONAL = {"dtype": "bf16", "max_shard_size": "5GB"}


def parse_args(argv: list[str]) -> dict[str, str]:
    values = dict(OPTIONAL)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or key not in (*REQUIRED, *OPTIONAL):
            raise ConfigError(f"unknown argument {arg!r}; {USAGE}")
        values[key] = value
    missing = [key for key in REQUIRED if not values.get(key)]
    if missing:
        raise ConfigError(f"missing {', '.join(k + '=...' for k in missing)}; {USAGE}")
    if values["dtype"] not in DTYPES:
        raise ConfigError(f"dtype={values['dtype']!r} is not one of bf16, fp32")
    return values


def main(argv: list[str]) -> None:
    from persimmon_train.checkpoint.adept import convert_adept_checkpoint

    values = parse_args(argv)
    result = convert_adept_checkpoint(values["checkpoint"], values["tokenizer"], values["output_dir"],
                                      dtype=DTYPES[values["dtype"]],
                                      max_shard_size=values["max_shard_size"])
    config = result.config
    print(f"converted {result.checkpoint_file}"
          + (f" (iteration {result.iteration})" if result.iteration is not None else ""))
    print(f"  {result.num_parameters:,} parameters, {values['dtype']}, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
          f"rope_theta {config.rope_theta:g}, bos/eos {config.bos_token_id}/{config.eos_token_id}")
    print(f"wrote {result.output_dir} ({', '.join(result.weight_files)}, config.json, "
          "generation_config.json, tokenizer.model)")


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(USAGE)
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(sys.argv[1:])
    except PersimmonTrainError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        sys.exit(2)
