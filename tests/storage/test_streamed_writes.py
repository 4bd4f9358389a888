"""The streaming shard writer: tensors go to disk as they arrive, headers into reserved space, and
unchanged tensors (`StoredTensor`) are copied from their source file in row blocks, cast on the way.
The files are read back by safetensors itself (the independent reader transformers uses)."""

from __future__ import annotations

import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from persimmon_train.storage import ShardWriter, StoredTensor, header_reserve, iter_weights_folder, materialize
from persimmon_train.storage.safetensors_io import write_safetensors_file


def _source(tmp_path) -> tuple[dict, str]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "embed.weight": torch.randn(1000, 48, generator=g).to(torch.float16),  # 96 KB, many blocks
        "norm.weight": torch.randn(48, generator=g).to(torch.float16),
        "scale": torch.tensor(3.5, dtype=torch.float16),  # 0-d
        "empty": torch.zeros(0, 48, dtype=torch.float16),
    }
    folder = tmp_path / "src"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors, str(folder)


def test_stored_tensors_copy_in_blocks_and_equal_torch_casts(tmp_path, monkeypatch):
    tensors, folder = _source(tmp_path)
    lazy = dict(iter_weights_folder(folder, lazy=True))
    assert all(isinstance(t, StoredTensor) for t in lazy.values())
    embed = lazy["embed.weight"]
    assert embed.shape == (1000, 48) and embed.dtype == torch.float16 and embed.is_floating_point()
    # fp16 -> (float) -> bf16: only recorded, and the same numbers as torch's own casts.
    cast = embed.float().to(torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and cast.nbytes == 1000 * 48 * 2
    blocks = list(cast.blocks(max_bytes=10_000))  # 96-byte rows of fp16: 104 rows a block
    assert len(blocks) == 10 and max(b.shape[0] for b in blocks) == 104
    assert torch.equal(torch.cat(blocks), tensors["embed.weight"].float().to(torch.bfloat16))
    assert torch.equal(materialize(lazy["scale"]), tensors["scale"])

    out = tmp_path / "out"
    with ShardWriter(str(out), "1GB", header_reserve=header_reserve(lazy)) as writer:
        for name, tensor in lazy.items():
            writer.add(name, tensor.to(torch.bfloat16))
        files = writer.close()
    assert files == ["model.safetensors"]
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(tensors)
    for name, tensor in tensors.items():
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], tensor.to(torch.bfloat16)), name


def test_streamed_shards_have_padded_headers_that_safetensors_reads(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {f"layers.{i}.weight": torch.randn(64, 64, generator=g) for i in range(6)}  # 16 KB each
    with ShardWriter(str(tmp_path), 40_000, header_reserve=header_reserve(state)) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        files = writer.close()
    assert len(files) == 3  # two 16 KB tensors per 40 KB shard, greedy in arrival order
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for file in files:
        raw = (tmp_path / file).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        assert length % 8 == 0 and raw[8 : 8 + length].rstrip(b" ").endswith(b"}")
        with safe_open(str(tmp_path / file), "pt") as f:
            assert sorted(f.keys()) == sorted(n for n, shard in index["weight_map"].items() if shard == file)
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), state[name])


def test_a_full_header_starts_the_next_shard(tmp_path):
    state = {f"a_rather_long_tensor_name_number_{i:03d}": torch.full((2,), float(i)) for i in range(40)}
    with ShardWriter(str(tmp_path), "1GB", header_reserve=1024) as writer:  # ~10 entries a header
        for name, tensor in state.items():
            writer.add(name, tensor)
        files = writer.close()
    assert len(files) > 1
    loaded = {}
    for file in files:
        loaded.update(load_file(str(tmp_path / file)))
    assert set(loaded) == set(state) and all(torch.equal(loaded[n], state[n]) for n in state)


def test_a_dict_file_is_byte_identical_to_safetensors_own_header_layout(tmp_path):
    """write_safetensors_file reserves exactly its header: no padding beyond the format's 8-byte one."""
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16)}
    write_safetensors_file(str(tmp_path / "x.safetensors"), tensors)
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert len(raw[8 : 8 + length].rstrip(b" ")) > length - 8  # at most the alignment's padding
    assert list(header)[1:] == ["b", "a"]  # arrival order
    assert len(raw) == 8 + length + 6 * 4 + 3 * 2
    assert all(torch.equal(load_file(str(tmp_path / "x.safetensors"))[k], v) for k, v in tensors.items())
