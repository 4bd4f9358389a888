"""What the tests share: tiny models and configs, one runner for the recipe commands (in-process or
as a child process), the one-line-error assertion, and the 2-rank launches.

One place instead of one per folder; conftest.py files hold fixtures only and import from here.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# A small, fast model and settings shared by the recipe tests (fp32: numbers are compared).
FAST = [
    "trainer.precision=fp32",
    "trainer.progress_bar=false",
    "model.hidden_size=64",
    "model.intermediate_size=256",
    "model.num_attention_heads=4",
    "model.num_hidden_layers=2",
    "data.seq_len=64",
    "trainer.micro_batch_size=8",
    "export.dtype=fp32",
]


# ----------------------------------------------------------------------------- tiny models

VOCAB = 64  # the in-memory rows' vocabulary (trainer unit tests)


def tiny_config(tokenizer=None, **overrides):
    """A 2-layer, 4-head PersimmonConfig; `overrides` replace any field.

    Without `tokenizer`: a 64-token vocabulary with pad id 0, hidden 32 (trainer unit tests on
    in-memory rows). With it: the recipes' FAST sizes over the tokenizer's vocabulary and special
    ids (a `model.path` base the recipe, export and preflight tests start from).
    """
    from persimmon_train.model import PersimmonConfig

    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    if tokenizer is not None:
        values.update(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=256,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
    values.update(overrides)
    return PersimmonConfig(**values)


# The parity tests' sizes (against transformers): a larger vocabulary and hidden size.
parity_config = functools.partial(tiny_config, vocab_size=160, hidden_size=64, intermediate_size=128)


def tiny_model(seed: int = 0, **kw):
    from persimmon_train.model import PersimmonForCausalLM

    torch.manual_seed(seed)
    return PersimmonForCausalLM.from_config(tiny_config(**kw))


def demo_tokenizer(cache_dir: Path | str | None = None):
    """The shipped demo tokenizer (`cache_dir`: the run's PERSIMMON_TRAIN_CACHE/demo, else the default)."""
    from persimmon_train.data import Tokenizer, demo_assets

    return Tokenizer((demo_assets(Path(cache_dir)) if cache_dir else demo_assets()).tokenizer_path)


def save_tiny_base(folder: Path, tokenizer, config, *, seed: int = 0, dtype: torch.dtype | None = None, **save_kwargs):
    """A seeded random causal LM of `config` + the tokenizer, written as an HF folder (in `dtype`,
    e.g. bf16 like the released files; default float32); returns the model."""
    from persimmon_train.model import PersimmonForCausalLM

    torch.manual_seed(seed)
    model = PersimmonForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)
    return model


