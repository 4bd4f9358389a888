"""`persimmon-train` sub-commands: ls, cp + --config-path/--config-name, dispatch, usage errors."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys

import pytest

from persimmon_train import cli
from persimmon_train.recipes import JOBS
from persimmon_train.recipes import main as command_module
from persimmon_train.recipes.main import main
from tests.helpers import REPO

CONF = REPO / "persimmon_train" / "conf"


def test_ls_lists_every_recipe_and_each_recipes_configs(capsys):
    main(["ls"])
    out = capsys.readouterr().out
    for name in JOBS:
        assert f"\n  {name} " in out, name
    # Experiments are listed under the recipe whose data format they train.
    finetune = out.split("  finetune  (config finetune.yaml)")[1].split("  classify  (config")[0]
    classify = out.split("  classify  (config classify.yaml)")[1].split("  tag  (config")[0]
    assert "lora_chat_16k" in finetune and "full_chat_16k" in finetune and "experiment=  classify" in classify
    assert "lora_chat_16k" not in classify
    for option in (CONF / "model").glob("*.yaml"):
        assert option.stem in finetune, option


def test_cp_copies_a_shipped_config_and_config_path_runs_it(tmp_path, capsys):
    main(["cp", "finetune", str(tmp_path / "my_run.yaml")])
    copied = tmp_path / "my_run.yaml"
    assert copied.read_text() == (CONF / "finetune.yaml").read_text()
    assert "--config-path" in capsys.readouterr().out
    copied.write_text(copied.read_text().replace("max_steps: 60", "max_steps: 7"))
    cfg = cli.load_config("finetune", ["optim.lr=0.5"], config_path=str(tmp_path), config_name="my_run")
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 0.5  # the copy, plus command-line overrides
    assert cfg.model.name == "tiny"  # its groups still come from the shipped tree

    # A group option copied into a folder keeps its group folder and shadows the shipped option.
    main(["cp", "experiment/lora_chat_16k", str(tmp_path / "mine") + "/"])
    exp = tmp_path / "mine" / "experiment" / "lora_chat_16k.yaml"
    exp.write_text(exp.read_text().replace("max_steps: 1000", "max_steps: 1234"))
    cfg = cli.load_config("finetune", ["experiment=lora_chat_16k", "model.path=/w"], config_path=str(tmp_path / "mine"))
    assert cfg.trainer.max_steps == 1234 and cfg.data.seq_len == 16384
    shipped = cli.load_config("finetune", ["experiment=lora_chat_16k", "model.path=/w"])
    assert shipped.trainer.max_steps == 1000


def test_cp_never_overwrites_and_names_unknown_configs(tmp_path, capsys):
    dest = tmp_path / "x.yaml"
    dest.write_text("mine\n")
    for args, needle in (
        (["cp", "finetune", str(dest)], "exists"),
        (["cp", "nope", str(tmp_path / "y.yaml")], "nope"),
        (["cp", "finetune"], "usage"),
        (["cp", "../pyproject", str(tmp_path)], "no shipped config"),
    ):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err and err.count("\n") == 1, err
    assert dest.read_text() == "mine\n" and not (tmp_path / "y.yaml").exists()


def test_config_path_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.run_recipe("finetune", lambda cfg: None, ["--config-path", str(tmp_path / "none"), "--print-config"])
    assert info.value.code == 2 and "--config-path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.run_recipe("finetune", lambda cfg: None, ["--config-path", str(tmp_path), "--config-name", "nope"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "nope" in err and err.count("\n") == 1


def test_unknown_command_and_bare_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2 and "unknown command 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "commands:" in capsys.readouterr().out
    main(["--help"])
    assert "convert-adept" in capsys.readouterr().out


@pytest.mark.parametrize(
    "job", ["finetune", "classify", "tag", "evaluate", "prepare", "estimate", "export", "generate", "convert-adept"]
)
def test_every_command_dispatches_to_its_recipe(job, monkeypatch):
    seen = []
    if JOBS[job].runs in ("train", "evaluate"):  # a Hydra job: its function under cli.run_recipe
        from persimmon_train.recipes import main as command

        def run_recipe(name, entry, argv, multirun=None):
            assert entry.func.__name__ == JOBS[job].runs and entry.keywords == {"job": name}
            seen.append(argv)

        monkeypatch.setattr(command, "run_recipe", run_recipe)
    else:
        module = __import__(f"persimmon_train.recipes.{JOBS[job].runs}", fromlist=["run"])
        monkeypatch.setattr(module, "run", lambda argv: seen.append(argv))
    main([job, "a=1", "b=2"])
    assert seen == [["a=1", "b=2"]]


@pytest.mark.parametrize("argv", [["finetune", "a=1"], []], ids=["a job", "usage error"])
def test_the_command_freezes_the_collector_when_its_process_ends(monkeypatch, argv):
    """main registers gc.freeze to run at exit (once, however often it runs), so the interpreter's
    shutdown does not walk what is alive (bench/process_exit.py: 1.48 s -> 0.20 s of exit)."""

    class ExitHooks:  # the atexit module's register / unregister, recorded
        def __init__(self):
            self.hooks = []

        def register(self, fn):
            self.hooks.append(fn)

        def unregister(self, fn):
            self.hooks = [h for h in self.hooks if h != fn]

    hooks = ExitHooks()
    monkeypatch.setattr(command_module, "atexit", hooks)
    monkeypatch.setattr(command_module, "run_recipe", lambda *a, **k: None)
    for _ in range(2):
        with pytest.raises(SystemExit) if not argv else contextlib.nullcontext():
            main(argv)
    assert hooks.hooks == [gc.freeze]


@pytest.mark.slow
def test_top_level_recipe_files_are_the_packaged_recipes():
    """`python recipes/x.py` runs the package's recipe (same module), pinned to this checkout."""
    code = (
        "import runpy, sys; sys.argv=['recipes/finetune.py']; "
        "g = runpy.run_path('recipes/finetune.py', run_name='shim'); "
        "import persimmon_train.recipes.main as m, persimmon_train; "
        "assert g['main'] is m.main; print(persimmon_train.__file__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(REPO / "persimmon_train" / "__init__.py")
    out = subprocess.run(
        [sys.executable, "recipes/finetune.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "python recipes/finetune.py" in out.stdout
