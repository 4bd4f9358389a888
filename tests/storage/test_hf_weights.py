"""HF safetensors weights I/O: round trips, transformers' layout, meta loading, and every bad folder."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from persimmon_train.errors import ConfigError, WeightsError
from persimmon_train.storage import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    iter_weights_folder,
    load_safetensors_into,
    parse_size,
    read_weight_map,
    safetensors_io,
    save_safetensors,
)
from tests.helpers import REPO

HIDDEN, VOCAB, LAYERS = 16, 64, 3


class TinyRotary(nn.Module):
    def __init__(self):
        super().__init__()
        # Non-persistent like the real rope buffer: never in the files, the caller re-initialises it.
        self.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32), persistent=False)


class TinyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(HIDDEN)
        self.self_attn = nn.Module()
        self.self_attn.query_key_value = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.self_attn.dense = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.mlp.dense_4h_to_h = nn.Linear(4 * HIDDEN, HIDDEN)


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(TinyLayer() for _ in range(LAYERS))
        self.final_layernorm = nn.LayerNorm(HIDDEN)
        self.rotary_emb = TinyRotary()
        self.register_buffer("position_table", torch.arange(8))  # persistent integer buffer


class TinyCausalLM(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.model = TinyDecoder()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight


def make_model(seed=0, tie=False):
    torch.manual_seed(seed)
    return TinyCausalLM(tie=tie)


def make_meta_model(tie=False):
    with torch.device("meta"):
        return TinyCausalLM(tie=tie)


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def total_bytes(state_dict):
    return sum(t.numel() * t.element_size() for t in state_dict.values())


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    save_safetensors(model.state_dict(), tmp_path / "w")
    return model, tmp_path / "w"


@pytest.fixture
def sharded(tmp_path):
    model = make_model()
    files = save_safetensors(model.state_dict(), tmp_path / "w", max_shard_size=3000)
    return model, tmp_path / "w", files


# ----------------------------------------------------------------------------------- parse_size


def test_parse_size_units():
    assert parse_size(1234) == 1234
    assert parse_size("1234") == 1234
    assert parse_size("10KB") == 10_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size(" 1.5 gb ") == 1_500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    for bad in ("5XB", "GB", "", "-1KB", 0, -5, 1.5, True):
        with pytest.raises(ConfigError):
            parse_size(bad)


# -------------------------------------------------------------------------------------- round trips


def test_single_file_round_trip(saved):
    model, folder = saved
    assert sorted(os.listdir(folder)) == [SAFE_WEIGHTS_NAME]
    assert load_file(folder / SAFE_WEIGHTS_NAME).keys() == model.state_dict().keys()
    fresh = make_model(seed=1)
    load_safetensors_into(fresh, folder)
    assert_same_weights(fresh, model)


def test_sharded_round_trip_matches_transformers_layout(sharded):
    model, folder, files = sharded
    state_dict = model.state_dict()
    assert len(files) >= 3
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert sorted(os.listdir(folder)) == sorted(files + [SAFE_WEIGHTS_INDEX_NAME])

    index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert index == {
        "metadata": {"total_size": total_bytes(state_dict)},
        "weight_map": index["weight_map"],
    }
    # Same greedy split as huggingface_hub (what transformers' save_pretrained calls).
    split = pytest.importorskip("huggingface_hub").split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=3000
    )
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"]["total_size"] == split.metadata["total_size"]

    # Every shard read independently holds exactly its tensors, equal to the model's.
    for file in files:
        shard = load_file(folder / file)
        assert set(shard) == {name for name, f in index["weight_map"].items() if f == file}
        for name, tensor in shard.items():
            assert torch.equal(tensor, state_dict[name]), name

    # transformers' own sharded loader accepts the folder.
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    other = make_model(seed=2)
    trainer_utils.load_sharded_checkpoint(other, str(folder), strict=True)
    assert_same_weights(other, model)

    fresh = make_model(seed=1)
    load_safetensors_into(fresh, folder)
    assert_same_weights(fresh, model)


def test_transformers_persimmon_folder_round_trip(tmp_path):
    """Weights transformers writes load here, and weights written here load in transformers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.PersimmonConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    reference = transformers.PersimmonForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / SAFE_WEIGHTS_INDEX_NAME).exists()

    with torch.device("meta"):
        ours = transformers.PersimmonForCausalLM(config)
    load_safetensors_into(ours, tmp_path / "hf")
    assert_same_weights(ours, reference)

    config.save_pretrained(tmp_path / "ours")
    save_safetensors(reference.state_dict(), tmp_path / "ours", max_shard_size="20KB")
    reloaded = transformers.PersimmonForCausalLM.from_pretrained(tmp_path / "ours")
    assert_same_weights(reloaded, reference)


