"""The tuning stage of a suite (`[tune]`): each variant's learning-rate grid at a short budget, the
best rate chosen by validation loss on a held-out slice that the final report does not use.

A rate chosen on the blocks the report is computed on would flatter the tuned methods by the
noise it was chosen for; so tuning runs evaluate on the first half of the validation blocks
(`--val-slice tune`) and the final runs, at the chosen rates, on the second (`--val-slice report`,
`data.packing.held_out_slice`). The runner (`bench.runner`) runs the stage into SUITE_OUT/tune/.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from sltrain.bench.suite import Suite

TUNE_DIR = "tune"  # under the suite's folder: runs/, logs/ and results.csv of the tuning runs
PENDING = "<tuned>"  # a dry run's final lr when its tuning has not run yet


@dataclass
class Choice:
    """One variant's tuning: the mean tune-slice loss at each rate, and the rate chosen."""

    variant: str
    losses: dict[float, float | None]  # rate -> mean val loss over the tuning seeds; None: failed
    lr: float | None  # None when no rate finished at every tuning seed

    @property
    def at_edge(self) -> bool:
        """The chosen rate is the grid's lowest or highest: a wider grid might do better."""
        return self.lr is not None and len(self.losses) > 1 and self.lr in (
            min(self.losses), max(self.losses))


def _loss(runs: list[dict[str, Any]]) -> float | None:
    """Mean validation loss of one rate's runs; None unless every one of them finished with a
    finite loss (a rate that diverges at one seed is not a rate to recommend)."""
    losses = [r.get("val_loss") for r in runs if r.get("status") == "finished"]
    if len(losses) < len(runs) or any(x in (None, "") or not math.isfinite(float(x))
                                      for x in losses):
        return None
    return statistics.fmean(float(x) for x in losses)


def choose(rows: list[dict[str, Any]]) -> dict[str, Choice]:
    """Per variant in the tuning runs' `rows` (results.csv rows, `lr` one of them), the rate with
    the lowest mean validation loss over the tuning seeds (ties: the lower rate)."""
    grids: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for r in rows:
        grids.setdefault(r["variant"], {}).setdefault(float(r["lr"]), []).append(r)
    out = {}
    for variant, grid in grids.items():
        losses = {lr: _loss(grid[lr]) for lr in sorted(grid)}
        done = {lr: loss for lr, loss in losses.items() if loss is not None}
        out[variant] = Choice(variant, losses, min(done, key=done.__getitem__) if done else None)
    return out


def tuned_lrs(suite: Suite, rows: dict[str, dict[str, Any]], only: list[str] | None = None,
              pending: bool = False) -> dict[str, float | str | None]:
    """The final rate of each chosen variant from the tuning `rows` (by run name) of the suite's
    current grid; a variant with tuning runs missing gets PENDING when `pending` (a dry run)."""
    out: dict[str, float | str | None] = {}
    for variant in suite.chosen(only):
        names = [r.name for r in suite.tune_runs([variant])]
        if pending and not all(n in rows for n in names):
            out[variant] = PENDING
            continue
        choice = choose([rows[n] for n in names if n in rows]).get(variant)
        out[variant] = choice.lr if choice else None
    return out


def _cell(lr: float, loss: float | None, best: bool) -> str:
    text = f"{lr:.3g}: " + ("failed" if loss is None else f"{loss:.4f}")
    return f"**{text}**" if best else text


def tuning_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The report's tuning section: variant x rate -> mean tune-slice loss, the chosen rate bold."""
    choices = choose(rows)
    done = [r for r in rows if r["status"] == "finished"]
    budget = sorted({(int(r["steps"]), int(r["tokens"])) for r in done if r["tokens"]})
    seeds = sorted({int(r["seed"]) for r in rows})
    width = max(len(c.losses) for c in choices.values())
    lines = [
        "## Learning-rate tuning", "",
        f"{len(rows)} tuning runs ({len(done)} finished): "
        f"{', '.join(f'{s} steps, {t:,} tokens' for s, t in budget) or '—'} each, seed(s) "
        f"{', '.join(map(str, seeds))}. Each cell is the validation loss on the tuning slice (the "
        "first half of the validation blocks; mean over the tuning seeds) at one learning rate; "
        "the rate in bold has the lowest and is the one the final runs use. The final runs are "
        "evaluated on the other half only. The tuning runs' commands are in tune/results.csv.",
        "",
        "| method | " + " | ".join(f"rate {i + 1}" for i in range(width)) + " | tuned lr |",
        "|---|" + "---|" * width + "---|",
    ]
    for c in choices.values():
        cells = [_cell(lr, loss, lr == c.lr) for lr, loss in c.losses.items()]
        cells += [""] * (width - len(cells))
        tuned = ("none finished: the suite's lr" if c.lr is None else
                 f"{c.lr:g}" + (" (grid edge: widen the grid)" if c.at_edge else ""))
        lines.append(f"| {c.variant} | " + " | ".join(cells) + f" | {tuned} |")
    return lines
