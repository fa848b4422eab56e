"""Where per-step metrics go: JSON lines always, TensorBoard and Weights & Biases when asked.

`train.log_to = ["tensorboard", "wandb"]` (flag `--log-to tensorboard,wandb`). TensorBoard writes
under RUN/tensorboard; W&B runs offline unless `--wandb-mode online` (sync later with
`wandb sync RUN/wandb/offline-run-*`), and a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from sltrain.config import RunConfig
from sltrain.errors import UserError
from sltrain.files import read_jsonl


def _require(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UserError(f"--log-to needs the {extra} package; pip install 'sltrain[logging]' "
                        f"or drop {extra} from --log-to") from None


class MetricLoggers:
    """One `log(record)` per update step to every sink; `resume_step` drops what a resumed run
    will write again."""

    def __init__(self, run_dir: Path, cfg: RunConfig, resume_step: int | None) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.jsonl.unlink(missing_ok=True)
        elif self.jsonl.is_file():
            records = read_jsonl(self.jsonl, "delete it (its records restart at the checkpoint) "
                                 "or restore it", torn_tail_ok=True)
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records
                                          if r.get("step", 0) <= resume_step))
        self.tensorboard = self.wandb = None
        sinks = cfg.train.log_to
        if "tensorboard" in sinks:
            _require("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a resumed run writes again.
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        if "wandb" in sinks:
            wandb = _require("wandb", "wandb")
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.train.wandb_project, id=run_id, resume="allow",
                                    dir=str(run_dir), mode=cfg.train.wandb_mode,
                                    name=run_dir.name, config=cfg.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items()
                                           if isinstance(v, (int, float, str))})
            self.wandb.finish()