def test_read_weight_map_and_iter(sharded):
    model, folder, files = sharded
    weight_map = read_weight_map(folder)
    assert weight_map.keys() == model.state_dict().keys()
    assert {os.path.basename(path) for path in weight_map.values()} == set(files)
    assert all(os.path.isfile(path) for path in weight_map.values())
    streamed = dict(iter_weights_folder(folder))
    assert streamed.keys() == model.state_dict().keys()
    for name, tensor in streamed.items():
        assert torch.equal(tensor, model.state_dict()[name])


# ------------------------------------------------------------------------------------- meta loading


def test_meta_load_materialises_every_tensor(sharded):
    model, folder, _ = sharded
    meta = make_meta_model()
    meta.model.embed_tokens.weight.requires_grad_(False)
    load_safetensors_into(meta, folder)

    assert not any(p.is_meta for p in meta.parameters())
    assert all(type(p) is nn.Parameter for p in meta.parameters())
    assert not meta.model.embed_tokens.weight.requires_grad
    assert meta.lm_head.weight.requires_grad
    assert meta.model.position_table.dtype == torch.int64
    # The non-persistent rope buffer is left for the caller to initialise.
    assert meta.model.rotary_emb.inv_freq.is_meta
    assert_same_weights(meta, model)


def test_loaded_tensors_are_private_to_the_model(saved):
    model, folder = saved
    meta = make_meta_model()
    load_safetensors_into(meta, folder)
    with torch.no_grad():
        meta.lm_head.weight.add_(1.0)  # copy-on-write: the file must not change
    assert torch.equal(load_file(folder / SAFE_WEIGHTS_NAME)["lm_head.weight"], model.lm_head.weight)


def test_dtype_cast(tmp_path, saved):
    model, folder = saved
    meta = make_meta_model()
    load_safetensors_into(meta, folder, dtype=torch.bfloat16)
    assert meta.lm_head.weight.dtype == torch.bfloat16
    assert meta.model.position_table.dtype == torch.int64  # integers are never cast
    assert torch.equal(meta.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))

    # dtype=None: a real module keeps its own dtype, a meta one takes the file's.
    save_safetensors(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()},
        tmp_path / "bf16",
    )
    real = make_model(seed=3)
    load_safetensors_into(real, tmp_path / "bf16")
    assert real.lm_head.weight.dtype == torch.float32
    assert torch.equal(real.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())
    meta = make_meta_model()
    load_safetensors_into(meta, tmp_path / "bf16")
    assert meta.lm_head.weight.dtype == torch.bfloat16

    # A real module with an explicit dtype is converted, Parameter type kept.
    real = make_model(seed=3)
    load_safetensors_into(real, folder, dtype=torch.float16)
    assert real.model.layers[0].self_attn.dense.weight.dtype == torch.float16
    assert type(real.model.layers[0].self_attn.dense.weight) is nn.Parameter


