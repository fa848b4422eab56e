"""The files of run and output folders: reading JSON records, claiming folders to write into.

Not from a paper: the one place where a missing or damaged file, or an unusable output path,
becomes one `UserError` line that names the path and the fix, instead of a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sltrain.errors import UserError


def read_json(path: Path, fix: str, kind: type = dict) -> Any:
    """The JSON value in `path`, which must be a `kind` (an object by default); a missing,
    unreadable or damaged file is a UserError naming it, ending with `fix`."""
    value = _parse(_read(path, fix), path, fix)
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged (it holds a JSON {type(value).__name__}, not "
                        f"{_NAMES.get(kind, kind.__name__)}); {fix}")
    return value


def read_jsonl(path: Path, fix: str, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """The records (one JSON object a line) of `path`; blank lines are skipped. `torn_tail_ok`
    drops a last line that does not parse: an append cut short by a crash (a log's last record)."""
    lines = [ln for ln in _read(path, fix).splitlines() if ln.strip()]
    if torn_tail_ok and lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    records = [_parse(ln, path, fix, f"line {i}") for i, ln in enumerate(lines, 1)]
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise UserError(f"{path} is damaged (record {i} is not a JSON object); {fix}")
    return records


_NAMES = {dict: "an object", list: "a list"}


def _read(path: Path, fix: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged (not UTF-8 text); {fix}") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None


def _parse(text: str, path: Path, fix: str, where: str = "") -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested brackets
        first = (str(e).splitlines() or [type(e).__name__])[0]
        what = f"{where} is not JSON" if where else "not JSON"
        raise UserError(f"{path} is damaged ({what}: {first}); {fix}") from None


def writable_dir(path: Path, flag: str, create: bool = True) -> Path:
    """`path` as a folder this process can write into, created if new (parents too).

    With `create=False` nothing is made: only what can be seen without writing is checked (the
    path is no file, its nearest existing ancestor is a folder we may write in), so that a run
    can refuse a hopeless --out-dir before its first slow step and leave nothing behind.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write to {path} (it is a file, not a folder); pass another {flag}")
    if not create:
        above = path
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise UserError(f"cannot write to {path} ({above} is a file, not a folder); pass "
                            f"a writable {flag}")
        if not os.access(above, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {path} (no write permission in {above}); pass a "
                            f"writable {flag}")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # proves the folder takes files (read-only mounts)
            pass
    except OSError as e:
        raise UserError(f"cannot write to {path} ({e.strerror or e}); pass a writable {flag}") from None
    return path


def writable_file(path: Path, flag: str, create: bool = True) -> Path:
    """`path` as a file this process can write (its folder created if new, unless `create` is
    False: see `writable_dir`); never a folder."""
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; pass a file name as {flag}")
    writable_dir(path.parent, flag, create)
    return path


def os_error_line(e: OSError) -> str:
    """One line for a file-system error nothing else caught (the CLI's last line of defence)."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    if not paths:
        return f"{e.strerror or e} ({type(e).__name__}); check the disk, network and permissions"
    return (f"cannot read or write {paths}: {e.strerror or e}; check that path (a folder that "
            "exists, may be written, has space) or pass another")
