"""The data pipeline: corpus -> train/validation split -> tokenizer -> packed token streams on disk.

Token streams are cached under $SLTRAIN_CACHE/tokens, keyed by the source, the split rule and the
tokenizer, as memory-mapped token files (`tokens.py`): a second run on the same data starts at
once and a large corpus never has to fit in memory. A streamed `hf:` source is read only up to a
token budget; a cached longer prefix of it serves every smaller budget.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from sltrain.config import DataConfig, RunConfig
from sltrain.data import corpus, streaming, tokens
from sltrain.data import tokenizer as bpe
from sltrain.data.packing import held_out_slice, pack
from sltrain.data.tokenizer import load_tokenizer, save_tokenizer
from sltrain.errors import UserError
from sltrain.files import writable_dir

# A default validation set larger than this buys no precision (GaLore evaluates on 10M tokens).
VAL_TOKENS_CAP = 10_000_000
# The BPE learns its merges from at most this much training text (whole documents, in order).
BPE_SAMPLE_CHARS = 100_000_000
# Documents are tokenised in batches of about this many characters.
BATCH_CHARS = 1 << 20

Pair = tuple[str | None, str | None]  # a document's (training text, held-out text)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: np.ndarray  # memory-mapped, read-only
    val: np.ndarray
    eos_id: int
    eos_token: str = bpe.EOS
    folder: Path | None = None  # the token folder the streams are read from
    meta: dict[str, Any] = field(default_factory=dict)
    built: bool = False  # tokenised by this call, not found in the cache


def prepare_options(cfg: RunConfig) -> dict[str, Any]:
    """What a run reads: each training token once, and the blocks evaluation uses."""
    t = cfg.train
    return {"min_train_tokens": t.steps * cfg.tokens_per_step + 1,
            "min_val_tokens": t.eval_batches * t.batch_size * cfg.data.seq_len + 1,
            "progress": t.progress}


class _Reader:
    """The documents of a local or `hf:` source as (training text, held-out text) pairs."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.hf = streaming.parse(cfg.source) if streaming.is_hf(cfg.source) else None
        if self.hf is None:
            self.fingerprint = corpus.fingerprint(cfg.source, cfg.text_field)
            self.rule = f"{cfg.val_fraction}"
        else:
            self.fingerprint = streaming.fingerprint(self.hf, cfg.text_field)
            self.rule = f"{cfg.val_fraction}|{cfg.train_split}|{cfg.val_split}"
        self.val_from = f"the last {cfg.val_fraction:.0%} of each document"

    @property
    def endless(self) -> bool:
        """A Hub dataset: too large to read whole, so it needs a token budget."""
        return self.hf is not None and not self.hf.local

    @functools.cached_property
    def _local_documents(self) -> list[str]:
        return corpus.read_documents(self.cfg.source, self.cfg.text_field, verify=False)

    def pairs(self) -> tuple[Iterator[Pair], Iterator[Pair] | None]:
        """The train stream's pairs and, for a dataset with a validation split, the val stream's."""
        frac = self.cfg.val_fraction
        if self.hf is None:
            return (corpus.split_document(d, frac) for d in self._local_documents), None
        train, val = streaming.open_splits(self.hf, self.cfg.train_split, self.cfg.val_split)
        docs = streaming.documents(train, self.hf, self.cfg.text_field)
        if val is None:
            return (corpus.split_document(d, frac) for d in docs), None
        self.val_from = f"split {self.cfg.val_split}"
        return ((d, None) for d in docs), ((None, d) for d in streaming.documents(
            val, self.hf, self.cfg.text_field))

    def bpe_texts(self) -> list[str]:
        texts, chars = [], 0
        for head, _ in self.pairs()[0]:
            if chars >= BPE_SAMPLE_CHARS:
                break
            texts.append(head or "")
            chars += len(head or "")
        return texts


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets needed
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _read(pairs: Iterable[Pair], writers: dict[str, tokens.StreamWriter],
          budgets: dict[str, int | None], tok: Tokenizer, eos: int, bar: tqdm) -> bool:
    """Tokenise documents into `writers` until every budget is met; True if the source ran out."""
    batch: dict[str, list[str]] = {split: [] for split in writers}
    chars = 0

    def flush() -> None:
        for split, texts in batch.items():
            if texts:
                ids = pack(_encode(tok, texts), eos, writers[split].dtype)
                writers[split].append(ids)
                bar.update(ids.size)
                texts.clear()

    def missing() -> int | None:
        """Tokens still to read for the furthest budget; None when the source is read whole."""
        gaps = [b - w.tokens for s, w in writers.items() if (b := budgets[s]) is not None]
        return max(gaps) if len(gaps) == len(writers) else None

    def batch_chars() -> int:
        # Big batches tokenise fast; near the budget, a few characters per missing token suffice.
        m = missing()
        return BATCH_CHARS if m is None else min(BATCH_CHARS, max(1 << 14, 4 * m))

    for pair in pairs:
        for split, text in zip(tokens.SPLITS, pair, strict=True):
            if text is not None and split in batch:
                batch[split].append(text)
                chars += len(text)
        if chars >= batch_chars():
            flush()
            chars = 0
            if (m := missing()) is not None and m <= 0:
                return False
    flush()
    return True


