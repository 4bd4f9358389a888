"""Generate from an exported model or a training checkpoint, streaming tokens to the console.

    persimmon-train generate model=PATH prompt="..." [max_new_tokens=64] [greedy=true]
        [temperature=0.7] [top_k=0] [top_p=0.9] [chat=true] [seed=0] [dtype=bf16|fp32] [device=auto]

model: an HF folder (e.g. an export or a run's final/) or a checkpoint (`checkpoints/step_N`, or a
run folder: its newest checkpoint), which is exported to a temporary folder first. chat=true wraps
the prompt as `human: {prompt}\\n\\nadept:`. greedy=false samples with temperature / top_k / top_p.
Generation stops at the tokenizer's eos or after max_new_tokens. See docs/export.md.
"""

from __future__ import annotations

import sys

from persimmon_train.cli import prog
from persimmon_train.cli_args import as_bool, as_number, parse_key_values, run_main

USAGE = (
    f"usage: {prog('generate')} model=PATH prompt=TEXT [max_new_tokens=64] [greedy=true] "
    "[temperature=0.7] [top_k=0] [top_p=0.9] [chat=true] [seed=0] [dtype=bf16|fp32] [device=auto]"
)
REQUIRED = ("model", "prompt")
OPTIONAL = {
    "max_new_tokens": "64",
    "greedy": "true",
    "temperature": "0.7",
    "top_k": "0",
    "top_p": "0.9",
    "chat": "true",
    "seed": "0",
    "dtype": "bf16",
    "device": "auto",
}


def main(argv: list[str]) -> None:
    import torch

    from persimmon_train.export.chat import load_causal_lm, stream_generate
    from persimmon_train.export.exporter import export_dtype

    values = parse_key_values(argv, REQUIRED, OPTIONAL, USAGE)
    options = dict(
        max_new_tokens=as_number(values, "max_new_tokens", int, 1),
        greedy=as_bool(values, "greedy"),
        chat=as_bool(values, "chat"),
        temperature=as_number(values, "temperature", float, 0.0),
        top_k=as_number(values, "top_k", int, 0),
        top_p=as_number(values, "top_p", float, 0.0, 1.0),
        seed=as_number(values, "seed", int, 0),
    )
    dtype = export_dtype(values["dtype"]) or torch.float32  # auto: the weights as trained
    device = values["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_causal_lm(values["model"], dtype, device)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream_generate(model, tokenizer, values["prompt"], write=write, **options)
    sys.stdout.write("\n")


def run(argv: list[str] | None = None) -> None:
    run_main(main, USAGE, argv)
