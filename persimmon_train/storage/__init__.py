"""Every byte of weights on disk: one reader and one writer per kind of thing.

- `safetensors_io`: the safetensors header reader, dtype table, streaming reader, shard writer;
- `module_loading`: an HF folder into a module (meta-device friendly, NaN/Inf checked);
- `hf_folder`: the HF model folder writer and the PEFT adapter folder writer;
- `checkpoints`: training checkpoint layout, manifest, validation, what to resume;
- `checkpoint_weights`: full weights out of any strategy's checkpoint;
- `zero_checkpoint`: a DeepSpeed ZeRO folder per parameter (weights and AdamW moments), any layout;
- `files`: atomic writes, staged output folders, disk errors as one line.

The lowest layer above `errors`: it knows no model, strategy or peft (callers hand in duck-typed
config/tokenizer objects and a `comm` for collectives).
"""

from persimmon_train.storage.checkpoint_weights import iter_checkpoint_weights
from persimmon_train.storage.checkpoints import (
    choose_resume,
    find_checkpoint,
    list_step_dirs,
    load_trainer_state,
    read_manifest,
    save_checkpoint,
    validate_checkpoint,
)
from persimmon_train.storage.files import atomic_write_text, check_output_folder, check_writable_folder, disk_errors
from persimmon_train.storage.hf_folder import write_adapter_folder, write_hf_folder
from persimmon_train.storage.module_loading import load_safetensors_into
from persimmon_train.storage.safetensors_io import (
    DTYPES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ShardWriter,
    StoredTensor,
    header_reserve,
    inspect_folder,
    iter_safetensors_file,
    iter_weights_folder,
    materialize,
    parse_size,
    read_header,
    read_weight_map,
    save_safetensors,
)
from persimmon_train.storage.zero_checkpoint import ZeroCheckpoint

__all__ = [
    "DTYPES",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "ShardWriter",
    "StoredTensor",
    "ZeroCheckpoint",
    "atomic_write_text",
    "check_output_folder",
    "check_writable_folder",
    "choose_resume",
    "disk_errors",
    "find_checkpoint",
    "header_reserve",
    "inspect_folder",
    "iter_checkpoint_weights",
    "iter_safetensors_file",
    "iter_weights_folder",
    "list_step_dirs",
    "load_safetensors_into",
    "materialize",
    "load_trainer_state",
    "parse_size",
    "read_header",
    "read_manifest",
    "read_weight_map",
    "save_checkpoint",
    "save_safetensors",
    "validate_checkpoint",
    "write_adapter_folder",
    "write_hf_folder",
]