HEADS = {
    "causal_lm": "PersimmonForCausalLM",
    "sequence_classification": "PersimmonForSequenceClassification",
    "token_classification": "PersimmonForTokenClassification",
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, LayerNorm weights and all biases included, so all are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def twins(config, head: str = "causal_lm", seed: int = 0):
    """Ours and transformers' model of `config` and `head`, with identical random weights."""
    import transformers

    import persimmon_train.model as ours_models

    ours = getattr(ours_models, HEADS[head]).from_config(config)
    randomize(ours, seed)
    hf_config = transformers.PersimmonConfig.from_dict(config.to_dict())
    hf = getattr(transformers, HEADS[head])(hf_config)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.eval(), hf.eval()


# ------------------------------------------------------------------ trainer on in-memory rows


def causal_rows(n: int, seq: int = 16, seed: int = 0) -> list[dict]:
    """Rows with different numbers of target tokens (so per-micro-batch means would be wrong)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (seq,), generator=g)
        labels = ids.clone()
        labels[: 2 + 3 * (i % 4)] = -100  # prompt-like masked prefix of varying length
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class ListLoader:
    """Serves fixed rows in order, `batch` rows at a time, forever; resumable."""

    def __init__(self, rows: list[dict], batch: int):
        self.rows, self.batch, self.position = rows, batch, 0

    def __iter__(self):
        while True:
            picked = [self.rows[(self.position + i) % len(self.rows)] for i in range(self.batch)]
            self.position += self.batch
            yield {k: torch.stack([r[k] for r in picked]) for k in picked[0]}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, sd):
        self.position = sd["position"]


def make_trainer(
    model,
    rows,
    *,
    micro: int,
    accum: int,
    steps: int,
    output_dir,
    lr=1e-2,
    clip=None,
    every=0,
    max_nonfinite=3,
    eval_rows=None,
    sgd=False,
):
    from persimmon_train.parallel import SingleDeviceStrategy
    from persimmon_train.training.config import RunConfig
    from persimmon_train.training.optim import build_optimizer, build_scheduler
    from persimmon_train.training.trackers import NullTracker
    from persimmon_train.training.trainer import Trainer

    cfg = RunConfig()
    cfg.trainer.max_steps = steps
    cfg.trainer.micro_batch_size = micro
    cfg.trainer.grad_accum_steps = accum
    cfg.trainer.precision = "fp32"
    cfg.trainer.progress_bar = False
    cfg.trainer.max_nonfinite_steps = max_nonfinite
    cfg.optim.lr = lr
    cfg.optim.grad_clip = clip
    cfg.optim.schedule = "constant"
    cfg.checkpoint.every_n_steps = every
    strategy = SingleDeviceStrategy(precision="fp32", device="cpu")
    # SGD makes the update proportional to the gradient (AdamW would amplify float noise in
    # near-zero gradients, e.g. of the k_layernorm bias, to full-size steps).
    make = (lambda m: torch.optim.SGD(m.parameters(), lr=lr)) if sgd else (lambda m: build_optimizer(m, cfg.optim))
    model, optimizer = strategy.wrap(model, make)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)

    class Metrics:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step):
            self.rows.append({"step": step, **metrics})

    return Trainer(
        cfg,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=ListLoader(rows, micro),
        eval_loader=None if eval_rows is None else ListLoader(eval_rows, micro),
        tracker=NullTracker(),
        metrics_file=Metrics(),
        output_dir=str(output_dir),
        id2label=None,
    )


def lora_steps_from_folder(strategy, folder, *, steps: int = 4, batch: int = 2, seq: int = 16, data_seed: int = 0):
    """LoRA on `folder` (an HF model folder) the way a run builds it: meta model, peft, strategy.wrap
    (which loads model.path), then `steps` AdamW steps under the strategy's autocast.

    Returns (losses, {trainable name: float32 tensor after training}, {parameter name: dtype}).
    """
    from persimmon_train.adapters import apply_lora
    from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
    from persimmon_train.training.config import PeftConfig

    config = PersimmonConfig.from_json_file(folder)
    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
    model = apply_lora(model, PeftConfig(method="lora", r=4, alpha=8.0, dropout=0.0), "causal_lm")
    model, optimizer = strategy.wrap(
        model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    )
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(data_seed)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=generator)  # one batch, learnt
    losses = []
    for _ in range(steps):
        with strategy.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    trained = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            trained[name] = value.detach().float().clone()
    return losses, trained, dtypes


# ------------------------------------------------------------------------ running a command


def recipe_env(tmp_path: Path, **extra) -> dict:
    """The environment of a child run: its own cache and wandb folder, this checkout first on the path."""
    env = dict(os.environ)
    env.update(
        PERSIMMON_TRAIN_CACHE=str(tmp_path / "cache"),
        WANDB_DIR=str(tmp_path / "wandb_dir"),
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    env.pop("WANDB_API_KEY", None)
    # `python recipes/x.py` puts recipes/ first on sys.path, not the checkout: without this an
    # installed copy of persimmon_train (site-packages, another checkout's editable install, a
    # mutation-check copy's original) would be what the child runs.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def run_environ(env: dict) -> dict:
    """What run_in_process needs of a child's environment (recipe_env): its cache and wandb folder."""
    return {key: env[key] for key in ("PERSIMMON_TRAIN_CACHE", "WANDB_DIR", "WANDB_MODE")}


def run_command(
    cmd: list[str], *, env: dict | None = None, cwd=REPO, timeout: float = 300, check: bool = True, **popen
) -> subprocess.CompletedProcess:
    """Run `cmd` to its end, in its own session: a timeout kills its whole process group (a
    launcher's ranks included, which would otherwise hold ports and cores for the tests after it).
    `check`: fail with the tail of its output unless it exits 0."""
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            raise AssertionError(
                f"{' '.join(map(str, cmd[:4]))} ... still running after {timeout:.0f} s; killed\n"
                f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"
            ) from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd[:4]))} ... exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
            f"stderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def run_recipe(job: str, *args: str, env: dict, timeout: float = 300, check: bool = True, **popen):
    """`python recipes/<job>.py ARGS` in a child process, from the checkout."""
    return run_command(
        [sys.executable, str(REPO / "recipes" / f"{job}.py"), *args], env=env, timeout=timeout, check=check, **popen
    )


