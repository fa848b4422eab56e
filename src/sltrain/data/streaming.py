"""Hugging Face `datasets` sources, streamed: `hf:NAME[:CONFIG]` on the Hub (allenai/c4:en) or a
packaged reader over local files (`hf:json:PATH`, `hf:parquet:PATH`, `hf:text:PATH`, `hf:csv:PATH`).

Documents come in the dataset's own order (no shuffling), so a source always yields the same
stream; only as many are read as the token budget needs.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sltrain.data import corpus
from sltrain.errors import UserError

PREFIX = "hf:"
# datasets' packaged readers, with the local file types each reads.
PACKAGED = {
    "json": (".jsonl", ".jsonl.gz", ".json"),
    "parquet": (".parquet",),
    "text": (".txt",),
    "csv": (".csv",),
}


@dataclass(frozen=True)
class HFSource:
    spec: str
    name: str
    config: str | None = None
    files: tuple[Path, ...] = ()

    @property
    def local(self) -> bool:
        """Local files through a packaged reader: finite, fingerprinted by their bytes."""
        return self.name in PACKAGED


def is_hf(source: str) -> bool:
    return source.startswith(PREFIX)


def parse(source: str) -> HFSource:
    """`hf:NAME[:CONFIG]` or `hf:BUILDER:PATH_OR_GLOB` for a packaged reader over local files."""
    name, _, rest = source.removeprefix(PREFIX).partition(":")
    if not name:
        raise UserError(f"data source {source} names no dataset; use hf:NAME[:CONFIG], e.g. "
                        "hf:allenai/c4:en, or hf:json:PATH for local files")
    if name not in PACKAGED:
        return HFSource(source, name, rest or None)
    if not rest:
        raise UserError(f"data source {source} names no files; use hf:{name}:PATH (a file, folder "
                        "or glob)")
    suffixes = PACKAGED[name]
    path = Path(rest).expanduser()
    if glob.has_magic(rest):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise UserError(f"data source {source}: no {'/'.join(suffixes)} files at {rest}; pass an "
                        "existing file, folder or glob")
    return HFSource(source, name, None, tuple(files))


def fingerprint(src: HFSource, text_field: str) -> str:
    """Local files: their bytes (checksums verified); a Hub dataset: its name and config."""
    h = hashlib.sha256(f"{src.name}|{src.config}|{text_field}".encode())
    for path in src.files:
        h.update(path.name.encode())
        h.update((corpus.verify_checksum(path) or corpus.sha256_file(path)).encode())
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_splits(
    src: HFSource, train_split: str, val_split: str
) -> tuple[Iterable[Any], Iterable[Any] | None]:
    """The streamed train split and the validation split (None when the dataset has none)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data source {src.spec} needs the datasets package; pip install "
                        "'sltrain[hf]', or pass local files as --data") from None
    datasets.logging.set_verbosity_error()
    kwargs: dict[str, Any] = {"streaming": True}
    if src.local:
        kwargs["data_files"] = [str(p) for p in src.files]
        if src.name == "text":
            kwargs["sample_by"] = "document"  # a text file is one document, as for local .txt
    try:
        splits = datasets.load_dataset(src.name, src.config, **kwargs)
    except Exception as e:  # offline, unknown name or config, gated dataset: all reach the user
        raise UserError(
            f"dataset {src.spec} cannot be opened ({_first_line(e)}); check the name and config "
            "and the network (HF_DATASETS_OFFLINE=1 works only for a dataset already in the "
            "local cache), or pass local files as --data PATH or hf:json:PATH"
        ) from None
    if train_split not in splits:
        raise UserError(f"dataset {src.spec} has no split {train_split!r} (has "
                        f"{', '.join(splits)}); set --train-split")
    return splits[train_split], splits.get(val_split)


def documents(split: Iterable[Any], src: HFSource, text_field: str) -> Iterator[str]:
    """The non-empty texts of a streamed split, read as the caller consumes them."""
    n = 0
    try:
        for record in split:
            if text_field not in record:
                raise UserError(f"dataset {src.spec} has no field {text_field!r} (has "
                                f"{', '.join(record)}); set --text-field")
            text = str(record[text_field])
            n += 1
            if text.strip():
                yield text
    except UserError:
        raise
    except Exception as e:  # network or file errors surface during iteration
        raise UserError(f"reading {src.spec} failed after {n} documents ({_first_line(e)}); check "
                        "the network or the files and run again") from None
