import os
import sys
import time

# Tests never reach a hub: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed's CPU accelerator JIT-builds its shared-memory op into TORCH_EXTENSIONS_DIR, guarded
# by a bare `lock` file that a killed build leaves behind, after which every later DeepSpeed launch
# waits on it forever. The default folder (~/.cache/torch_extensions) is shared by every venv and
# checkout of a machine, so one killed run elsewhere hung this suite. Unless told otherwise, the
# tests build into their own venv's folder: a fresh venv (CI) builds once and inherits no lock.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    # In that folder a lock older than any build (3 minutes on 2 cores, 20+ under load) is a
    # leftover of a killed test run of this venv: drop it rather than wait on it.
    _lock = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm", "lock")
    if os.path.exists(_lock) and time.time() - os.path.getmtime(_lock) > 45 * 60:
        os.remove(_lock)