def persimmon_train(*args: str, env: dict, cwd=REPO, timeout: float = 300, check: bool = True):
    """`persimmon-train ARGS` in a child process, via `python -m persimmon_train.recipes` (the
    checkout first on the path)."""
    env = dict(env, PYTHONPATH=str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    return run_command(
        [sys.executable, "-m", "persimmon_train.recipes", *args], env=env, cwd=cwd, timeout=timeout, check=check
    )


@dataclass
class Ran:
    """The result of a command run in-process (the fields a CompletedProcess has)."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(command: str, *args: str, environ: dict | None = None) -> Ran:
    """`persimmon-train COMMAND ARGS` in this process (the console command's `main`, the code every
    recipe file runs): its exit code and what it printed. For what happens before any compute (an
    error message, a refusal) and for short runs that tests read; what the process itself does (a
    launcher, a file limit, a kill) needs a child.

    `environ`: variables set while it runs (e.g. PERSIMMON_TRAIN_CACHE), then restored. The run's
    side effects on this process are undone: torch's thread count, the signal handlers a run
    installs, and the `persimmon_train` logger's handlers.
    """
    import contextlib
    import io
    import logging

    from persimmon_train.recipes.main import main

    threads = torch.get_num_threads()
    signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    logger = logging.getLogger("persimmon_train")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    saved = {key: os.environ.get(key) for key in environ or {}}
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(environ or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([command, *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)
        for number, handler in signals.items():
            signal.signal(number, handler)
        for handler in list(logger.handlers):
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate, logger.level = propagate, level
    return Ran(code, out.getvalue(), err.getvalue())


def run_recipe_here(job: str, *args: str, env: dict, check: bool = True) -> Ran:
    """run_recipe's command in this process (run_in_process with `env`'s cache and wandb folder): the
    same code without a child's start-up (~10 s of imports on 2 cores), for runs whose numbers and
    files are checked rather than the process. `check`: fail with its output unless it exits 0."""
    ran = run_in_process(job, *args, environ=run_environ(env))
    if check and ran.returncode != 0:
        raise AssertionError(f"{job} {' '.join(args[-3:])} ... exited {ran.returncode}\nstderr:\n{ran.stderr[-6000:]}")
    return ran


def assert_one_line_error(proc, *needles: str) -> str:
    """A user error: exit 2, no traceback, and the last line of stderr `error: ...` naming each needle."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_losses(output_dir: Path) -> list[float]:
    return [row["eval_loss"] for row in read_metrics(output_dir) if "eval_loss" in row]


def load_tensors(folder) -> dict[str, torch.Tensor]:
    from persimmon_train.storage import iter_weights_folder

    return {name: tensor.clone() for name, tensor in iter_weights_folder(folder)}


# ------------------------------------------------------------- 2-rank launches (tests/distributed)

STEPS = 10
# fp32, AC on, 10 steps, global batch 8 rows: 1 rank x 8 or 2 ranks x 4.
COMMON = [
    *FAST,
    f"trainer.max_steps={STEPS}",
    "trainer.eval_at_start=false",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_max_batches=2",
    "trainer.activation_checkpointing=1",
    "checkpoint.every_n_steps=5",
    "checkpoint.keep_last=0",
    "optim.warmup_steps=2",
    "trainer.num_threads=1",
]
LORA = ["peft=lora", "peft.dropout=0.0"]
# Tiny params would stay unpartitioned under ZeRO-3 (persistence threshold); partition everything.
ZERO3 = [
    "strategy=deepspeed",
    "strategy.stage=3",
    "strategy.extra={zero_optimization:{stage3_param_persistence_threshold:0}}",
]
JOBS = {
    "single": ["strategy=single", "peft=none", "trainer.micro_batch_size=8"],
    "single_lora": ["strategy=single", *LORA, "trainer.micro_batch_size=8"],
    "fsdp": ["strategy=fsdp", "peft=none", "trainer.micro_batch_size=4"],
    "fsdp_lora": ["strategy=fsdp", *LORA, "trainer.micro_batch_size=4"],
    "zero2": ["strategy=deepspeed", "strategy.stage=2", "peft=none", "trainer.micro_batch_size=4"],
    # bf16: DeepSpeed names its optimizer partitions bf16_zero_pp_rank_*; the run ends in an export.
    "zero2_bf16": [
        "strategy=deepspeed",
        "strategy.stage=2",
        "peft=none",
        "trainer.micro_batch_size=4",
        "trainer.precision=bf16",
    ],
    "zero2_lora": ["strategy=deepspeed", "strategy.stage=2", *LORA, "trainer.micro_batch_size=4"],
    "zero3": [*ZERO3, "peft=none", "trainer.micro_batch_size=4"],
    "zero3_lora": [*ZERO3, *LORA, "trainer.micro_batch_size=4"],
}


