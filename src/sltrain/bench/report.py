"""The report of a suite, from its `results.csv` (and tune/results.csv) alone: a paper-style
table, claims, the learning-rate tuning, plots.

Writes `report.md` (perplexity mean ± std and 95% interval over seeds, learning rate, parameters,
memory, speed relative to the suite's baseline measured in the same suite, published numbers
where the preset matches, the tuning stage's grid when the suite has one, each run's command
line) and three PNGs: validation loss against tokens, perplexity against memory
(the papers' trade-off figure), perplexity against parameters. Claims (`[[checks]]`) come from the
`suite.toml` the runner copies beside the CSV.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sltrain.bench.suite import OPS, Check
from sltrain.bench.tune import TUNE_DIR, tuning_lines
from sltrain.config import tomllib
from sltrain.errors import UserError
from sltrain.files import writable_dir

_NUMERIC = ("seed", "lr", "steps", "tokens", "val_loss", "val_ppl", "params_total", "params_trainable",
            "est_memory_bytes", "peak_memory_bytes", "tok_per_s", "wall_time_s", "jobs",
            "published_ppl", "published_memory_gb")
PLOTS = ("loss_curves.png", "ppl_vs_memory.png", "ppl_vs_params.png")


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the folder `sltrain bench` wrote "
                        "(it holds results.csv)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "val_ppl" not in rows[0]:
            raise UserError(f"{path} holds no bench results; rerun the suite to rewrite it")
        for r in rows:
            for k in _NUMERIC:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            r["baseline"] = r.get("baseline") == "True"
    except (ValueError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is damaged ({first}); rerun the suite to rewrite it") from None
    return rows


@dataclass
class Variant:
    """All seeds of one compared configuration."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "finished"]

    def mean(self, key: str) -> float | None:
        values = [r[key] for r in self.done if r[key] is not None]
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        values = [r[key] for r in self.done if r[key] is not None]
        return statistics.stdev(values) if len(values) > 1 else None

    def interval(self, key: str, level: float = 0.95) -> tuple[float, float] | None:
        """The Student-t confidence interval of the mean over seeds (None below two seeds)."""
        from scipy.stats import t

        values = [r[key] for r in self.done if r[key] is not None]
        if len(values) < 2:
            return None
        mean, half = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
        q = float(t.ppf(0.5 + level / 2, len(values) - 1))
        return mean - q * half, mean + q * half

    def lr(self) -> str:
        """The learning rate of the final runs, and whether the tuning stage chose it."""
        r = next((r for r in self.done), self.rows[0])
        if r.get("lr") is None:
            return "—"
        note = {"tuned": " (tuned)", "fallback": " (untuned: no tuning run finished)"}
        return f"{r['lr']:g}" + note.get(r.get("lr_source") or "", "")

    def metric(self, name: str) -> float | None:
        key = {"peak_memory": "peak_memory_bytes", "est_memory": "est_memory_bytes",
               "params": "params_total"}.get(name, name)
        return self.mean(key)

    def curve(self) -> tuple[list[float], list[float]]:
        """Validation loss against tokens, averaged over the seeds at each evaluation."""
        points: dict[float, list[float]] = {}
        for r in self.done:
            for pair in (r.get("val_curve") or "").split():
                tokens, loss = pair.split(":")
                points.setdefault(float(tokens), []).append(float(loss))
        xs = sorted(points)
        return xs, [statistics.fmean(points[x]) for x in xs]


def group(rows: list[dict[str, Any]]) -> dict[str, Variant]:
    variants: dict[str, Variant] = {}
    for r in rows:
        variants.setdefault(r["variant"], Variant(r["variant"])).rows.append(r)
    return variants


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f} MB"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}x"


def _load_checks(folder: Path) -> list[Check]:
    path = folder / "suite.toml"
    if not path.is_file():
        return []
    return [Check(**c) for c in tomllib.loads(path.read_text()).get("checks", [])]


def check_lines(checks: list[Check], variants: dict[str, Variant]) -> list[str]:
    lines = []
    for c in checks:
        left, right = variants.get(c.left), variants.get(c.right)
        a = left.metric(c.metric) if left else None
        b = right.metric(c.metric) if right else None
        if a is None or b is None:
            lines.append(f"- **not measured**: {c.claim} (a run is missing or failed)")
            continue
        holds = OPS[c.op](a, c.factor * b)
        factor = f"{c.factor:g} × " if c.factor != 1 else ""
        fmt = _mb if c.metric.endswith("memory") else (lambda x: f"{x:.4g}")
        lines.append(f"- **{'holds' if holds else 'does not hold'}**: {c.claim} — {c.metric} "
                     f"{c.left} {fmt(a)} {c.op} {factor}{c.right} {fmt(b)} "
                     f"(ratio {a / b:.3f})")
    return lines


