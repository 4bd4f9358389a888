"""Read the history rows of an offline W&B run from its `run-<id>.wandb` file.

The file is a LevelDB-style log (32 KiB blocks of CRC/length/type-framed chunks) of protobuf
`Record`s; wandb ships no Python reader for it, so the tests parse it here.
"""

from __future__ import annotations

import json
import struct

BLOCK = 32768
HEADER = 7  # b":W&B" + 2-byte magic + 1-byte version
FULL, LAST = 1, 4


def records(path: str):
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = HEADER, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def history(path: str) -> list[dict]:
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def config(path: str) -> dict:
    """The run's config (sent with the run record, updated by config records)."""
    out = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def summary(path: str) -> dict:
    """The run summary as the file leaves it (summary records update keys; the last value wins)."""
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.remove:
                out.pop(item.key or "/".join(item.nested_key), None)
    return out


def run_id(path: str) -> str:
    """The W&B run id this file belongs to (from its run record)."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise AssertionError(f"{path} has no run record")