def test_real_module_is_updated_in_place(saved):
    model, folder = saved
    fresh = make_model(seed=1)
    weight = fresh.lm_head.weight
    load_safetensors_into(fresh, folder)
    assert fresh.lm_head.weight is weight
    assert torch.equal(weight, model.lm_head.weight)


def test_tied_weights_stay_tied(tmp_path):
    model = make_model(tie=True)
    save_safetensors(model.state_dict(), tmp_path / "both")  # aliased tensors: cloned, both written
    assert set(load_file(tmp_path / "both" / SAFE_WEIGHTS_NAME)) >= {"lm_head.weight", "model.embed_tokens.weight"}
    meta = make_meta_model(tie=True)
    load_safetensors_into(meta, tmp_path / "both")
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert torch.equal(meta.lm_head.weight, model.lm_head.weight)

    # transformers drops the tied copy when saving; one name is enough.
    state_dict = dict(model.state_dict())
    del state_dict["lm_head.weight"]
    save_safetensors(state_dict, tmp_path / "one")
    meta = make_meta_model(tie=True)
    load_safetensors_into(meta, tmp_path / "one")
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert not meta.lm_head.weight.is_meta


def test_non_strict_and_ignore_keys(tmp_path, saved):
    model, _ = saved
    state_dict = dict(model.state_dict())
    del state_dict["lm_head.weight"]
    state_dict["score.weight"] = torch.zeros(2, HIDDEN)
    save_safetensors(state_dict, tmp_path / "partial")

    fresh = make_model(seed=1)
    head = fresh.lm_head.weight.clone()
    load_safetensors_into(fresh, tmp_path / "partial", strict=False)
    assert torch.equal(fresh.lm_head.weight, head)
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)

    fresh = make_model(seed=1)
    load_safetensors_into(fresh, tmp_path / "partial", ignore_keys=["lm_head.*", "score.weight"])
    assert torch.equal(fresh.lm_head.weight, head)

    with pytest.raises(WeightsError, match=r"still on the meta device.*lm_head\.weight"):
        load_safetensors_into(make_meta_model(), tmp_path / "partial", strict=False)


# ---------------------------------------------------------------------------------------- bad folders


