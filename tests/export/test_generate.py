"""recipes/generate.py streams what our own generate produces, from an export or a checkpoint."""

from __future__ import annotations

import pytest
import torch

from persimmon_train.data import Tokenizer
from persimmon_train.export.chat import IncrementalDecoder
from persimmon_train.model import PersimmonForCausalLM
from persimmon_train.recipes.generate import main
from tests.helpers import assert_one_line_error, run_in_process, run_recipe

PROMPT = "What is the capital of France?"


def _expected_greedy_text(folder, max_new_tokens: int) -> str:
    model = PersimmonForCausalLM.from_pretrained(folder).eval()
    tokenizer = Tokenizer(folder)
    ids = torch.tensor([tokenizer.encode(tokenizer.chat_prompt(PROMPT))])
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id)
    generated = [i for i in out[0, ids.shape[1] :].tolist() if i != tokenizer.eos_id]
    assert generated, "the tiny model should say something before eos"
    return tokenizer.decode(generated)


def test_generate_from_export_and_from_checkpoint(lora_run):
    expected = _expected_greedy_text(lora_run / "final", 24)
    for model in (lora_run / "final", lora_run):  # an HF folder; a run folder (its newest checkpoint)
        ran = run_in_process(
            "generate", f"model={model}", f"prompt={PROMPT}", "max_new_tokens=24", "dtype=fp32", "greedy=true"
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert ran.stdout == expected + "\n", (model, ran.stdout, expected)


@pytest.mark.slow
def test_generate_sampling_is_seeded_and_errors_are_one_line(base_dir, export_env, capsys):
    """greedy=false samples (seeded); temperature / top_k / top_p reach the sampler: each alone,
    pushed to its limit, turns sampling into greedy decoding, which hot sampling is not. The recipe's
    main runs in-process (a subprocess per option would cost seconds each); one real run checks the
    command line gives the same text."""

    def generate(*options: str) -> str:
        main([f"model={base_dir}", "prompt=hello", "max_new_tokens=12", "dtype=fp32", "chat=false", *options])
        text = capsys.readouterr().out
        assert text.strip(), options
        return text

    hot = ["greedy=false", "temperature=3.0", "top_k=0", "top_p=1.0"]
    first = generate(*hot, "seed=3")
    assert generate(*hot, "seed=3") == first
    assert generate(*hot, "seed=4") != first
    greedy = generate("greedy=true")
    assert first != greedy
    assert generate(*hot, "seed=3", "top_k=1") == greedy
    assert generate(*hot, "seed=3", "top_p=0.0001") == greedy
    assert generate(*hot, "seed=3", "temperature=0.00001") == greedy
    proc = run_recipe(
        "generate",
        f"model={base_dir}",
        "prompt=hello",
        "max_new_tokens=12",
        "dtype=fp32",
        "chat=false",
        *hot,
        "seed=3",
        env=export_env,
    )
    universal_newlines = first.replace("\r\n", "\n").replace("\r", "\n")  # as text=True reads stdout
    assert proc.returncode == 0 and proc.stdout == universal_newlines, proc.stderr[-3000:]
    bad = run_in_process("generate", f"model={base_dir.parent / 'nope'}", "prompt=hi")
    assert_one_line_error(bad, "error: model:", "nope")


def test_incremental_decoding_keeps_multibyte_characters_whole(base_dir):
    tokenizer = Tokenizer(base_dir)
    text = "naïve café — 東京 ✓ done"
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer, {tokenizer.eos_id})
    pieces = [decoder.push(i) for i in ids] + [decoder.push(tokenizer.eos_id), decoder.finish()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 3  # it really streamed, piece by piece
