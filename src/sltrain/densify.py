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

from sltrain.config import build_config
from sltrain.parametrize import merge
from sltrain.run.folder import load_run_model, save_model_run


def densify(path: Path, out: Path) -> dict[str, Any]:
    """Write the model of run/checkpoint `path`, merged to dense, as a method-`full` run in `out`."""
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