def message(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_keys(tmp_path, saved):
    model, _ = saved
    state_dict = {k: v for k, v in model.state_dict().items() if "layers." not in k}
    save_safetensors(state_dict, tmp_path / "w")
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(make_meta_model(), tmp_path / "w")
    text = message(excinfo)
    missing = LAYERS * 10
    assert f"{missing} tensors the model needs are missing" in text
    assert "model.layers.0.input_layernorm.weight" in text
    assert f"(+{missing - 10} more)" in text
    assert str(tmp_path / "w") in text


def test_unexpected_keys(tmp_path, saved):
    model, _ = saved
    state_dict = dict(model.state_dict())
    state_dict["model.layers.9.self_attn.query_key_value.weight"] = torch.zeros(3)
    save_safetensors(state_dict, tmp_path / "w")
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(make_meta_model(), tmp_path / "w")
    text = message(excinfo)
    assert "1 tensors the model does not have" in text
    assert f"model.layers.9.self_attn.query_key_value.weight ({SAFE_WEIGHTS_NAME})" in text


def test_shape_mismatch_names_tensor_file_and_both_shapes(tmp_path, saved):
    model, _ = saved
    state_dict = dict(model.state_dict())
    state_dict["model.layers.1.self_attn.query_key_value.weight"] = torch.zeros(7, HIDDEN)
    save_safetensors(state_dict, tmp_path / "w", max_shard_size=3000)
    meta = make_meta_model()
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(meta, tmp_path / "w", strict=False)
    text = message(excinfo)
    shard = os.path.basename(read_weight_map(tmp_path / "w")["model.layers.1.self_attn.query_key_value.weight"])
    assert "tensor model.layers.1.self_attn.query_key_value.weight" in text
    assert shard in text
    assert f"[7, {HIDDEN}]" in text and f"[{3 * HIDDEN}, {HIDDEN}]" in text
    assert all(p.is_meta for p in meta.parameters())  # validated before anything was loaded


def test_truncated_file(saved):
    _, folder = saved
    path = folder / SAFE_WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(make_meta_model(), folder)
    text = message(excinfo)
    assert "truncated" in text and str(path) in text
    assert f"{len(data) - 10} bytes in all" in text


def test_truncated_shard_fails_before_any_tensor_is_loaded(sharded):
    _, folder, files = sharded
    last = folder / files[-1]
    last.write_bytes(last.read_bytes()[:-1])
    meta = make_meta_model()
    with pytest.raises(WeightsError, match=f"{files[-1]} is truncated"):
        load_safetensors_into(meta, folder)
    assert all(p.is_meta for p in meta.parameters())


BAD_SPAN = b'{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}  '


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "shorter than the 8-byte header length"),
        (b"this is not a safetensors file at all", "header length field says"),
        (struct.pack("<Q", 5) + b"{oops", "header is not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
        (struct.pack("<Q", 15) + b'{"x": {"a": 1}}', "tensor x has a bad header entry"),
        (struct.pack("<Q", len(BAD_SPAN)) + BAD_SPAN + bytes(8), "tensor x spans 8 bytes but shape [3] F32 needs 12"),
    ],
    ids=["empty", "text", "bad-json", "not-object", "bad-entry", "bad-span"],
)
def test_garbage_file(tmp_path, content, reason):
    path = tmp_path / SAFE_WEIGHTS_NAME
    path.write_bytes(content)
    with pytest.raises(WeightsError) as excinfo:
        read_weight_map(tmp_path)
    text = message(excinfo)
    assert f"weights file {path} is corrupt" in text and reason in text


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(WeightsError, match=f"weights folder {tmp_path / 'nope'} does not exist"):
        load_safetensors_into(make_meta_model(), tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="is a file, not a model folder"):
        load_safetensors_into(make_meta_model(), tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(make_meta_model(), tmp_path / "empty")
    text = message(excinfo)
    assert f"no weights in {tmp_path / 'empty'}" in text and SAFE_WEIGHTS_INDEX_NAME in text
    assert "pickle" not in text


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"would run code if unpickled")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(make_meta_model(), tmp_path)
    text = message(excinfo)
    assert "pytorch_model.bin" in text
    assert "pickle weights are not loaded, convert to safetensors" in text


def test_index_references_missing_shard(sharded):
    _, folder, files = sharded
    os.remove(folder / files[1])
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(make_meta_model(), folder)
    text = message(excinfo)
    assert files[1] in text and SAFE_WEIGHTS_INDEX_NAME in text and "missing" in text


