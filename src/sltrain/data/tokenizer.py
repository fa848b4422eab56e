"""A byte-level BPE tokenizer trained on the corpus with Hugging Face `tokenizers`, and cached.

Byte-level BPE as in GPT-2 ("Language Models are Unsupervised Multitask Learners"): every byte
string is encodable, so no text is ever mapped to an unknown token.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def cache_dir() -> Path:
    """Where derived artefacts (tokenizers, token files) are kept: $SLTRAIN_CACHE or ~/.cache."""
    root = os.environ.get("SLTRAIN_CACHE") or Path.home() / ".cache" / "sltrain"
    return Path(root)


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_or_train(texts_fn, vocab_size: int, fingerprint: str) -> tuple[Tokenizer, Path]:
    """The BPE tokenizer for a corpus fingerprint and vocabulary size, trained once then cached.

    `texts_fn` is called only on a cache miss, so that a cached run never re-reads the corpus.
    """
    key = hashlib.sha256(f"bpe-v1|{fingerprint}|{vocab_size}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path)), path
    tok = train_bpe(texts_fn(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok, path


def eos_id(tok: Tokenizer) -> int:
    idx = tok.token_to_id(EOS)
    if idx is None:
        raise ValueError(f"tokenizer has no {EOS} token")
    return idx
