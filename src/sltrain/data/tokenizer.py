"""Tokenizers: a byte-level BPE trained on the corpus and cached, or a pretrained one (t5-base).

Byte-level BPE as in GPT-2 ("Language Models are Unsupervised Multitask Learners"): every byte
string is encodable, so no text is ever mapped to an unknown token. The papers' runs use the
t5-base tokenizer, loaded through `transformers` and kept as its `tokenizers.Tokenizer` backend.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sltrain.data.tokens import write_atomic
from sltrain.errors import UserError
from sltrain.files import read_json

EOS = "<|endoftext|>"
BPE = "bpe"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
# End-of-text tokens recognised in a bare tokenizer.json that carries no record of its own.
_KNOWN_EOS = (EOS, "</s>", "<eos>", "<|end_of_text|>")


def cache_dir() -> Path:
    """Where derived artefacts (tokenizers, token files) are kept: $SLTRAIN_CACHE or ~/.cache."""
    root = os.environ.get("SLTRAIN_CACHE") or Path.home() / ".cache" / "sltrain"
    return Path(root)


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    # Each merge joins two tokens of the text, so no more than its bytes (plus the 256 of the
    # alphabet and EOS) can be learnt; asking for more only makes the trainer allocate for them.
    vocab_size = min(vocab_size, 257 + sum(len(t.encode()) for t in texts))
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
        try:
            return Tokenizer.from_file(str(path)), path
        except Exception:  # a damaged cache entry (tokenizers raises bare Exceptions): rebuild it
            pass
    tok = train_bpe(texts_fn(), vocab_size)
    write_atomic(path, tok.to_str(pretty=True))
    return tok, path


def eos_id(tok: Tokenizer, eos: str = EOS) -> int:
    idx = tok.token_to_id(eos)
    if idx is None:
        raise UserError(f"the tokenizer has no end-of-text token {eos!r}; use a tokenizer with one")
    return idx


def fingerprint(tok: Tokenizer, eos: str) -> str:
    return hashlib.sha256(f"{tok.to_str()}|{eos}".encode()).hexdigest()


def save_tokenizer(tok: Tokenizer, eos: str, folder: Path, source: str | None = None) -> None:
    """Write tokenizer.json and tokenizer_meta.json (its EOS), enough to reload it anywhere."""
    write_atomic(folder / TOKENIZER_FILE, tok.to_str(pretty=True))
    write_atomic(folder / META_FILE, json.dumps({"eos_token": eos, "source": source}, indent=2))


def load_tokenizer(path: Path) -> tuple[Tokenizer, str]:
    """The tokenizer and EOS token saved in a folder (or at a tokenizer.json path).

    Without tokenizer_meta.json (runs saved before it existed) the EOS is the BPE's
    <|endoftext|>, or another well-known end-of-text token the tokenizer holds.
    """
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"tokenizer file {file} is missing; restore it or start anew")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise UserError(f"tokenizer file {file} cannot be read ({e}); restore it") from None
    meta = file.with_name(META_FILE)
    if meta.is_file():
        eos = read_json(meta, "restore it").get("eos_token")
        if not isinstance(eos, str):
            raise UserError(f"{meta} is damaged (no eos_token string); restore it")
    else:
        eos = next((t for t in _KNOWN_EOS if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise UserError(f"{file} has no end-of-text token ({', '.join(_KNOWN_EOS)}) and no "
                            f"{META_FILE} naming one; pass the tokenizer's folder with its "
                            "tokenizer_config.json")
    eos_id(tok, eos)
    return _plain(tok), eos


def _plain(tok: Tokenizer) -> Tokenizer:
    # Saved tokenizers may truncate or pad (t5-base truncates at 512); documents must stay whole.
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_pretrained(spec: str) -> tuple[Tokenizer, str]:
    """A tokenizer given as a Hugging Face name (t5-base), a local folder or a tokenizer.json."""
    path = Path(spec).expanduser()
    if path.is_file() or (path / META_FILE).is_file() or (
        (path / TOKENIZER_FILE).is_file() and not (path / "tokenizer_config.json").is_file()
    ):
        return load_tokenizer(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"--tokenizer {spec} needs the transformers package; pip install "
                        "'sltrain[hf]', or use --tokenizer bpe") from None
    try:
        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # OSError offline or unknown name, ValueError for odd folders
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if path.is_dir():  # a local folder: its files are damaged, no download will help
            raise UserError(f"tokenizer folder {spec} cannot be loaded ({first}); restore its "
                            "tokenizer.json and tokenizer_config.json, or pass another "
                            "--tokenizer") from None
        raise UserError(
            f"tokenizer {spec} cannot be loaded ({first}); download it once with network "
            f"(it is then kept in the Hugging Face cache) and set HF_HUB_OFFLINE=1 to use that "
            "cache offline, or pass a local folder or tokenizer.json as --tokenizer"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise UserError(f"tokenizer {spec} has no fast (tokenizers) version; convert it to a "
                        "tokenizer.json or pick another")
    if not hf.eos_token:
        raise UserError(f"tokenizer {spec} has no end-of-text token; pick a tokenizer with an "
                        "eos_token")
    eos_id(backend, hf.eos_token)
    return _plain(backend), str(hf.eos_token)
