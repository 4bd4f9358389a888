"""The entry-point wrapper (in-process) and trackers: W&B as cluster users meet it.

W&B is exercised two ways, never over the network: a fake `wandb` module (what our code asks of
wandb, failures on demand), and the real wandb in offline mode or pointed at a closed local port
(what lands in the run file, read back with tests/recipes/wandb_reader.py).
"""

from __future__ import annotations

import glob
import importlib.machinery
import json
import logging
import os
import sys
import time
import types

import pytest

from persimmon_train import cli
from persimmon_train.errors import ConfigError
from persimmon_train.training import trackers


def test_strip_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.strip_local_rank(["a=1", "--local_rank=3", "b=2"]) == ["a=1", "b=2"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert cli.strip_local_rank(["--local_rank", "1", "c=3"]) == ["c=3"]
    assert os.environ["LOCAL_RANK"] == "1"


@pytest.mark.parametrize("job", ["finetune", "classify", "tag", "evaluate"])
def test_every_job_config_composes(job):
    cfg = cli.load_config(job, ["data.train_files=[x.jsonl]"])
    assert cfg.task in ("causal_lm", "sequence_classification", "token_classification")
    assert cfg.data.train_files == ["x.jsonl"]


@pytest.mark.parametrize(
    "experiment, job",
    [("lora_chat_16k", "finetune"), ("full_chat_16k", "finetune"), ("classify", "classify"), ("tag", "tag")],
)
def test_experiments_compose(experiment, job):
    cfg = cli.load_config(
        job, [f"experiment={experiment}", "model.path=/weights/persimmon-8b", "data.train_files=[x.jsonl]"]
    )
    assert cfg.model.hidden_size == 4096 and cfg.trainer.activation_checkpointing == 1


@pytest.mark.parametrize("model", ["persimmon_8b", "persimmon_8b_chat"])
def test_released_model_configs_describe_persimmon_8b(model):
    """conf/model/persimmon_8b*.yaml name presets with the released architecture (the chat file takes
    its settings from persimmon_8b.yaml through its defaults list). Oracle: transformers' PersimmonConfig defaults,
    documented as adept/persimmon-8b-base, except RoPE's base: the released config.json says 25000
    where transformers defaults to 10000 (../shared/DESIGN.md, released-file facts)."""
    from transformers import PersimmonConfig

    released = PersimmonConfig()
    cfg = cli.load_config("finetune", [f"model={model}", "model.path=/weights"]).model
    assert cfg.name == model
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "qk_layernorm",
        "hidden_act",
        "layer_norm_eps",
    ):
        assert getattr(cfg, key) == getattr(released, key), key
    rope = getattr(released, "rope_parameters", None) or {"partial_rotary_factor": released.partial_rotary_factor}
    assert cfg.partial_rotary_factor == rope["partial_rotary_factor"]
    assert cfg.rope_theta == 25000.0
    # Fine-tuning never inherits the released config.json's pre-training dropout (0.6).
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0


