"""Which run `sltrain train` starts or continues: the resume policy of `--resume auto|PATH`.

A resumed run keeps its saved config (flags may change only what a run can continue with), so a
continued run trains exactly as the uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from sltrain.config import (
    RunConfig,
    flatten,
    load_config,
    read_config_file,
    resume_config,
    run_clashes,
)
from sltrain.errors import UserError
from sltrain.run.checkpoint import list_checkpoints


class Plan(NamedTuple):
    """The arguments of `sltrain.train.train`: what to train, where, and what to continue."""

    cfg: RunConfig
    run_dir: Path | None = None
    resume: Path | None = None


def plan(config: str | Path | None, overrides: dict[str, Any], resume: str | None) -> Plan:
    """The run `sltrain train [--config FILE] [FLAGS] [--resume auto|PATH]` means.

    `auto` continues the newest complete checkpoint of --out-dir if there is one (refusing a
    folder another config made) and starts it otherwise; a PATH (run or checkpoint folder)
    continues that run from its saved config, with the config file and flags on top.
    """
    if resume == "auto":
        cfg = load_config(config, overrides)
        if not cfg.train.out_dir:
            raise UserError("--resume auto needs --out-dir, the run folder to continue or start")
        run_dir = Path(cfg.train.out_dir)
        if not list_checkpoints(run_dir):
            return Plan(cfg)
        clashes = run_clashes(run_dir, cfg)
        if clashes:
            raise UserError(f"run folder {run_dir} was made by another config "
                            f"({', '.join(clashes)}); pass another --out-dir or the same flags")
        return Plan(cfg, run_dir, run_dir)
    if resume:
        path = Path(resume)
        if not path.exists():
            raise UserError(f"--resume {path} does not exist; pass a run folder or checkpoint")
        run_dir = path if (path / "config.json").is_file() else path.parent.parent
        if config:
            overrides = {**flatten(read_config_file(Path(config))), **overrides}
        return Plan(resume_config(run_dir, overrides), run_dir, path)
    return Plan(load_config(config, overrides))
