"""What a real run puts on disk survives user mistakes: failed commands change nothing, damaged
checkpoints are named (or skipped by resume=latest), a full disk is one line, and the end of the
run is an export of its last checkpoint that peft and transformers load."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persimmon_train.storage import validate_checkpoint
from persimmon_train.training import run_folder
from tests.helpers import (
    FAST,
    assert_one_line_error,
    demo_tokenizer,
    read_metrics,
    recipe_env,
    run_environ,
    run_in_process,
    run_recipe,
    tiny_config,
)

JOB = [
    *FAST,
    "peft=lora",
    "trainer.max_steps=6",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=0",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_at_start=false",
    "trainer.eval_max_batches=1",
    "optim.lr=3e-3",
    # Bit-identity needs a fixed reduction order: one thread (MKL's default MKL_DYNAMIC lets it use
    # fewer threads than asked when the machine is busy; seen: a resume that differed only under load).
    "trainer.num_threads=1",
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): byte-identity of a whole tree."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return recipe_env(tmp_path_factory.mktemp("persist_env"), MKL_DYNAMIC="FALSE", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def run(tmp_path_factory, env) -> Path:
    """One finished LoRA run (in this process): checkpoints at steps 2, 4, 6, final/ and adapter/."""
    out = tmp_path_factory.mktemp("persist") / "run"
    ran = run_in_process("finetune", *JOB, f"output_dir={out}", environ=run_environ(env))
    assert ran.returncode == 0, ran.stderr[-5000:]
    return out


@pytest.fixture
def here(env, monkeypatch):
    """Run a command in this process, with the module's cache and wandb folder (what `env` gives a child)."""
    for key, value in run_environ(env).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return lambda *args: run_in_process("finetune", *JOB, *args)


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_failed_commands_leave_output_dir_byte_identical(run, tmp_path, here):
    copy = _copy(run, tmp_path)
    before = snapshot(copy)
    typo = here(f"output_dir={copy}", "resume=latest", "peft.alpha=64", f"data.train_files=[{tmp_path / 'typo.jsonl'}]")
    assert_one_line_error(typo, "typo.jsonl")
    other_r = here(f"output_dir={copy}", "resume=latest", "peft.r=8")
    assert_one_line_error(other_r, "peft.r", "step_6")
    other_shape = here(f"output_dir={copy}", "resume=latest", "model.num_hidden_layers=3")
    assert_one_line_error(other_shape, "num_hidden_layers")
    assert snapshot(copy) == before

    # Export reads the checkpoint's manifest, not the (untouched anyway) config.yaml: equals final/.
    out = tmp_path / "export"
    ran = run_in_process("export", f"checkpoint={copy}", f"output_dir={out}", "dtype=fp32")
    assert ran.returncode == 0, ran.stderr[-3000:]
    exported, final = load_file(str(out / "model.safetensors")), load_file(str(copy / "final" / "model.safetensors"))
    assert exported.keys() == final.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, final[name]), name


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(run, tmp_path, here):
    """The same command again (no resume=) would replace the run's checkpoints and metrics: refused."""
    copy = _copy(run, tmp_path)
    before = snapshot(copy)
    rerun = here(f"output_dir={copy}")
    assert_one_line_error(
        rerun, "already holds a run (checkpoints step_2, step_4, step_6;", "resume=latest", "overwrite=true"
    )
    assert "tokenizing" not in rerun.stderr and "step 1" not in rerun.stderr  # before any compute
    # Another run holds the folder (here: this test's own lock, taken apart from the run's): refused
    # naming its pid and host.
    lock = run_folder.acquire(str(copy))
    try:
        before_locked = snapshot(copy)
        busy = here(f"output_dir={copy}", "resume=latest")
        assert_one_line_error(busy, "is in use by another run", f"pid {os.getpid()} on host")
        assert snapshot(copy) == before_locked
    finally:
        lock.release()
    assert snapshot(copy) == before


def test_resume_latest_with_every_checkpoint_damaged_is_refused_and_changes_nothing(run, tmp_path, here):
    copy = _copy(run, tmp_path)
    for step in (2, 4, 6):
        (copy / "checkpoints" / f"step_{step}" / "optimizer.pt").write_bytes(b"")
    before = snapshot(copy)
    line = assert_one_line_error(
        here(f"output_dir={copy}", "resume=latest"), "resume=latest: no checkpoint in", "overwrite=true"
    )
    for step in (2, 4, 6):
        assert f"step_{step}: {copy / 'checkpoints' / f'step_{step}' / 'optimizer.pt'} has 0 bytes" in line
    assert snapshot(copy) == before  # metrics.jsonl and the damaged checkpoints included


def test_overwrite_starts_over_and_keeps_files_that_are_not_the_runs(run, tmp_path, here):
    copy = _copy(run, tmp_path)
    (copy / "notes.txt").write_text("mine")
    (copy / "final" / "README.md").write_text("my model card")
    ran = here("trainer.max_steps=2", f"output_dir={copy}", "overwrite=true")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_2"]  # no step_4/6 left to resume
    assert [r["step"] for r in read_metrics(copy) if "loss" in r] == [1, 2]
    assert (copy / "notes.txt").read_text() == "mine"
    assert (copy / "final" / "README.md").read_text() == "my model card"
    assert (copy / "train.log").read_text().count("finetune: output_dir=") == 1  # a new log, not appended
    assert (copy / "final" / "model.safetensors").is_file()
    assert not (copy / run_folder.LOCK_FILE).exists()  # released at the end