def _build(folder: Path, reader: _Reader, tok: Tokenizer, eos_token: str,
           budgets: dict[str, int | None], progress: bool | None) -> None:
    """Tokenise the source into the token folder `folder` (the cache entry)."""
    start = time.perf_counter()
    eos = bpe.eos_id(tok, eos_token)
    dtype = tokens.dtype_for(tok.get_vocab_size())
    train_pairs, val_pairs = reader.pairs()
    total = None if None in budgets.values() else sum(budgets.values())  # type: ignore[arg-type]
    writers = {s: tokens.StreamWriter(folder, s, dtype) for s in tokens.SPLITS}
    try:
        with tqdm(total=total, unit="tok", unit_scale=True, desc="tokenising",
                  disable=None if progress is not False else True, leave=False) as bar:
            if val_pairs is None:
                complete = dict.fromkeys(tokens.SPLITS, _read(train_pairs, writers, budgets, tok, eos, bar))
            else:
                complete = {s: _read(p, {s: writers[s]}, budgets, tok, eos, bar)
                            for s, p in zip(tokens.SPLITS, (train_pairs, val_pairs), strict=True)}
        if writers["train"].tokens == 0:
            raise UserError(f"data source {reader.cfg.source} holds no text; pass a source with "
                            "documents in it")
        if writers["val"].tokens == 0:
            raise UserError("the data is too small to hold out a validation split; add more text "
                            "or raise --val-fraction")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    splits = {s: {**w.close(), "complete": complete[s]} for s, w in writers.items()}
    save_tokenizer(tok, eos_token, folder, reader.cfg.tokenizer)
    meta = _meta(reader.cfg, tok, eos_token, dtype, splits, reader.val_from,
                 time.perf_counter() - start)
    tokens.write_atomic(folder / tokens.META, json.dumps(meta, indent=2))


