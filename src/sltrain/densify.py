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

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sltrain.config import build_config
from sltrain.errors import UserError
from sltrain.parametrize import merge
from sltrain.parametrize.base import FactoredLinear
from sltrain.train.checkpoint import find_checkpoint


def densify(path: Path, out: Path) -> dict[str, Any]:
    """Write the model of run/checkpoint `path`, merged to dense, as a method-`full` run in `out`."""
    from sltrain.export import load_run_model, save_model_run  # export imports the loop

    model, cfg, ckpt = load_run_model(path)
    merge(model)
    tree = cfg.to_dict()
    tree["method"]["name"] = "full"
    tree["train"].update(out_dir=str(out), init_from=None)
    record = {"command": "densify", "source": str(ckpt), "from_method": cfg.method.name}
    written = save_model_run(model.state_dict(), build_config(tree), out, ckpt, record)
    return {"source": str(ckpt), "method": cfg.method.name, "checkpoint": str(written),
            "params": sum(p.numel() for p in model.parameters()),
            "step": int(written.name.removeprefix("step_"))}


def init_tokenizer_dir(path: Path) -> Path:
    """The run folder whose tokenizer a run started `--init-from path` must use."""
    return find_checkpoint(path).parent.parent


@torch.no_grad()
def init_weights_from(model: nn.Module, path: Path) -> Path:
    """Copy the weights of run/checkpoint `path` into `model` (of the same shape); a dense
    `model` takes them merged. Returns the checkpoint read."""
    from sltrain.export import load_run_model

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
