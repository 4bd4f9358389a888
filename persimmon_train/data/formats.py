"""Task formats: one raw row -> token ids and labels, with precise errors for bad rows.

Runs inside ``datasets.map`` (batched, possibly in worker processes). A bad row raises
:class:`DataError` naming the source, row (1-based, = line of a JSONL file) and field, or with
``on_bad_row: skip`` becomes an empty example whose ``bad`` column carries that message.

Causal-LM labels are Hugging Face style (unshifted, the model shifts): the first token of every
document gets -100 so that, once documents are packed, the previous document's last token is never
trained to predict it; prompt tokens in chat get -100.
"""

from __future__ import annotations

import hashlib
import logging
import math

from persimmon_train.data.config import DataConfig
from persimmon_train.data.sources import Source, parse_jsonl_row
from persimmon_train.data.tokenizer import Tokenizer
from persimmon_train.errors import DataError
from persimmon_train.model.loss import IGNORE_INDEX as IGNORE

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
MAX_BAD_ROWS_LOGGED = 5


class BadRow(Exception):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class BadRows:
    """``data.on_bad_row``: refuse the first bad row, or skip and count them all (logging the first few)."""

    def __init__(self, cfg: DataConfig):
        self.cfg, self.count, self.logged = cfg, 0, 0

    def __call__(self, message: str) -> None:
        if self.cfg.on_bad_row == "error":
            raise DataError(message + " (set data.on_bad_row=skip to skip bad rows)")
        self.count += 1
        if self.logged < MAX_BAD_ROWS_LOGGED:
            log.warning("skipping bad row: %s", message)
            self.logged += 1


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def get_string(row: dict, field: str, what: str | None = None) -> str:
    if field not in row or row[field] is None:
        raise BadRow(field, "is missing")
    v = row[field]
    if not isinstance(v, str):
        raise BadRow(field, f"expected a string, got {_type_name(v)} {v!r:.60}")
    if not v.strip():
        raise BadRow(field, "is empty")
    return v


def get_list(row: dict, field: str) -> list:
    if field not in row or row[field] is None:
        raise BadRow(field, "is missing")
    v = row[field]
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # numpy arrays from parquet
        v = v.tolist()
    if not isinstance(v, list):
        raise BadRow(field, f"expected a list, got {_type_name(v)} {v!r:.60}")
    if not v:
        raise BadRow(field, "is an empty list")
    return v


def split_is_eval(name: str, row: int, fraction: float, seed: int) -> bool:
    """Stable hash split: a row's side depends only on (file name, row, seed), also when streaming."""
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{seed}:{name}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


def label_kind(v) -> str:
    """'name' | 'id' | 'float' | 'multi'; raises BadRow for anything else."""
    if isinstance(v, bool) or v is None:
        raise BadRow(None, f"expected a label name, id, list or float, got {_type_name(v)} {v!r:.60}")
    if isinstance(v, str):
        if not v.strip():
            raise BadRow(None, "is empty")
        return "name"
    if isinstance(v, int):
        return "id"
    if isinstance(v, float):
        if math.isnan(v):
            raise BadRow(None, "is missing (NaN)")
        return "float"
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return "multi"
    raise BadRow(None, f"expected a label name, id, list or float, got {_type_name(v)} {v!r:.60}")


