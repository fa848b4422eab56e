"""Sparse pretraining, dense fine-tuning (SPDF): fold a run into a dense one and start from it.

    sltrain train --method sparse --density 0.25 --out-dir runs/sp    # 75% of each weight pruned
    sltrain densify runs/sp --out runs/sp-dense                       # all weights free again
    sltrain train --method full --init-from runs/sp-dense --out-dir runs/ft

`densify` writes a run folder of method `full` holding one weights-only checkpoint (same step and
token count as the source), which `sltrain eval`, `sltrain export`, `sltrain health` and
`--init-from` read like any run. `--init-from` copies a run's weights into a new run's freshly
built model (factored layers merged to dense when the new run is `full`); the optimizer, the
schedule and the step count start afresh.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sltrain.config import build_config
from sltrain.data.tokenizer import META_FILE, TOKENIZER_FILE
from sltrain.errors import UserError
from sltrain.parametrize import merge
from sltrain.parametrize.base import FactoredLinear
from sltrain.train.checkpoint import STATE_FILE, find_checkpoint, save_checkpoint


def _load(path: Path, flag: str) -> tuple[nn.Module, Any, Path]:
    from sltrain.export import load_run_model  # export imports the training loop

    if not path.exists():
        raise UserError(f"{flag} {path} does not exist; pass a run folder or a checkpoint folder")
    return load_run_model(path)


def densify(path: Path, out: Path) -> dict[str, Any]:
    """Write the model of run/checkpoint `path`, merged to dense, as a method-`full` run in `out`."""
    from sltrain.model import param_spec

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pass a new --out")
    model, cfg, ckpt = _load(path, "densify")
    source_state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    merge(model)
    tree = cfg.to_dict()
    tree["method"]["name"] = "full"
    tree["train"].update(out_dir=str(out), init_from=None)
    dense_cfg = build_config(tree)
    meta = {"config": dense_cfg.to_dict(), "param_spec": param_spec(dense_cfg).to_dict(),
            "densified_from": str(ckpt)}
    step = source_state["step"]
    state = {"step": step, "tokens_seen": source_state["tokens_seen"],
             "densified_from": str(ckpt)}  # weights only: no optimizer state to resume
    out.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, META_FILE):
        if (ckpt.parent.parent / name).is_file():
            shutil.copy(ckpt.parent.parent / name, out / name)
    derived = {"rank": dense_cfg.rank, "lora_alpha": dense_cfg.lora_alpha,
               "density": dense_cfg.density, "warmup_steps": dense_cfg.warmup_steps,
               "tokens_per_step": dense_cfg.tokens_per_step, "densified_from": str(ckpt)}
    (out / "config.json").write_text(json.dumps({**dense_cfg.to_dict(), "derived": derived},
                                                indent=2))
    written = save_checkpoint(out, step, model.state_dict(), state, meta, keep=1)
    return {"source": str(ckpt), "method": cfg.method.name, "checkpoint": str(written),
            "params": sum(p.numel() for p in model.parameters()), "step": step}


def init_tokenizer_dir(path: Path) -> Path:
    """The run folder whose tokenizer a run started `--init-from path` must use."""
    return find_checkpoint(path).parent.parent


@torch.no_grad()
def init_weights_from(model: nn.Module, path: Path) -> Path:
    """Copy the weights of run/checkpoint `path` into `model` (of the same shape); a dense
    `model` takes them merged. Returns the checkpoint read."""
    source, source_cfg, ckpt = _load(path, "--init-from")
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
