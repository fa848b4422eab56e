"""Data pipeline: corpus -> train/validation split -> BPE tokenizer -> packed token streams.

Token streams are cached under $SLTRAIN_CACHE keyed by the corpus and tokenizer, so a second run
on the same data starts training at once.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sltrain.config import DataConfig
from sltrain.data import corpus
from sltrain.data import tokenizer as bpe
from sltrain.data.packing import Blocks, BlockSampler, pack
from sltrain.errors import UserError

__all__ = ["PreparedData", "prepare", "Blocks", "BlockSampler"]


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    eos_id: int


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def prepare(cfg: DataConfig, vocab_size: int, tokenizer_file: Path | None = None) -> PreparedData:
    """Token streams of the train and validation splits of `cfg.source`.

    The tokenizer is `tokenizer_file` when given (a resumed run reuses its own), else a BPE of
    `vocab_size` trained on the training split and cached.
    """
    fp = corpus.fingerprint(cfg.source, cfg.text_field)

    @functools.cache
    def splits() -> tuple[list[str], list[str]]:  # read only on a cache miss, then once
        docs = corpus.read_documents(cfg.source, cfg.text_field, verify=False)
        return corpus.split_documents(docs, cfg.val_fraction)

    if tokenizer_file is not None:
        if not tokenizer_file.is_file():
            raise UserError(f"tokenizer file {tokenizer_file} is missing; restore it or start anew")
        tok = Tokenizer.from_file(str(tokenizer_file))
    else:
        tok, _ = bpe.load_or_train(lambda: splits()[0], vocab_size, f"{fp}|{cfg.val_fraction}")
    if tok.get_vocab_size() > vocab_size:
        raise UserError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but the model only {vocab_size}; "
            "raise --vocab-size"
        )
    eos = bpe.eos_id(tok)
    key = hashlib.sha256(f"{fp}|{cfg.val_fraction}|{tok.to_str()}".encode()).hexdigest()[:16]
    cache = bpe.cache_dir() / "tokens" / key
    streams = {}
    for i, name in enumerate(("train", "val")):
        path = cache / f"{name}.npy"
        if path.is_file():
            streams[name] = np.load(path)
            continue
        encoded = tok.encode_batch(splits()[i], add_special_tokens=False)
        streams[name] = pack([e.ids for e in encoded], eos, vocab_size)
        _save_npy(path, streams[name])
    return PreparedData(tok, streams["train"], streams["val"], eos)
