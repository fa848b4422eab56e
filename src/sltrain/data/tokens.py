"""Token files: a split's packed token stream as raw uint16/uint32 on disk, read memory-mapped.

A token folder holds `train.bin`, `val.bin`, the tokenizer and a `meta.json` (dtype, token counts,
checksums, source, tokenizer, EOS). The stream cache and `sltrain data prepare --out` share it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sltrain.data.corpus import sha256_file
from sltrain.errors import UserError
from sltrain.files import read_json

FORMAT = "sltrain-tokens-v1"
SPLITS = ("train", "val")
META = "meta.json"


def fsync_replace(tmp: Path, path: Path) -> None:
    """Make `tmp` durable, then move it over `path` in one step."""
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    fsync_replace(tmp, path)


def dtype_for(n_ids: int) -> np.dtype:
    return np.dtype(np.uint16 if n_ids <= 2**16 else np.uint32)


class StreamWriter:
    """Appends token arrays to `<split>.bin` through a temporary file, hashing as it goes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{split}.bin"
        self.tmp = folder / f".{split}.bin.tmp{os.getpid()}"
        self.dtype = np.dtype(dtype)
        self.tokens, self.max_id = 0, -1
        self._hash = hashlib.sha256()
        self._file = self.tmp.open("wb")

    def append(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        self._file.write(data.tobytes())
        self._hash.update(data.tobytes())
        self.tokens += data.size
        self.max_id = max(self.max_id, int(data.max()))

    def close(self) -> dict[str, Any]:
        """Publish the file; return its record for meta.json."""
        self._file.close()
        fsync_replace(self.tmp, self.path)
        return {"tokens": self.tokens, "sha256": self._hash.hexdigest(), "max_id": self.max_id}

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def is_token_folder(path: Path) -> bool:
    """Whether `path` is a folder written by this module (its meta.json names the format)."""
    meta = path / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (ValueError, OSError, AttributeError):
        return False


def read_meta(folder: Path, fix: str) -> dict[str, Any]:
    path = folder / META
    if not path.is_file():
        raise UserError(f"{folder} has no {META}; {fix}")
    meta = read_json(path, fix)
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
        np.dtype(meta["dtype"])
        for split in SPLITS:
            int(meta["splits"][split]["tokens"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({e}); {fix}") from None
    return meta


def open_streams(folder: Path, fix: str, verify: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The meta and the memory-mapped streams of a token folder, refusing missing or damaged files.

    Sizes are always checked; `verify` also checks the sha256 of every file (a full read).
    """
    meta = read_meta(folder, fix)
    dtype = np.dtype(meta["dtype"])
    streams = {}
    for split in SPLITS:
        record, path = meta["splits"][split], folder / f"{split}.bin"
        if not path.is_file():
            raise UserError(f"{path} is missing; {fix}")
        expected = int(record["tokens"]) * dtype.itemsize
        if path.stat().st_size != expected:
            raise UserError(f"{path} is corrupt: {path.stat().st_size} bytes where {META} records "
                            f"{record['tokens']} {dtype.name} tokens ({expected} bytes); {fix}")
        if verify and sha256_file(path) != record.get("sha256"):
            raise UserError(f"{path} is corrupt: its sha256 does not match {META}; {fix}")
        if record["tokens"] == 0:
            raise UserError(f"{path} holds no tokens; {fix}")
        streams[split] = np.memmap(path, dtype=dtype, mode="r", shape=(int(record["tokens"]),))
    return meta, streams


def cut(stream: np.ndarray, budget: int | None, eos: int) -> np.ndarray:
    """The shortest prefix of whole documents holding at least `budget` tokens (all when fewer).

    A pure function of the stream, so a longer cached prefix of a source gives exactly the tokens
    a fresh read stopping at `budget` would.
    """
    if budget is None or len(stream) <= budget:
        return stream
    start, chunk = max(budget - 1, 0), 1 << 16
    while start < len(stream):
        hits = np.flatnonzero(stream[start : start + chunk] == eos)
        if hits.size:
            return stream[: start + int(hits[0]) + 1]
        start += chunk
    return stream


def max_id(stream: np.ndarray) -> int:
    chunk = 1 << 24
    return max(int(stream[i : i + chunk].max()) for i in range(0, len(stream), chunk))