def strategy_of(overrides) -> str:
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("strategy=")]
    return names[-1] if names else "single"


def launch_command(
    output_dir: Path, overrides: list[str], env: dict, nproc: int = 2, common=None, launcher: str | None = None
):
    """(argv, env) running recipes/finetune.py as a user would: python, launch/torchrun.sh or launch/deepspeed.sh.

    Several ranks start under launch/torchrun.sh unless `launcher="deepspeed"`: DeepSpeed's own
    launcher (two more interpreters, each importing torch and DeepSpeed) adds 3-6 s a launch on 2
    cores, and what the rank runs is the same (deepspeed.init_distributed reads torchrun's
    RANK/WORLD_SIZE/MASTER_*). The tests that name it check the DeepSpeed launcher itself."""
    if launcher is None:
        launcher = "torchrun" if nproc > 1 else "python"
    args = [*(COMMON if common is None else common), *overrides, f"output_dir={output_dir}"]
    if launcher == "python":
        cmd = [sys.executable, str(REPO / "recipes" / "finetune.py"), *args]
    else:
        cmd = ["bash", str(REPO / "launch" / f"{launcher}.sh"), "recipes/finetune.py", *args]
    env = dict(
        env,
        # launch/torchrun.sh restarts a failed group 3 times by default: a test that expects a
        # failure would wait for every restart (tests of restarts set MAX_RESTARTS themselves).
        MAX_RESTARTS=env.get("MAX_RESTARTS", "0"),
        NPROC_PER_NODE=str(nproc),
        NUM_GPUS=str(nproc),
        TORCHRUN=str(VENV_BIN / "torchrun"),
        DEEPSPEED=str(VENV_BIN / "deepspeed"),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    return cmd, env


def launch(
    output_dir: Path,
    overrides: list[str],
    env: dict,
    timeout: float = 600,
    nproc: int = 2,
    common=None,
    launcher: str | None = None,
):
    """Run recipes/finetune.py to completion (COMMON settings unless `common` is given); fail with its output."""
    cmd, env = launch_command(output_dir, overrides, env, nproc=nproc, common=common, launcher=launcher)
    return run_command(cmd, env=env, timeout=timeout)


def run_here(output_dir: Path, overrides: list[str], env: dict, common=None) -> Ran:
    """launch()'s one-process `strategy=single` run, in this process (run_recipe_here)."""
    assert strategy_of(overrides) == "single", overrides
    return run_recipe_here(
        "finetune", *(COMMON if common is None else common), *overrides, f"output_dir={output_dir}", env=env
    )


class Runs:
    """The JOBS runs under `root`, each made at most once per session (`get(name)`): the equality,
    checkpoint, preemption and export tests read the same runs. `strategy=single` runs in this
    process (run_here), the others through launch/torchrun.sh (launch)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = recipe_env(root)
        self.done: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            out = self.root / name
            if strategy_of(JOBS[name]) == "single":
                run_here(out, JOBS[name], self.env)
            else:
                launch(out, JOBS[name], self.env)
            self.done[name] = out
        return self.done[name]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float, poll: float = 0.05) -> None:
    """Poll every `poll` seconds until `path` exists, while `proc` runs (to SIGKILL it mid-run after
    that; a one-process tiny run needs a short `poll` to be killed before it finishes)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            output = proc.stdout.read()[-3000:] if proc.stdout else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(poll)


def train_losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir) if "loss" in row}


def strategy_json(checkpoint: Path) -> dict:
    """What the checkpoint's manifest says about its writer (strategy + peft settings)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return {**manifest["strategy"], "peft": manifest["peft"]}
