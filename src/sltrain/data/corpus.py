"""Local corpus sources: the embedded default corpus and text, JSON-lines and Parquet files.

Every source yields a list of document texts; a sibling `<file>.sha256` is verified when present.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from importlib import resources
from pathlib import Path

from sltrain.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_FILE = "early-modern-english.jsonl.gz"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet")


def embedded_path() -> Path:
    return Path(str(resources.files("sltrain.data").joinpath(EMBEDDED_FILE)))


def resolve(source: str) -> Path:
    return embedded_path() if source == EMBEDDED else Path(source).expanduser()


def _suffix(path: Path) -> str:
    return ".jsonl.gz" if path.name.endswith(".jsonl.gz") else path.suffix


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path) -> str | None:
    """Compare `path` with the digest in `path.sha256`, if there is one; return the digest."""
    record = path.with_name(path.name + ".sha256")
    if not record.is_file():
        return None
    recorded = record.read_text().split()
    expected = recorded[0].lower() if recorded else ""
    actual = sha256_file(path)
    if actual != expected:
        fix = ("reinstall sltrain (pip install --force-reinstall sltrain)" if path == embedded_path()
               else f"restore the file or update {record.name}")
        raise UserError(
            f"data file {path} is corrupt: sha256 {actual[:12]}... does not match "
            f"{expected[:12] or '(empty)'}... recorded in {record.name}; {fix}"
        )
    return actual


def data_files(source: str) -> list[Path]:
    path = resolve(source)
    if not path.exists():
        raise UserError(
            f"data source {source} does not exist; pass --data embedded, a path to a "
            f"{'/'.join(SUFFIXES)} file or a folder of them, or hf:NAME[:CONFIG]"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in SUFFIXES)
        if not files:
            raise UserError(f"folder {path} holds no {'/'.join(SUFFIXES)} files; point --data at data")
        return files
    if _suffix(path) not in SUFFIXES:
        raise UserError(f"data file {path} has an unsupported type; use one of {', '.join(SUFFIXES)}")
    return [path]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    texts = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix the line") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise UserError(
                        f"{path}:{lineno} has no '{text_field}' field; set --text-field to the "
                        "field that holds the text"
                    )
                texts.append(str(record[text_field]))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise UserError(f"data file {path} cannot be read ({e}); replace the damaged file") from None
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise UserError(f"{path} has no column '{text_field}' (has {schema.names}); "
                            "set --text-field to the text column")
        return [str(t) for t in pq.read_table(path, columns=[text_field]).column(0).to_pylist()]
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"data file {path} is not readable Parquet ({e}); replace it") from None


def read_documents(source: str, text_field: str = "text", verify: bool = True) -> list[str]:
    """All non-empty document texts of a source, in a fixed order.

    `verify=False` skips the checksums, for a caller that has just checked them (`fingerprint`).
    """
    docs: list[str] = []
    for path in data_files(source):
        if verify:
            verify_checksum(path)
        suffix = _suffix(path)
        if suffix == ".txt":
            try:
                docs.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{path} is not UTF-8 text; convert it to UTF-8") from None
        elif suffix == ".parquet":
            docs.extend(_read_parquet(path, text_field))
        else:
            docs.extend(_read_jsonl(path, text_field))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data source {source} holds no text; pass a file with documents in it")
    return docs


def fingerprint(source: str, text_field: str) -> str:
    """A digest of the source's bytes, for caching what is derived from it; verifies checksums."""
    h = hashlib.sha256(text_field.encode())
    for path in data_files(source):
        h.update(path.name.encode())
        h.update((verify_checksum(path) or sha256_file(path)).encode())
    return h.hexdigest()


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last `val_fraction` of every document (cut at a line break) for validation.

    Every document contributes to both splits, so that a corpus of a few long works (or a single
    text file) validates on the same mix of text it trains on, with no passage in both.
    """
    train, val = [], []
    for doc in docs:
        head, tail = split_document(doc, val_fraction)
        train.append(head)
        if tail is not None:
            val.append(tail)
    if not val:
        raise UserError("the data is too small to hold out a validation split; add more text "
                        "or raise --val-fraction")
    return train, val


def split_document(doc: str, val_fraction: float) -> tuple[str, str | None]:
    """A document's training head and held-out tail (None when the tail is blank)."""
    cut = int(len(doc) * (1 - val_fraction))
    line_break = doc.rfind("\n", 0, cut)
    cut = line_break + 1 if line_break > 0 else cut
    return doc[:cut], doc[cut:] if doc[cut:].strip() else None
