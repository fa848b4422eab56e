"""A learning-rate schedule before training: its key steps as a table and lr vs step as a plot.

What `sltrain schedule` prints for the schedule flags of `sltrain train` (formulas in
sltrain/train/schedule.py: cosine, WSD/MiniCPM, the Power scheduler, infinite, re-warming, SGDR).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sltrain.config import RunConfig, load_config
from sltrain.errors import UserError
from sltrain.files import writable_file
from sltrain.registry import SCHEDULES
from sltrain.train.schedule import multiplier


def key_steps(cfg: RunConfig) -> list[tuple[str, int]]:
    """(label, update step) of the points worth printing: phase starts, middle, end."""
    s, total, warm = cfg.schedule, cfg.train.steps, cfg.warmup_steps
    rows = [("start", 0)]
    if warm:
        rows += [("last warm-up step", warm - 1), ("end of warm-up", warm)]
    if s.name == "infinite":
        rows.append(("start of constant", warm + round(s.cooldown_ratio * total)))
    if s.name == "cosine_restarts" and s.cycle_steps:
        rows.append(("first restart", warm + s.cycle_steps))
    rows.append(("middle", total // 2))
    if s.name in ("wsd", "power", "infinite"):
        rows.append(("start of decay", total - round(s.decay_ratio * total)))
    rows.append(("last step", total - 1))
    return sorted({(label, step) for label, step in rows if 0 <= step < total},
                  key=lambda r: (r[1], r[0]))


def schedule_preview(config: str | None, overrides: dict[str, Any], every_step: bool = False,
                     plot_to: Path | None = None, compare: bool = False) -> dict[str, Any]:
    """The schedule of the run `config` + `overrides` describe: `key_steps` as rows (label, step,
    multiplier, lr), every step too if `every_step`, and a plot of lr vs step at `plot_to` (of
    every registered schedule with the same flags if `compare`; `skipped` names those refused)."""
    if compare and not plot_to:
        raise UserError("--compare draws a figure; pass --plot OUT.png too")
    if plot_to:
        writable_file(plot_to, "--plot", create=False)
    cfg = load_config(config, overrides)
    total, peak = cfg.train.steps, cfg.optimizer.lr
    at = {step: multiplier(cfg, step) for step in (range(total) if every_step else [])}
    rows = [(label, step, m := at.get(step, multiplier(cfg, step)), peak * m)
            for label, step in key_steps(cfg)]
    report: dict[str, Any] = {"name": cfg.schedule.name, "steps": total, "warmup": cfg.warmup_steps,
                              "peak_lr": peak, "tokens_per_step": cfg.tokens_per_step, "rows": rows,
                              "every_step": [(s, m, peak * m) for s, m in at.items()], "skipped": []}
    if plot_to:
        curves = {}
        for name in list(SCHEDULES) if compare else [cfg.schedule.name]:
            try:
                c = load_config(config, {**overrides, "schedule.name": name})
            except UserError as e:
                report["skipped"].append((name, str(e)))
                continue
            curves[name] = [peak * multiplier(c, step) for step in range(total)]
        title = f"{total} steps, warm-up {cfg.warmup_steps}, peak {peak:g}"
        report["plot"] = str(plot_curves(curves, plot_to, title))
    return report


def plot_curves(curves: dict[str, list[float]], out: Path, title: str = "") -> Path:
    """Learning rate against update step, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, lrs) in enumerate(curves.items()):
        ax.plot(range(len(lrs)), lrs, label=name,
                linestyle="--" if i % 2 else "-")  # rewarm overlays cosine after warm-up
    ax.set(xlabel="update step", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(writable_file(out, "--plot"), dpi=120)
    plt.close(fig)
    return out