def _meta(cfg: DataConfig, tok: Tokenizer, eos_token: str, dtype: np.dtype,
          splits: dict[str, Any], val_from: str, seconds: float) -> dict[str, Any]:
    return {
        "format": tokens.FORMAT, "dtype": np.dtype(dtype).name, "source": cfg.source,
        "text_field": cfg.text_field, "val_from": val_from, "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": bpe.fingerprint(tok, eos_token), "eos_token": eos_token,
        "eos_id": bpe.eos_id(tok, eos_token), "splits": splits, "seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _enough(record: dict[str, Any], budget: int | None) -> bool:
    return bool(record.get("complete")) or (budget is not None and record["tokens"] >= budget)


def _open_cached(folder: Path, budgets: dict[str, int | None]) -> tuple[dict, dict] | None:
    """The cached streams if they hold the budgets; a damaged entry is rebuilt, not refused."""
    if not (folder / tokens.META).is_file():
        return None
    try:
        meta, streams = tokens.open_streams(folder, "rebuilding it", verify=False)
    except UserError as e:
        print(f"sltrain: token cache {e}", file=sys.stderr)
        return None
    if all(_enough(meta["splits"][s], budgets[s]) for s in tokens.SPLITS):
        return meta, streams
    return None


def _check_ids(data: PreparedData, vocab_size: int) -> None:
    """The model must embed every id the data holds (t5-base has 32100 ids, the papers' models
    32000: its unused extra ids never occur in text)."""
    recorded = max(int(data.meta["splits"][s].get("max_id", vocab_size)) for s in tokens.SPLITS)
    if recorded < vocab_size:
        return
    top = max(tokens.max_id(data.train), tokens.max_id(data.val))
    if top >= vocab_size:
        raise UserError(
            f"the data holds token id {top} but the model's vocabulary has {vocab_size} ids (the "
            f"tokenizer {data.meta.get('tokenizer')} has {data.tokenizer.get_vocab_size()}); "
            f"raise --vocab-size to at least {top + 1}"
        )


def _budgets(cfg: DataConfig, reader: _Reader, min_train: int | None,
             min_val: int | None) -> dict[str, int | None]:
    if reader.hf is None:  # a local source is read whole unless capped
        return {"train": cfg.max_tokens, "val": cfg.val_tokens}
    train = cfg.max_tokens or min_train
    if train is None and reader.endless:
        raise UserError(f"streaming {cfg.source} needs a token budget; pass --max-tokens N "
                        "(training tokens to read)")
    val = cfg.val_tokens or min_val
    if val is None and train is not None:
        val = min(math.ceil(cfg.val_fraction * train), VAL_TOKENS_CAP)
    return {"train": train, "val": val}


def prepare(
    cfg: DataConfig,
    vocab_size: int,
    tokenizer_file: Path | None = None,
    *,
    min_train_tokens: int | None = None,
    min_val_tokens: int | None = None,
    progress: bool | None = None,
) -> PreparedData:
    """Token streams of the train and validation splits of `cfg.source`, memory-mapped.

    The tokenizer is `tokenizer_file` when given (a resumed run reuses its own), else
    `cfg.tokenizer`: a BPE of `vocab_size` trained on the training split and cached, or a
    pretrained one. A streamed `hf:` source is read until the train stream holds
    `cfg.max_tokens` (else `min_train_tokens`) and the val stream `cfg.val_tokens` (else
    `min_val_tokens`) tokens; a local source is read whole unless `cfg.max_tokens` or
    `cfg.val_tokens` cap it. `cfg.source` may also be a token folder (`sltrain data prepare
    --out`). `progress=None` shows a bar on a terminal only.
    """
    _check_slice(cfg)
    path = corpus.resolve(cfg.source)
    # A folder with train.bin is a token folder even when its meta.json is damaged (then refused).
    if not streaming.is_hf(cfg.source) and path.is_dir() and (
            tokens.is_token_folder(path) or (path / "train.bin").is_file()):
        data = _from_token_folder(path, cfg, tokenizer_file)
    else:
        reader = _Reader(cfg)
        budgets = _budgets(cfg, reader, min_train_tokens, min_val_tokens)
        if tokenizer_file is not None:
            tok, eos = load_tokenizer(tokenizer_file)
        elif cfg.tokenizer == bpe.BPE:
            tok, _ = bpe.load_or_train(reader.bpe_texts, vocab_size,
                                       f"{reader.fingerprint}|{reader.rule}")
            eos = bpe.EOS
        else:
            tok, eos = bpe.load_pretrained(cfg.tokenizer)
        key = hashlib.sha256(f"tokens-v2|{reader.fingerprint}|{reader.rule}|"
                             f"{bpe.fingerprint(tok, eos)}".encode()).hexdigest()[:16]
        folder = bpe.cache_dir() / "tokens" / key
        cached = _open_cached(folder, budgets)
        built = cached is None
        if built:
            old = _old_counts(folder)
            grown = {s: None if b is None else max(b, old.get(s, 0)) for s, b in budgets.items()}
            _build(folder, reader, tok, eos, grown, progress)
            cached = tokens.open_streams(folder, "delete it and run again", verify=False)
        meta, streams = cached
        eos_id = bpe.eos_id(tok, eos)
        data = PreparedData(tok, tokens.cut(streams["train"], budgets["train"], eos_id),
                            tokens.cut(streams["val"], budgets["val"], eos_id), eos_id, eos,
                            folder, meta, built)
    _check_ids(data, vocab_size)
    data.val = held_out_slice(data.val, cfg.seq_len, cfg.val_slice)
    return data


def _check_slice(cfg: DataConfig) -> None:
    """A half of the validation stream is the same tokens in every run only if the stream is:
    a streamed source's is as long as each run's evaluation asks, unless --val-tokens fixes it."""
    if cfg.val_slice != "all" and streaming.is_hf(cfg.source) and cfg.val_tokens is None:
        raise UserError(f"--val-slice {cfg.val_slice} on the streamed source {cfg.source} needs "
                        "--val-tokens N, so that every run halves the same validation stream")


def _old_counts(folder: Path) -> dict[str, int]:
    """Token counts of a cache entry too short for the budget: a rebuild never shrinks it."""
    try:
        meta = json.loads((folder / tokens.META).read_text())
        return {s: int(meta["splits"][s]["tokens"]) for s in tokens.SPLITS}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _from_token_folder(path: Path, cfg: DataConfig, tokenizer_file: Path | None) -> PreparedData:
    fix = f"run `sltrain data prepare --out {path}` with the original --data again"
    meta, streams = tokens.open_streams(path, fix, verify=True)
    tok, eos = load_tokenizer(path)
    if bpe.fingerprint(tok, eos) != meta.get("tokenizer_sha256"):
        raise UserError(f"{path / bpe.TOKENIZER_FILE} does not match {tokens.META}; {fix}")
    if cfg.tokenizer not in (bpe.BPE, meta.get("tokenizer")):
        raise UserError(f"{path} was tokenised with {meta.get('tokenizer')}, not {cfg.tokenizer}; "
                        "drop --tokenizer (the folder's own is used) or prepare the data again "
                        "with it")
    if tokenizer_file is not None:
        run_tok, run_eos = load_tokenizer(tokenizer_file)
        if bpe.fingerprint(run_tok, run_eos) != meta["tokenizer_sha256"]:
            raise UserError(f"the run's {tokenizer_file.name} differs from the tokenizer of {path}; "
                            "resume with the data the run was started with")
    eos_id = bpe.eos_id(tok, eos)
    return PreparedData(tok, tokens.cut(streams["train"], cfg.max_tokens, eos_id),
                        tokens.cut(streams["val"], cfg.val_tokens, eos_id), eos_id, eos, path, meta)


def write_token_folder(data: PreparedData, out: Path,
                       on_copy: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the streams of `data` (as cut for the run) to a self-contained token folder."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not tokens.is_token_folder(out))):
        raise UserError(f"{out} exists and is not a prepared data folder; pass a new or empty --out")
    if data.folder is not None and out.resolve() == data.folder.resolve():
        return data.meta
    writable_dir(out, "--out")
    writers = {s: tokens.StreamWriter(out, s, data.train.dtype) for s in tokens.SPLITS}
    try:
        for split, stream in (("train", data.train), ("val", data.val)):
            for i in range(0, len(stream), 1 << 24):
                writers[split].append(np.asarray(stream[i : i + (1 << 24)]))
                if on_copy:
                    on_copy(min(1 << 24, len(stream) - i))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    splits = {s: {**w.close(), "complete": True} for s, w in writers.items()}
    save_tokenizer(data.tokenizer, data.eos_token, out, data.meta.get("tokenizer"))
    meta = {**data.meta, "splits": splits,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tokens.write_atomic(out / tokens.META, json.dumps(meta, indent=2))
    return meta
