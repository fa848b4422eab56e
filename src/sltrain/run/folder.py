"""A run folder: config.json, the tokenizer, checkpoints/ (see `run.checkpoint`).

Reading a run's model and tokenizer, writing a model-only run (convert, densify, soup), naming a
new run's folder, and copying a run's weights into a new one (`--init-from`, as SPDF's dense
fine-tuning after sparse pretraining does).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import nn

from sltrain.config import RunConfig, build_config, run_clashes
from sltrain.data.tokenizer import load_tokenizer, save_tokenizer
from sltrain.errors import UserError
from sltrain.files import writable_dir
from sltrain.model import build_model, param_spec
from sltrain.parametrize import merge
from sltrain.parametrize.base import FactoredLinear
from sltrain.run.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    find_checkpoint,
    list_checkpoints,
    load_state,
    load_weights,
    save_checkpoint,
)

CONFIG_FILE = "config.json"


def run_tokenizer(run_dir: Path) -> tuple[Tokenizer, str]:
    """The tokenizer a run trained with, and its end-of-text token."""
    return load_tokenizer(run_dir)


def checkpoint_config(ckpt: Path) -> RunConfig:
    """The run config a checkpoint's weights file records in its metadata."""
    try:
        with safe_open(str(ckpt / MODEL_FILE), "pt") as f:
            meta = (f.metadata() or {}).get("sltrain")
    except (OSError, SafetensorError) as e:
        raise UserError(f"checkpoint {ckpt} cannot be read ({e}); it is damaged") from None
    if meta is None:
        raise UserError(f"{ckpt / MODEL_FILE} records no sltrain config; pass a checkpoint written "
                        "by `sltrain train`")
    try:
        tree = json.loads(meta)["config"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"the sltrain record in {ckpt / MODEL_FILE} is damaged; restore the "
                        "checkpoint or use an earlier one") from None
    return build_config(tree)


def load_run_model(path: Path) -> tuple[nn.Module, RunConfig, Path]:
    """The model of a checkpoint folder (or a run folder's newest checkpoint), as it trained."""
    ckpt = find_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg)
    load_weights(ckpt, model.load_state_dict)
    return model.eval(), cfg, ckpt


def write_run_files(run_dir: Path, cfg: RunConfig, tokenizer: Tokenizer, eos_token: str, *,
                    flag: str = "--out-dir", config: bool = True, **record: Any) -> None:
    """The tokenizer and (unless `config=False`) config.json of a run folder, made writable
    first (`flag` names the option that chose it in the refusal)."""
    writable_dir(run_dir, flag)
    save_tokenizer(tokenizer, eos_token, run_dir, cfg.data.tokenizer)
    if config:
        write_run_config(run_dir, cfg, **record)


def write_run_config(run_dir: Path, cfg: RunConfig, **record: Any) -> None:
    """config.json, with `record`: what the config derived, or what made the run."""
    (run_dir / CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), **record}, indent=2))


def checkpoint_meta(cfg: RunConfig, **record: Any) -> dict[str, Any]:
    """What a checkpoint's weights file records: the config and its parameter layout."""
    return {"config": cfg.to_dict(), "param_spec": param_spec(cfg).to_dict(), **record}


def save_model_run(weights: dict[str, torch.Tensor], cfg: RunConfig, out: Path, source: Path,
                   record: dict[str, Any]) -> Path:
    """Write `weights` (the state dict of a model built by `cfg`) as a run folder without a
    training state: config.json, the tokenizer of the checkpoint folder `source`, and one
    model-only checkpoint at `source`'s step. `sltrain eval`, `export`, `health` and
    `train --init-from` read it like a trained run; `record` (what made it: convert, densify,
    soup) goes to config.json's `derived_from`. Returns the checkpoint folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pass a new --out")
    writable_dir(out, "--out", create=False)
    tok, eos = run_tokenizer(source.parent.parent)
    source_state = load_state(source)
    step = source_state["step"]
    write_run_files(out, cfg, tok, eos, flag="--out", derived_from=record)
    state = {"step": step, "tokens_seen": source_state.get("tokens_seen", 0), "model_only": True}
    return save_checkpoint(out, step, weights, state, checkpoint_meta(cfg, **record), keep=1)


def new_run_dir(cfg: RunConfig) -> Path:
    """`--out-dir`, or a fresh runs/PRESET-METHOD-TIME; refused if it already holds checkpoints."""
    if cfg.train.out_dir:
        run_dir = Path(cfg.train.out_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.model.preset}-{cfg.method.name}-{stamp}"
    if list_checkpoints(run_dir):
        clashes = run_clashes(run_dir, cfg)
        why = (f" made by another config ({', '.join(clashes)})" if clashes else "")
        raise UserError(
            f"run folder {run_dir} already holds checkpoints{why}; continue it with --resume "
            f"{run_dir} (or --resume auto), or pass another --out-dir"
        )
    # A damaged checkpoint (no training state) is still work: never train over it.
    damaged = sorted((run_dir / "checkpoints").glob("step_*")) if run_dir.is_dir() else []
    if damaged:
        raise UserError(f"run folder {run_dir} holds the incomplete checkpoint {damaged[-1]} (no "
                        f"{STATE_FILE}); move it away to start over, or pass another --out-dir")
    return writable_dir(run_dir, "--out-dir", create=False)


def init_tokenizer_dir(path: Path) -> Path:
    """The run folder whose tokenizer a run started `--init-from path` must use."""
    if not path.exists():
        raise UserError(f"--init-from {path} does not exist; pass a run or checkpoint folder")
    return find_checkpoint(path).parent.parent


@torch.no_grad()
def init_weights_from(model: nn.Module, path: Path) -> Path:
    """Copy the weights of run/checkpoint `path` into `model` (of the same shape); a dense
    `model` takes them merged. Returns the checkpoint read."""
    source, source_cfg, ckpt = load_run_model(path)
    if not any(isinstance(m, FactoredLinear) for m in model.modules()):
        merge(source)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()[:200]
        raise UserError(f"--init-from {path}: its weights do not fit this model ({first}); use the "
                        f"same model shape, and method full or {source_cfg.method.name}") from None
    return ckpt
