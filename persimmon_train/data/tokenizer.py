"""Sentencepiece tokenizer with Persimmon's special-token conventions.

The released Persimmon tokenizer is a unigram sentencepiece model with byte fallback. Its
``config.json`` uses the piece ``|ENDOFTEXT|`` as both bos and eos (it also ends documents), while
the sentencepiece model itself still carries the generic ``<s>``/``</s>`` ids. So special ids are
read from the files, in this order of precedence:

1. ``config.json`` next to the model (``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``);
2. ``special_tokens_map.json`` / ``tokenizer_config.json`` (token strings, looked up as pieces);
3. the piece ``|ENDOFTEXT|`` if the vocabulary has it (bos and eos), mirroring the released files;
4. the sentencepiece model's own bos/eos/pad ids.

``pad_id`` is the sentencepiece pad piece if the model has one, else the eos id (padding always
carries label -100 and its own position ids, so the id only has to be a valid embedding row).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import sentencepiece as spm

from persimmon_train.errors import DataError

ENDOFTEXT = "|ENDOFTEXT|"
TOKENIZER_FILENAME = "tokenizer.model"


def _resolve_model_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILENAME
    if not p.is_file():
        raise DataError(
            f"tokenizer file not found: {p} (expected a sentencepiece .model file or a "
            f"model folder containing {TOKENIZER_FILENAME})"
        )
    return p


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_string(value) -> str | None:
    # special_tokens_map.json stores either "piece" or {"content": "piece", ...}
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Encode/decode text with a sentencepiece model; knows bos/eos/pad and the chat format."""

    def __init__(self, path: str | os.PathLike):
        self.path = _resolve_model_file(path)
        self._model_bytes = self.path.read_bytes()
        self._sp = self._load(self._model_bytes, self.path)
        self.bos_id, self.eos_id, self.pad_id = self._special_ids(self.path.parent)

    # -- loading -------------------------------------------------------------------------------
    @staticmethod
    def _load(model_bytes: bytes, path: Path) -> spm.SentencePieceProcessor:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a corrupt proto
            raise DataError(f"tokenizer file {path} is not a valid sentencepiece model ({e})") from None
        if sp.get_piece_size() == 0:
            raise DataError(f"tokenizer file {path} is not a valid sentencepiece model (empty vocabulary)")
        return sp

    def _piece_id(self, piece: str | None) -> int | None:
        if piece is None:
            return None
        i = self._sp.piece_to_id(piece)
        # piece_to_id returns the unk id for unknown pieces
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(self._sp.unk_id()):
            return None
        return i

    def _special_ids(self, folder: Path) -> tuple[int, int, int]:
        bos = eos = pad = None
        config = folder / "config.json"
        if config.is_file():
            c = _read_json(config)
            bos, eos, pad = (c.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
            bos, eos, pad = (v if isinstance(v, int) and 0 <= v < self.vocab_size else None for v in (bos, eos, pad))
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = folder / name
            if f.is_file():
                c = _read_json(f)
                bos = bos if bos is not None else self._piece_id(_token_string(c.get("bos_token")))
                eos = eos if eos is not None else self._piece_id(_token_string(c.get("eos_token")))
                pad = pad if pad is not None else self._piece_id(_token_string(c.get("pad_token")))
        end_of_text = self._piece_id(ENDOFTEXT)
        if end_of_text is not None:
            bos = end_of_text if bos is None else bos
            eos = end_of_text if eos is None else eos
        bos = bos if bos is not None else (self._sp.bos_id() if self._sp.bos_id() >= 0 else None)
        eos = eos if eos is not None else (self._sp.eos_id() if self._sp.eos_id() >= 0 else None)
        if eos is None:
            raise DataError(
                f"tokenizer {self.path} has no end-of-document token: no eos id in its files and no '{ENDOFTEXT}' piece"
            )
        bos = eos if bos is None else bos
        if pad is None:
            pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else eos
        return bos, eos, pad

    # -- pickling (datasets.map(num_proc>1) ships the tokenizer to worker processes) -----------
    def __getstate__(self):
        return {
            "path": str(self.path),
            "model_bytes": self._model_bytes,
            "ids": (self.bos_id, self.eos_id, self.pad_id),
        }

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self._model_bytes = state["model_bytes"]
        self._sp = self._load(self._model_bytes, self.path)
        self.bos_id, self.eos_id, self.pad_id = state["ids"]

    # -- properties ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """Hash of the model file bytes and the special ids (part of every data cache key)."""
        h = hashlib.sha256(self._model_bytes)
        h.update(repr((self.bos_id, self.eos_id, self.pad_id)).encode())
        return h.hexdigest()

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    # -- chat ----------------------------------------------------------------------------------
    @staticmethod
    def chat_prompt(prompt: str) -> str:
        return f"human: {prompt}\n\nadept:"

    def encode_chat(
        self, turns: list[tuple[str, str]], system: str | None = None, bos: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Encode (user, assistant) turns; return token ids and a per-token "is response" mask.

        Each turn is ``encode("human: {user}\\n\\nadept:")`` (no loss) followed by
        ``encode(assistant) + [eos]`` (loss). Prompt and response are encoded separately so the
        training tokens of a response are exactly what generation after the prompt produces.
        A system message is prepended to the first prompt as ``{system}\\n\\n``.
        """
        ids: list[int] = [self.bos_id] if bos else []
        mask: list[bool] = [False] * len(ids)
        for k, (user, assistant) in enumerate(turns):
            prompt = self.chat_prompt(user)
            if k == 0 and system:
                prompt = f"{system}\n\n{prompt}"
            p = self._sp.encode(prompt)
            r = self._sp.encode(assistant) + [self.eos_id]
            ids += p + r
            mask += [False] * len(p) + [True] * len(r)
        return ids, mask

    # -- saving --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.model plus tokenizer_config.json / special_tokens_map.json."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / TOKENIZER_FILENAME).write_bytes(self._model_bytes)
        unk = self._sp.id_to_piece(self._sp.unk_id()) if self._sp.unk_id() >= 0 else None
        special = {
            "bos_token": self.id_to_piece(self.bos_id),
            "eos_token": self.id_to_piece(self.eos_id),
            "pad_token": self.id_to_piece(self.pad_id),
        }
        if unk is not None:
            special["unk_token"] = unk
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "legacy": True,
            "model_max_length": 16384,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return d / TOKENIZER_FILENAME

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
