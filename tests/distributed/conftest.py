"""2-rank CPU runs of the real recipes through launch/torchrun.sh (FSDP2, gloo) and
launch/deepspeed.sh (ZeRO, DeepSpeed's CPU accelerator), shared by the tests of this folder.

Every run is made at most once per session (`runs.get(name)`), so the equality, checkpoint and
resume tests reuse the same jobs. The first DeepSpeed run on a fresh machine builds DeepSpeed's
shared-memory op with ninja (minutes): its timeout is generous. The launch helpers themselves are
in tests/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import JOBS, launch, recipe_env


class Runs:
    def __init__(self, root: Path):
        self.root = root
        self.env = recipe_env(root)
        self.done: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            out = self.root / name
            launch(out, JOBS[name], self.env)
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"))