class RowProcessor:
    """Picklable batched map function for one source (name, reading kind, split assignment)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, source: Source, *, all_eval: bool, fixed_labels=None):
        self.cfg = cfg
        self.tok = tokenizer
        self.name = source.name
        self.kind = source.kind
        self.all_eval = all_eval
        # rows of eval_files are all eval, so given eval_files no training row is held out
        self.eval_fraction = 0.0 if (all_eval or cfg.eval_files) else cfg.eval_fraction
        self.split_name = source.name.rsplit("/", 1)[-1]
        self.fixed = {n: i for i, n in enumerate(fixed_labels)} if fixed_labels else None
        add_bos = cfg.add_bos
        self.add_bos = (tokenizer.bos_id != tokenizer.eos_id) if add_bos is None else bool(add_bos)

    # -- output schema ---------------------------------------------------------------------------
    def empty(self) -> dict:
        f = self.cfg.format
        out = {"input_ids": [], "row": 0, "bad": "", "is_eval": False}
        if f in ("text", "chat"):
            out["labels"] = []
        elif f == "classification":
            out.update(label_names=[], label_float=0.0, label_kind="", truncated=False)
        else:
            out.update(tag_names=[], truncated=False)
        return out

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        columns = list(batch)
        rows = [{c: batch[c][i] for c in columns} for i in range(len(indices))]
        outs = [self.process(row, idx) for row, idx in zip(rows, indices)]
        keys = outs[0].keys() if outs else self.empty().keys()
        return {k: [o[k] for o in outs] for k in keys}

    def process(self, raw: dict, index: int) -> dict:
        out = self.empty()
        out["row"] = index + 1
        out["is_eval"] = self.all_eval or split_is_eval(
            self.split_name, index + 1, self.eval_fraction, self.cfg.split_seed
        )
        try:
            if self.kind == "jsonl":
                line = raw["text"]
                if not line.strip():
                    return out  # blank line: nothing, silently
                try:
                    row = parse_jsonl_row(line)
                except ValueError as e:
                    raise BadRow(None, f"is not a valid JSON object ({e})") from None
            elif self.kind == "txt":
                if self.cfg.format != "text":
                    raise DataError(
                        f"{self.name}: .txt files hold plain text; data.format="
                        f"{self.cfg.format!r} needs jsonl/json/parquet/csv rows"
                    )
                if not raw["text"].strip():
                    return out  # blank line/paragraph
                row = {self.cfg.text_field: raw["text"]}
            else:
                row = raw
            out.update(getattr(self, f"_{self.cfg.format}")(row))
        except BadRow as e:
            where = f"{self.name} row {index + 1}" + (f", field '{e.field}'" if e.field else "")
            msg = f"{where}: {e.message}"
            if self.cfg.on_bad_row == "error":
                raise DataError(msg + " (set data.on_bad_row=skip to skip bad rows)") from None
            out = self.empty()
            out.update(row=index + 1, bad=msg)
        return out

    # -- formats ---------------------------------------------------------------------------------
    def _bos(self) -> list[int]:
        return [self.tok.bos_id] if self.add_bos else []

    def _text(self, row: dict) -> dict:
        text = get_string(row, self.cfg.text_field)
        ids = self._bos() + self.tok.encode(text) + [self.tok.eos_id]
        return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}

    def _turns(self, row: dict) -> tuple[list[tuple[str, str]], str | None]:
        c = self.cfg
        if row.get(c.messages_field) is not None:
            msgs = get_list(row, c.messages_field)
            system, turns, pending = None, [], None
            for k, m in enumerate(msgs):
                field = f"{c.messages_field}[{k}]"
                if not isinstance(m, dict):
                    raise BadRow(field, f"expected an object with 'role' and 'content', got {_type_name(m)}")
                role = m.get("role")
                if role not in ROLES:
                    raise BadRow(f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
                try:
                    content = get_string(m, "content")
                except BadRow as e:
                    raise BadRow(f"{field}.content", e.message) from None
                if role == "system":
                    if k != 0:
                        raise BadRow(f"{field}.role", "a system message may only come first")
                    system = content
                elif role == "user":
                    if pending is not None:
                        raise BadRow(f"{field}.role", "two user messages in a row")
                    pending = content
                else:
                    if pending is None:
                        raise BadRow(f"{field}.role", "an assistant message must follow a user message")
                    turns.append((pending, content))
                    pending = None
            if pending is not None:
                raise BadRow(
                    f"{c.messages_field}[{len(msgs) - 1}]",
                    "the conversation ends with a user message (no response to learn)",
                )
            if not turns:
                raise BadRow(c.messages_field, "has no user/assistant pair")
            return turns, system
        if c.prompt_field not in row and c.messages_field not in row:
            raise BadRow(c.prompt_field, f"is missing (and no '{c.messages_field}' field)")
        prompt = get_string(row, c.prompt_field)
        response = get_string(row, c.response_field)
        system = row.get(c.system_field)
        if system is not None and not isinstance(system, str):
            raise BadRow(c.system_field, f"expected a string, got {_type_name(system)}")
        return [(prompt, response)], system or None

    def _chat(self, row: dict) -> dict:
        turns, system = self._turns(row)
        ids, mask = self.tok.encode_chat(turns, system=system, bos=self.add_bos)
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        labels[0] = IGNORE
        return {"input_ids": ids, "labels": labels}

    def _label_names(self, v) -> tuple[str, list[str], float]:
        c = self.cfg
        try:
            kind = label_kind(v)
        except BadRow as e:
            raise BadRow(c.label_field, e.message) from None
        if kind == "float" and float(v).is_integer() and c.problem_type == "single_label_classification":
            kind, v = "id", int(v)
        if kind == "float":
            return kind, [], float(v)
        items = v.tolist() if hasattr(v, "tolist") else v
        items = items if kind == "multi" else [items]
        names = []
        for k, item in enumerate(items):
            field = f"{c.label_field}[{k}]" if kind == "multi" else c.label_field
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise BadRow(field, f"expected a label name or id, got {_type_name(item)} {item!r:.60}")
            if isinstance(item, int) and item < 0:
                raise BadRow(field, f"label id {item} is negative")
            if isinstance(item, str) and not item.strip():
                raise BadRow(field, "is empty")
            if self.fixed is not None:
                if isinstance(item, str) and item not in self.fixed:
                    raise BadRow(field, f"label {item!r} is not in the label set {sorted(self.fixed)}")
                if isinstance(item, int) and item >= len(self.fixed):
                    raise BadRow(field, f"label id {item} is outside the label set (0..{len(self.fixed) - 1})")
            names.append(str(item) if isinstance(item, str) else f"#{item}")
        return kind, names, 0.0

    def _classification(self, row: dict) -> dict:
        c = self.cfg
        text = get_string(row, c.text_field)
        if c.label_field not in row or row[c.label_field] is None:
            raise BadRow(c.label_field, "is missing")
        kind, names, value = self._label_names(row[c.label_field])
        ids = self._bos() + self.tok.encode(text)
        truncated = len(ids) + 1 > c.seq_len
        ids = ids[: c.seq_len - 1] + [self.tok.eos_id]
        return {
            "input_ids": ids,
            "label_names": names,
            "label_float": value,
            "label_kind": kind,
            "truncated": truncated,
        }

    def _token_classification(self, row: dict) -> dict:
        c = self.cfg
        words = get_list(row, c.tokens_field)
        tags = get_list(row, c.tags_field)
        if len(words) != len(tags):
            raise BadRow(c.tags_field, f"has {len(tags)} tags for {len(words)} words in '{c.tokens_field}'")
        ids, tag_names = self._bos(), [""] * len(self._bos())
        for k, (w, t) in enumerate(zip(words, tags)):
            if not isinstance(w, str) or not w:
                raise BadRow(f"{c.tokens_field}[{k}]", f"expected a non-empty string, got {_type_name(w)} {w!r:.40}")
            _, names, _ = self._label_names_for_tag(t, f"{c.tags_field}[{k}]")
            pieces = self.tok.encode(w)
            ids += pieces
            # the word's tag goes on its first sub-token; the rest are ignored ("")
            tag_names += names + [""] * (len(pieces) - 1)
        truncated = len(ids) > c.seq_len
        return {"input_ids": ids[: c.seq_len], "tag_names": tag_names[: c.seq_len], "truncated": truncated}

    def _label_names_for_tag(self, t, field: str):
        saved = self.cfg.label_field
        try:
            if isinstance(t, (list, float)) or hasattr(t, "tolist"):
                raise BadRow(field, f"expected a tag name or id, got {_type_name(t)} {t!r:.40}")
            return self._label_names(t)
        except BadRow as e:
            raise BadRow(field if e.field in (saved, None) else e.field, e.message) from None
