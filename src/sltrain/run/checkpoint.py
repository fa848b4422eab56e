"""Checkpoints: model weights (with the SLTrain support) as safetensors, the rest as a torch file.

A checkpoint is a folder `step_NNNNNNN/` written under a temporary name and renamed into place,
so a folder with the final name is always complete; only the newest `keep` are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sltrain.errors import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
    meta: dict[str, Any], keep: int,
) -> Path:
    """Write `weights` (a model state dict) and the training `state` as checkpoint `step`: every
    file fsynced in a temporary folder that is then renamed, so a crash at any point leaves the
    previous checkpoints intact and never a half-written `step_*` folder."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"sltrain": json.dumps(meta)})
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint folder, else the newest checkpoint of a run folder."""
    if not path.exists():
        raise UserError(f"no checkpoint in {path}: it does not exist; pass a run folder or a "
                        "checkpoint folder")
    if (path / MODEL_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint in {path}; pass a run folder with checkpoints/ or a step_* folder")
    return found[-1]


def load_weights(ckpt: Path, apply: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """Read a checkpoint's weights (support included) and hand them to `apply` (e.g. a model's
    `load_state_dict`); a missing, damaged or mismatched file is one UserError."""
    with refusing_damage(ckpt):
        apply(load_file(str(ckpt / MODEL_FILE)))


def load_checkpoint(ckpt: Path, apply: Callable[[dict[str, torch.Tensor]], Any]) -> dict[str, Any]:
    """Load the weights through `apply` (see `load_weights`); return the training state."""
    load_weights(ckpt, apply)
    return load_state(ckpt)


def load_state(ckpt: Path) -> dict[str, Any]:
    """The training state of a checkpoint (step, tokens seen, optimizer, ...); damage is a UserError."""
    with refusing_damage(ckpt):
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"checkpoint {ckpt} is damaged ({STATE_FILE} holds no training state); "
                        "resume from an earlier checkpoint")
    return state


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's training state with its weights under "model" (what TrainState loads)."""
    weights: dict[str, torch.Tensor] = {}
    state = load_checkpoint(ckpt, weights.update)
    return {**state, "model": weights}


@contextlib.contextmanager
def refusing_damage(ckpt: Path) -> Iterator[None]:
    """A missing or unloadable file of `ckpt` (or weights of another shape) as one UserError."""
    try:
        yield
    except FileNotFoundError as e:
        missing = next((f for f in (MODEL_FILE, STATE_FILE) if not (ckpt / f).is_file()), e.filename)
        raise UserError(f"checkpoint {ckpt} is incomplete ({missing} missing); "
                        "resume from an earlier checkpoint") from None
    except (RuntimeError, OSError, SafetensorError, pickle.UnpicklingError, EOFError) as e:
        # torch's refusal of a non-torch file spans a paragraph; its gist is enough here
        first = ("not a torch file" if isinstance(e, (pickle.UnpicklingError, EOFError))
                 else (str(e).splitlines() or [type(e).__name__])[0])
        raise UserError(f"checkpoint {ckpt} cannot be loaded ({first}); it is damaged or from a "
                        "different model config") from None