@pytest.mark.parametrize("damaged", ["optimizer.pt", "trainer_state.pt", "model.safetensors"])
def test_resume_from_a_damaged_checkpoint_names_the_file(damaged, run, tmp_path, here):
    copy = _copy(run, tmp_path)
    target = copy / "checkpoints" / "step_4" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    before = snapshot(copy)
    proc = here(f"output_dir={copy}", f"resume={copy / 'checkpoints' / 'step_4'}")
    assert_one_line_error(proc, f"step_4/{damaged}")
    assert snapshot(copy) == before  # metrics.jsonl, config.yaml, train.log: untouched


def test_resume_latest_falls_back_past_a_damaged_checkpoint(run, tmp_path, here):
    """Newest checkpoint gone, the one before damaged: resume=latest takes step_2, logs why it skipped
    step_4, and the final weights are bit-identical to the uninterrupted run's."""
    copy = _copy(run, tmp_path)
    uninterrupted = load_file(str(copy / "final" / "model.safetensors"))
    shutil.rmtree(copy / "checkpoints" / "step_6")
    optimizer = copy / "checkpoints" / "step_4" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    optimizer.write_bytes(bytes(data))
    proc = here(f"output_dir={copy}", "resume=latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping damaged checkpoint step_4" in proc.stderr and "checksum" in proc.stderr
    assert "resumed from" in proc.stderr and "step_2 at step 2" in proc.stderr
    resumed = load_file(str(copy / "final" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert [r["step"] for r in read_metrics(copy) if "loss" in r] == list(range(1, 7))


def _limit_file_size(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # CPython ignores SIGXFSZ: writes get EFBIG

    return preexec


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_earlier_ones(run, tmp_path, env):
    copy = _copy(run, tmp_path)
    for step in (4, 6):
        shutil.rmtree(copy / "checkpoints" / f"step_{step}")
    shutil.rmtree(copy / "final")
    limit = 100_000  # below the LoRA checkpoint's weight/optimizer files, above the logs
    assert (copy / "checkpoints" / "step_2" / "optimizer.pt").stat().st_size > limit
    proc = run_recipe(
        "finetune",
        *JOB,
        f"output_dir={copy}",
        "resume=latest",
        env=env,
        check=False,
        preexec_fn=_limit_file_size(limit),
    )
    assert_one_line_error(
        proc,
        "checkpoint step_4 not written",
        str(copy / "checkpoints" / "step_4.tmp"),
        "earlier checkpoints are intact",
    )
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_2"]
    validate_checkpoint(str(copy / "checkpoints" / "step_2"))  # still complete and undamaged


def test_bad_output_dir_and_model_path_are_one_line(tmp_path, here):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for overrides, needle in (
        ([f"output_dir={a_file}"], "output_dir"),
        ([f"output_dir={a_file / 'sub'}"], "output_dir"),
        ([f"model.path={a_file}", f"output_dir={tmp_path / 'o'}"], "model.path"),
    ):
        assert_one_line_error(here(*overrides), needle, str(a_file))
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def _tokenizer_and_config(env):
    """The demo tokenizer and a tiny model config over it (for a model.path base)."""
    tokenizer = demo_tokenizer(Path(env["PERSIMMON_TRAIN_CACHE"]) / "demo")
    return tokenizer, tiny_config(tokenizer)


def test_nan_in_model_path_weights_names_the_tensor(tmp_path, env, here):
    from persimmon_train.model import PersimmonForCausalLM

    tokenizer, config = _tokenizer_and_config(env)
    model = PersimmonForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.layers[1].mlp.dense_h_to_4h.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    proc = here(f"model.path={tmp_path / 'base'}", f"output_dir={tmp_path / 'o'}")
    assert_one_line_error(proc, "model.layers.1.mlp.dense_h_to_4h.weight", "NaN")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_one_rank_fsdp_lora_writes_an_adapter_peft_loads(tmp_path, env):
    """The run's adapter/ at any strategy and world size (here FSDP2 on one rank), in the dtype it
    was trained in, giving in peft the logits of the run's merged final/."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from persimmon_train.model import PersimmonForCausalLM

    tokenizer, config = _tokenizer_and_config(env)
    torch.manual_seed(0)
    PersimmonForCausalLM.from_config(config).save_pretrained(tmp_path / "base", tokenizer=tokenizer)
    out = tmp_path / "fsdp1"
    run_recipe(
        "finetune",
        *JOB,
        "trainer.max_steps=2",
        "strategy=fsdp",
        f"model.path={tmp_path / 'base'}",
        f"output_dir={out}",
        env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29617"},
    )
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert json.loads((out / "checkpoints" / "step_2" / "manifest.json").read_text())["strategy"]["name"] == "fsdp"
    base = transformers.PersimmonForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.randint(3, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_readonly_output_dir_is_one_line(tmp_path, here, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only, real_access = os.path.abspath(parent), os.access

    def access(path, mode, *args, **kwargs):
        # The folder refuses writes. (chmod 555 would too, but not for root, which CI machines may run as.)
        if os.path.abspath(path) == read_only:
            return not mode & os.W_OK and real_access(path, mode, *args, **kwargs)
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    assert_one_line_error(here(f"output_dir={parent / 'run'}"), "output_dir", "read-only", str(parent))
    assert list(parent.iterdir()) == []


def test_train_log_keeps_the_start_up_lines(run):
    """Logged while the run validated (before output_dir may be written), then written to train.log first."""
    lines = (run / "train.log").read_text().splitlines()
    assert "finetune: output_dir=" in lines[0] and "strategy=single" in lines[0]
    assert any("model: random init" in line for line in lines[:10])