def _table_row(v: Variant, base: Variant) -> str:
    ppl, std = v.mean("val_ppl"), v.std("val_ppl")
    ppl_s = "failed" if ppl is None else f"{ppl:.2f}" + (f" ± {std:.2f}" if std else "")
    ci = v.interval("val_ppl")
    pub = v.rows[0]
    published = ("—" if pub["published_ppl"] is None else
                 f"{pub['published_ppl']:.2f}" + (f" ({pub['published_memory_gb']:g}G)"
                                                  if pub["published_memory_gb"] else ""))
    params, trainable = v.mean("params_total"), v.mean("params_trainable")
    return (
        f"| {v.name} | {len(v.done)}/{len(v.rows)} | {ppl_s} | "
        f"{'—' if ci is None else f'{ci[0]:.2f} – {ci[1]:.2f}'} | {v.lr()} | "
        f"{'—' if params is None else f'{params / 1e6:.2f}M'} | "
        f"{'—' if trainable is None else f'{trainable / 1e6:.2f}M'} | "
        f"{_mb(v.mean('est_memory_bytes'))} | {_mb(v.mean('peak_memory_bytes'))} | "
        f"{_ratio(v.mean('peak_memory_bytes'), base.mean('peak_memory_bytes'))} | "
        f"{_ratio(v.mean('tok_per_s'), base.mean('tok_per_s'))} | {published} |")


def render(folder: Path, out: Path | None = None) -> Path:
    """Write report.md and the plots for the results.csv in `folder` (into `out`, default the
    same folder); return the report's path."""
    rows = read_results(folder / "results.csv")
    out = writable_dir(out or folder, "--report-dir")
    variants = group(rows)
    base = next((v for v in variants.values() if any(r["baseline"] for r in v.rows)),
                next(iter(variants.values())))
    plots(variants, out)

    first = rows[0]
    finished = [r for r in rows if r["status"] == "finished"]
    kinds = sorted({r["peak_memory_kind"] for r in finished if r["peak_memory_kind"]})
    devices = sorted({r["device"] for r in finished if r["device"]})
    jobs = max((r["jobs"] or 1) for r in rows)
    tuned = any(r.get("lr_source") in ("tuned", "fallback") for r in rows)
    tokens = sorted({int(r["tokens"]) for r in finished if r["tokens"]})
    lines = [
        f"# Benchmark suite `{first['suite']}`",
        "",
        f"{len(finished)} of {len(rows)} runs finished; preset(s) "
        f"{', '.join(sorted({r['preset'] for r in rows}))}; "
        f"{' / '.join(f'{t:,}' for t in tokens) or '—'} training tokens per run; "
        f"device {', '.join(devices) or '—'}; {int(jobs)} run(s) at a time.",
        "",
        "| method | seeds | val ppl (mean ± std) | 95% interval | lr | params | trainable "
        "| est. training state | peak memory | memory vs "
        f"{base.name} | speed vs {base.name} | published ppl (memory) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_row(v, base) for v in variants.values()]
    lines += [
        "",
        "- *val ppl*: exp of the mean validation loss at the end of each run, averaged over "
        "seeds; ± is the standard deviation over seeds, the *95% interval* that of the mean "
        "(Student t with seeds − 1 degrees of freedom)"
        + ("; evaluated on the report slice (the second half of the validation blocks), which "
           "the tuning stage never saw." if tuned else "."),
        "- *est. training state*: weights, gradients, optimizer states and sparse indices in the "
        "run's dtype, counted from tensor shapes (`sltrain memory`).",
        f"- *peak memory* ({', '.join(kinds) or '—'}): on CUDA `torch.cuda.max_memory_allocated`; "
        "on CPU the process's resident set size sampled every 2 ms during training, minus its "
        "size once the data is loaded and before the model is built (weights, gradients, "
        "optimizer states and activations; the interpreter and token arrays are left out).",
        "- *speed*: training tokens per second over update steps (no evaluation, no saving), "
        f"mean over seeds, relative to `{base.name}` in the same suite"
        + (f"; {int(jobs)} runs shared the machine at a time, so speeds are noisier." if jobs > 1
           else "; runs went one at a time."),
    ]
    checks = _load_checks(folder)
    if checks:
        lines += ["", "## Claims checked against these results", "", *check_lines(checks, variants)]
    tuning = folder / TUNE_DIR / "results.csv"
    if tuning.is_file():
        lines += ["", *tuning_lines(read_results(tuning))]
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- `{r['run']}` ({r['status']}): {r['error']}" for r in failed]
    lines += ["", "## Plots", ""]
    lines += [f"![{p[:-4]}]({p})" for p in PLOTS]
    lines += ["", "## Commands", "", "```"] + [r["command"] for r in rows] + ["```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def plots(variants: dict[str, Variant], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants.values():
        xs, ys = v.curve()
        if xs:
            ax.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, label=v.name)
    ax.set(xlabel="training tokens (millions)", ylabel="validation loss",
           title="Validation loss (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=120)
    plt.close(fig)

    for filename, key, label in ((PLOTS[1], "peak_memory_bytes", "peak memory (MB)"),
                                 (PLOTS[2], "params_total", "parameters (millions)")):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for v in variants.values():
            x, y = v.mean(key), v.mean("val_ppl")
            if x is None or y is None:
                continue
            ax.errorbar(x / 1e6, y, yerr=v.std("val_ppl") or 0, fmt="o", capsize=3)
            ax.annotate(v.name, (x / 1e6, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set(xlabel=label, ylabel="validation perplexity",
               title=f"Perplexity against {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)