def test_run_recipe_prints_one_line_and_exits_2(capsys):
    def main(cfg):
        raise ConfigError("data.format: nope")

    with pytest.raises(SystemExit) as exit_info:
        cli.run_recipe("finetune", main, argv=["trainer.max_steps=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: data.format: nope"


def test_defaults_embedded_run():
    cfg = cli.load_config("finetune", [])
    assert (cfg.model.name, cfg.peft.method, cfg.data.format, cfg.strategy.name) == ("tiny", "lora", "chat", "single")
    assert cfg.data.train_files and os.path.isfile(cfg.data.train_files[0])


def test_metrics_jsonl_is_trimmed_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = trackers.JsonlMetrics(str(path))
    for step in range(1, 6):
        writer.log({"loss": float(step), "lr": 0.1}, step)
    trackers.JsonlMetrics(str(path), resume_step=3).log({"loss": 9.0, "lr": 0.1}, 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0


def test_api_key_is_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-key-123456")
    assert trackers.redact_secrets("key=sekrit-key-123456!") == "key=***!"


# ------------------------------------------------------------------------------------------- W&B

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


class FakeRun:
    def __init__(self, wandb, run_id: str, folder: str):
        self.wandb, self.id, self.dir = wandb, run_id, os.path.join(folder, "files")
        self.logged, self.summary, self.finished = [], FakeSummary(wandb), None

    def log(self, metrics, step):
        if "log" in self.wandb.failing:
            raise RuntimeError("log: connection reset by peer")
        self.logged.append((step, dict(metrics)))

    def finish(self, exit_code=0):
        if "finish" in self.wandb.failing:
            raise RuntimeError("finish: upload failed")
        self.finished = exit_code


class FakeSummary(dict):
    def __init__(self, wandb):
        super().__init__()
        self.wandb = wandb

    def update(self, values):
        if "summary" in self.wandb.failing:
            raise RuntimeError("summary: upload failed")
        super().update(values)


class FakeWandb(types.ModuleType):
    """Just what WandbTracker uses: Settings(**kw), init(**kw) -> run with id/dir/log/summary/finish."""

    def __init__(self, root: str, online_error: Exception | None = None, failing=()):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # peft/accelerate probe find_spec("wandb")
        self.root, self.online_error, self.failing = root, online_error, set(failing)
        self.settings, self.inits, self.runs = [], [], []

    def Settings(self, **kwargs):  # noqa: N802 - wandb's name
        self.settings.append(kwargs)
        return kwargs

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if kwargs["mode"] == "online" and self.online_error is not None:
            raise self.online_error
        run_id = kwargs["id"] or f"fake{len(self.runs)}"
        run = FakeRun(self, run_id, os.path.join(self.root, f"{kwargs['mode']}-run-{run_id}"))
        self.runs.append(run)
        return run


@pytest.fixture
def pt_log(caplog):
    """Capture the `persimmon_train` logger even after setup_logging turned its propagation off."""
    logger = logging.getLogger("persimmon_train")
    propagate, level = logger.propagate, logger.level
    logger.propagate = False  # caplog's handler sits on the root logger too: count each record once
    logger.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate, logger.level = propagate, level


def _wandb_cfg(**kw):
    from persimmon_train.training.config import TrackerConfig

    return TrackerConfig(backend="wandb", **kw)


def _settled(read, path: str, timeout: float = 20.0):
    """`read(path)` once wandb's service has written the whole run (in-process, finish() can return
    before the last records reach the file)."""
    from tests.recipes import wandb_reader

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.WhichOneof("record_type") == "exit" for r in wandb_reader.records(path)):
            break
        time.sleep(0.2)
    return read(path)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "W&B" in r.getMessage()]


def test_wandb_unreachable_falls_back_to_offline_with_the_same_run(monkeypatch, tmp_path, pt_log):
    fake = FakeWandb(str(tmp_path), online_error=TimeoutError("Timed out while retrying: connection refused"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    tracker = trackers.build_tracker(
        _wandb_cfg(), config={}, output_dir=str(tmp_path), run_name="x", run_id="run42", is_main=True
    )
    assert [i["mode"] for i in fake.inits] == ["online", "offline"]
    assert all(i["id"] == "run42" and i["resume"] == "allow" for i in fake.inits)  # resumed: same W&B run
    assert fake.settings[0]["init_timeout"] == trackers.INIT_TIMEOUT_S <= 10  # W&B's own default is 90 s
    assert tracker.mode == "offline" and tracker.run is fake.runs[0] and tracker.run_id == "run42"
    assert f"wandb sync {tmp_path / 'offline-run-run42'}" in pt_log.text
    assert "did not answer" in pt_log.text and FAKE_KEY not in pt_log.text


@pytest.mark.parametrize(
    "env_mode, cfg_mode, key, expected",
    [
        (None, None, FAKE_KEY, "online"),
        (None, None, None, "offline"),
        ("offline", None, FAKE_KEY, "offline"),
        ("offline", "online", FAKE_KEY, "online"),
        ("disabled", None, None, "disabled"),
    ],
)
def test_wandb_mode_comes_from_config_then_wandb_mode_then_the_api_key(
    env_mode, cfg_mode, key, expected, monkeypatch, tmp_path
):
    fake = FakeWandb(str(tmp_path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for name, value in (("WANDB_MODE", env_mode), ("WANDB_API_KEY", key)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    trackers.build_tracker(
        _wandb_cfg(mode=cfg_mode), config={}, output_dir=str(tmp_path), run_name="x", run_id=None, is_main=True
    )
    assert [i["mode"] for i in fake.inits] == [expected]


def test_wandb_failing_log_summary_finish_warn_once_and_never_raise(monkeypatch, tmp_path, pt_log):
    fake = FakeWandb(str(tmp_path), failing=("log", "summary", "finish"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = trackers.build_tracker(
        _wandb_cfg(mode="offline"), config={}, output_dir=str(tmp_path), run_name="x", run_id=None, is_main=True
    )
    for step in range(1, 6):
        tracker.log({"loss": 1.0 / step, "eval_loss": 2.0 / step}, step=step)
    tracker.finish()
    assert len(_warnings(pt_log)) == 1, _warnings(pt_log)
    assert "connection reset" in _warnings(pt_log)[0]
    assert f"upload it with: wandb sync {tmp_path / 'offline-run-fake0'}" in pt_log.text
    assert tracker.final_eval == {"eval_loss": 2.0 / 5}  # still tracked for the summary


def test_wandb_summary_last_checkpoint_is_the_highest_step(monkeypatch, tmp_path):
    """step_10 after step_9 (as text "step_10" < "step_9"); unfinished step_11.tmp is not a checkpoint."""
    fake = FakeWandb(str(tmp_path / "wandb"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    for name in ("step_9", "step_10", "step_11.tmp"):
        (out / "checkpoints" / name).mkdir(parents=True)
    tracker = trackers.build_tracker(
        _wandb_cfg(mode="offline"), config={}, output_dir=str(out), run_name="x", run_id=None, is_main=True
    )
    tracker.finish()
    assert fake.runs[0].summary["last_checkpoint"] == str(out / "checkpoints" / "step_10")


def test_wandb_init_failure_never_stops_training(monkeypatch, tmp_path, pt_log):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("network down")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = trackers.build_tracker(
        _wandb_cfg(mode="offline"), config={}, output_dir=str(tmp_path), run_name="x", run_id=None, is_main=True
    )
    tracker.log({"loss": 1.0}, step=1)  # no exception
    tracker.finish()
    assert len(_warnings(pt_log)) == 1 and "network down" in pt_log.text


@pytest.mark.slow  # the real wandb starts its service process (wandb-core)
def test_real_wandb_unreachable_gives_up_fast_and_logs_offline(monkeypatch, tmp_path, pt_log):
    """A compute node without internet: API key set, the server a closed port. No 90 s of retries."""
    from tests.recipes import wandb_reader

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")  # the default, 10 s, is checked with the fake above
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    started = time.perf_counter()
    tracker = trackers.build_tracker(
        _wandb_cfg(project="p"),
        config={"a": 1},
        output_dir=str(tmp_path / "out"),
        run_name="x",
        run_id=None,
        is_main=True,
    )
    assert time.perf_counter() - started < 30
    assert tracker.mode == "offline" and tracker.run is not None
    tracker.log({"loss": 0.5, "eval_loss": 0.75}, step=3)
    tracker.finish()
    run_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    assert f"wandb sync {os.path.dirname(run_files[0])}" in pt_log.text
    assert [r["loss"] for r in _settled(wandb_reader.history, run_files[0])] == [0.5]
    assert wandb_reader.summary(run_files[0])["final/eval_loss"] == 0.75


def _tiny_run_config(tmp_path, *extra):
    from tests.helpers import FAST

    return cli.load_config(
        "finetune",
        [
            *FAST,
            "trainer.eval_max_batches=2",
            "export.enabled=false",
            "tracker=wandb",
            "tracker.mode=offline",
            f"output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def test_trainer_with_wandb_whose_log_fails_trains_to_the_end(monkeypatch, tmp_path):
    from persimmon_train.training.run import train

    fake = FakeWandb(str(tmp_path / "wandb"), failing=("log",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    result = train(
        _tiny_run_config(tmp_path, "trainer.max_steps=3", "trainer.eval_every_n_steps=3", "checkpoint.every_n_steps=0"),
        "finetune",
    )
    rows = [json.loads(line) for line in open(os.path.join(result.output_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    log_text = open(os.path.join(result.output_dir, "train.log")).read()
    assert log_text.count("W&B log failed") == 1
    run = fake.runs[0]
    assert run.finished == 0  # closed cleanly despite the failing log calls
    assert run.summary["final/eval_loss"] == pytest.approx([r["eval_loss"] for r in rows if "eval_loss" in r][-1])
    assert run.summary["output_dir"] == result.output_dir


@pytest.mark.slow  # the real wandb starts its service process (wandb-core)
def test_resume_continues_the_same_wandb_run(monkeypatch, tmp_path):
    """Real wandb, offline: the resumed run writes under the first run's id; its summary has the end."""
    import torch

    from persimmon_train.training.run import train
    from tests.recipes import wandb_reader

    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    common = ["trainer.eval_every_n_steps=2", "checkpoint.every_n_steps=2"]
    first = train(_tiny_run_config(tmp_path, "trainer.max_steps=2", *common), "finetune")
    state = torch.load(os.path.join(first.output_dir, "checkpoints", "step_2", "trainer_state.pt"), weights_only=True)
    first_files = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(first_files) == 1
    run_id = _settled(wandb_reader.run_id, first_files[0])
    assert state["tracker_run_id"] == run_id

    second = train(_tiny_run_config(tmp_path, "trainer.max_steps=4", "resume=latest", *common), "finetune")
    files = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 2
    resumed = next(f for f in files if f not in first_files)
    assert wandb_reader.run_id(resumed) == run_id and resumed.endswith(f"run-{run_id}.wandb")
    assert sorted({r["_step"] for r in _settled(wandb_reader.history, resumed)}) == [3, 4]
    rows = [json.loads(line) for line in open(os.path.join(second.output_dir, "metrics.jsonl"))]
    summary = wandb_reader.summary(resumed)
    assert summary["final/eval_loss"] == pytest.approx([r["eval_loss"] for r in rows if "eval_loss" in r][-1])
    assert summary["output_dir"] == second.output_dir
    assert summary["last_checkpoint"] == os.path.join(second.output_dir, "checkpoints", "step_4")