def test_index_names_tensor_absent_from_its_shard(sharded):
    _, folder, files = sharded
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = files[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=f"tensor lm_head.weight to .*{files[0]}, which has no such tensor"):
        load_safetensors_into(make_meta_model(), folder)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": {"a": 3}}'],
    ids=["bad-json", "list", "no-weight-map", "bad-file-name"],
)
def test_malformed_index(sharded, content):
    _, folder, _ = sharded
    (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(content)
    with pytest.raises(WeightsError) as excinfo:
        load_safetensors_into(make_meta_model(), folder)
    text = message(excinfo)
    assert str(folder / SAFE_WEIGHTS_INDEX_NAME) in text
    assert "unreadable" in text or "malformed" in text


# -------------------------------------------------------------------------------------- atomic saves


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    model = make_model()
    paths = []
    real_write = safetensors_io._SafetensorsFile.write

    def failing_write(part, name, tensor):
        if part.path not in paths:
            paths.append(part.path)
        if len(paths) == 2:
            raise KeyboardInterrupt  # interrupted while writing the second shard
        real_write(part, name, tensor)

    monkeypatch.setattr(safetensors_io._SafetensorsFile, "write", failing_write)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(model.state_dict(), tmp_path, max_shard_size=3000)
    assert len(paths) == 2 and all(path.endswith(".tmp") for path in paths)  # temporary names while written
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no part left behind, the user's file kept


def test_resave_removes_stale_shards(tmp_path):
    model = make_model()
    state_dict = model.state_dict()
    first = save_safetensors(state_dict, tmp_path, max_shard_size=2000)
    (tmp_path / "config.json").write_text("{}")  # not ours: must survive
    (tmp_path / "model-00009-of-00009.safetensors.tmp").write_bytes(b"left by a crash")
    second = save_safetensors(state_dict, tmp_path, max_shard_size=6000)
    assert 3 <= len(second) < len(first)
    assert sorted(os.listdir(tmp_path)) == sorted(second + [SAFE_WEIGHTS_INDEX_NAME, "config.json"])
    fresh = make_model(seed=1)
    load_safetensors_into(fresh, tmp_path)
    assert_same_weights(fresh, model)

    assert save_safetensors(state_dict, tmp_path) == [SAFE_WEIGHTS_NAME]
    assert sorted(os.listdir(tmp_path)) == ["config.json", SAFE_WEIGHTS_NAME]

    save_safetensors(state_dict, tmp_path, max_shard_size=3000)
    assert SAFE_WEIGHTS_NAME not in os.listdir(tmp_path)  # would shadow the new index


def test_resave_over_the_folder_the_model_was_loaded_from(sharded):
    """Loaded CPU tensors map the old files; replacing those files must not disturb them."""
    model, folder, _ = sharded
    meta = make_meta_model()
    load_safetensors_into(meta, folder)
    save_safetensors(meta.state_dict(), folder, max_shard_size=5000)
    assert_same_weights(meta, model)
    again = make_meta_model()
    load_safetensors_into(again, folder)
    assert_same_weights(again, model)


def test_save_takes_views_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "row": base[1], "same": base, "grad": nn.Parameter(torch.ones(2))}
    save_safetensors(tensors, tmp_path)
    loaded = load_file(tmp_path / SAFE_WEIGHTS_NAME)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.detach()), name
    with pytest.raises(WeightsError, match="cannot save x: it is on the meta device"):
        save_safetensors({"x": torch.empty(2, device="meta")}, tmp_path / "meta")


# ------------------------------------------------------------------------------------------ memory


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    sys.path.insert(0, sys.argv[3])
    from bench.host_memory import status_kib
    from persimmon_train.storage import load_safetensors_into, save_safetensors

    def status(key):
        return status_kib(key) * 1024
    def make():
        return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(24)])  # 24 x 16 MiB
    folder, step = sys.argv[1], sys.argv[2]
    if step == "save":
        save_safetensors(make().state_dict(), folder, max_shard_size="100MB")
        sys.exit()
    weights = 24 * 2048 * 2048 * 4
    with torch.device("meta"):
        model = make()
    anon, rss = status("RssAnon"), status("VmRSS")
    load_safetensors_into(model, folder)
    touched = sum(float(p.detach().sum()) for p in model.parameters())  # fault in every page
    print((status("RssAnon") - anon) / weights, (status("VmHWM") - rss) / weights)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_meta_load_holds_about_one_copy(tmp_path):
    """Peak RSS growth while loading 384 MiB into a meta model stays near one copy of the weights."""
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    run = [sys.executable, str(script), str(tmp_path / "w")]
    subprocess.run([*run, "save", str(REPO)], check=True)
    result = subprocess.run([*run, "load", str(REPO)], capture_output=True, text=True, check=True)
    anon_growth, peak_growth = map(float, result.stdout.split())
    # The save runs in its own process so that VmHWM (peak RSS) measures the load alone.
    assert peak_growth < 1.3, result.stdout
    assert anon_growth < 0.3, result.stdout  # tensors are file-backed, copy-on-write
