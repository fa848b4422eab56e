"""Scaling-law fits: L(N, D) = E + A / N^alpha + B / D^beta over a set of finished runs.

Implements Approach 3 of "Training Compute-Optimal Large Language Models" (Hoffmann et al., 2022):
with e = log E, a = log A, b = log B, minimise the Huber loss (delta 1e-3) of
logsumexp(a - alpha log N, b - beta log D, e) - log L with L-BFGS from a grid of initialisations,
keep the best, and bootstrap the runs for intervals.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

from sltrain.errors import UserError
from sltrain.files import read_json, writable_file

HUBER_DELTA = 1e-3
N_FREE = 5  # E, A, alpha, B, beta
# The initialisation grid of the paper: alpha, beta in 0..2, e in -1..1, a, b in 0..25.
GRID = {
    "e": np.linspace(-1.0, 1.0, 5),
    "a": np.arange(0.0, 26.0, 5.0),
    "alpha": np.linspace(0.0, 2.0, 5),
    "b": np.arange(0.0, 26.0, 5.0),
    "beta": np.linspace(0.0, 2.0, 5),
}
STARTS = 16  # L-BFGS runs from the grid points of lowest objective


@dataclass
class ScalingFit:
    """The fitted law; `E`, `A`, `B` are exp of the fitted logs."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    objective: float = 0.0
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def coefficients(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}

    @property
    def theta(self) -> np.ndarray:
        """(e, a, alpha, b, beta), the fitted vector."""
        return np.array([np.log(self.E), np.log(self.A), self.alpha, np.log(self.B), self.beta])

    def to_dict(self) -> dict[str, Any]:
        return {**self.coefficients, "objective": self.objective,
                "intervals": {k: list(v) for k, v in self.intervals.items()}}


def predict(fit: ScalingFit, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return fit.E + fit.A / N**fit.alpha + fit.B / D**fit.beta


def _terms(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    """(k, 3, n) log-terms a - alpha log N, b - beta log D, e for k parameter vectors
    theta = (e, a, alpha, b, beta)."""
    e, a, alpha, b, beta = (theta[:, i, None] for i in range(5))
    return np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(e), len(logN)))], 1)


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log residuals, and its gradient in theta."""
    t = _terms(theta[None], logN, logD)[0]
    w = np.exp(t - t.max(0))
    total = w.sum(0)
    r = t.max(0) + np.log(total) - logL  # logsumexp, without scipy's per-call overhead
    w /= total  # softmax weights: d logsumexp / d term
    dr = np.clip(r, -delta, delta)  # huber'(r)
    grad = np.array([
        dr @ w[2],
        dr @ w[0],
        -(dr * w[0]) @ logN,
        dr @ w[1],
        -(dr * w[1]) @ logD,
    ])
    return float(huber(delta, r).sum()), grad


def fit(N: np.ndarray, D: np.ndarray, L: np.ndarray, delta: float = HUBER_DELTA,
        starts: int = STARTS, init: ScalingFit | None = None) -> ScalingFit:
    """Fit the law to losses `L` of runs with `N` parameters trained on `D` tokens, from the
    `starts` best points of the initialisation grid (and from `init` if given)."""
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    if len(L) < N_FREE:
        raise UserError(f"{len(L)} runs cannot fix the law's {N_FREE} free parameters; pass at "
                        f"least {N_FREE} runs (several N and D)")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise UserError("a run has a non-positive parameter count, token count or loss; drop it")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    inits = []
    if starts:
        grid = np.array(list(itertools.product(*GRID.values())))
        # The whole grid is scored at once; L-BFGS starts only from its best points.
        r = logsumexp(_terms(grid, logN, logD), axis=1) - logL
        inits = list(grid[np.argsort(huber(delta, r).sum(1))[:starts]])
    if init is not None:
        inits.insert(0, init.theta)
    best = None
    for theta0 in inits:
        res = minimize(_objective, theta0, args=(logN, logD, logL, delta), jac=True,
                       method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10})
        if best is None or res.fun < best.fun:
            best = res
    e, a, alpha, b, beta = best.x
    with np.errstate(over="ignore"):  # a degenerate (bootstrap) fit may run a log-coefficient off
        E, A, B = np.exp([e, a, b])
    return ScalingFit(E=float(E), A=float(A), alpha=float(alpha), B=float(B), beta=float(beta),
                      objective=float(best.fun))


def bootstrap(N: np.ndarray, D: np.ndarray, L: np.ndarray, samples: int = 200,
              level: float = 0.95, seed: int = 0, delta: float = HUBER_DELTA,
              full: ScalingFit | None = None) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each coefficient over fits to runs resampled with replacement.

    Each refit starts from the fit to all runs (`full`, fitted here if not given) rather than from
    the grid: a resample's optimum lies near it, and 200 grid searches would take minutes.
    """
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    full = full or fit(N, D, L, delta)
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(samples):
        idx = rng.integers(0, len(L), len(L))
        fits.append(fit(N[idx], D[idx], L[idx], delta, starts=0, init=full).coefficients)
    tail = 100 * (1 - level) / 2
    return {k: (float(np.percentile([f[k] for f in fits], tail)),
                float(np.percentile([f[k] for f in fits], 100 - tail)))
            for k in fits[0]}


def read_runs(run_dirs: list[Path], params: str = "avg") -> tuple[list[dict[str, Any]], list[str]]:
    """(N, D, L, run) of each run folder's summary.json, and notes about fallbacks taken."""
    if params not in ("avg", "final"):
        raise UserError(f"--params {params} is unknown; choose avg or final")
    key = f"params_{params}"
    runs, fallback = [], []
    for d in run_dirs:
        path = d / "summary.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass folders of finished `sltrain train` runs")
        s = read_json(path, "rerun that run or drop it")
        missing = [k for k in ("val_loss", "tokens_seen") if k not in s]
        if missing:
            raise UserError(f"{path} has no {missing[0]}; pass folders of finished runs")
        if key in s:
            n = s[key]
        elif "trainable" in s.get("params", {}):
            n = s["params"]["trainable"]
            fallback.append(d.name)
        else:
            raise UserError(f"{path} has neither {key} nor params.trainable; rerun that run")
        try:
            runs.append({"run": str(d), "N": float(n), "D": float(s["tokens_seen"]),
                         "L": float(s["val_loss"])})
        except (TypeError, ValueError) as e:
            raise UserError(f"{path} is damaged ({e}); rerun that run or drop it") from None
    notes = []
    if fallback:
        notes.append(f"{len(fallback)} of {len(runs)} runs have no {key} in summary.json "
                     f"({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''}); "
                     "their N is params.trainable")
    return runs, notes


def plot(fit: ScalingFit, N: np.ndarray, D: np.ndarray, L: np.ndarray, out: Path,
         title: str = "") -> Path:
    """Observed loss against D, one colour per N, with the fitted law's curve at each N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    writable_file(out, "--plot")
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.geomspace(D.min() / 1.5, D.max() * 1.5, 200)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(np.unique(N))))
    for colour, n in zip(colours, np.unique(N), strict=True):
        at = N == n
        ax.scatter(D[at], L[at], color=colour, label=f"N = {n:.3g}", zorder=3)
        ax.plot(grid, predict(fit, n, grid), color=colour, alpha=0.8)
    ax.axhline(fit.E, color="grey", linestyle=":", label=f"E = {fit.E:.3f}")
    ax.set(xscale="log", xlabel="tokens D", ylabel="validation loss",
           title=title or (f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3g} "
                           f"+ {fit.B:.3g}/D^{fit.beta:.3g}"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def fit_runs(run_dirs: list[Path], params: str = "avg", samples: int = 200,
             at: tuple[float, float] | None = None, plot_to: Path | None = None,
             json_to: Path | None = None) -> dict[str, Any]:
    """`sltrain scaling fit`: fit the law to the runs' summaries, with `samples` bootstrap
    intervals, each run's residual, the loss predicted at (N, D) = `at`, and optionally a plot
    and the report as JSON. Returns the report (plus the paths written as `plot` and `json`)."""
    for path, flag in ((plot_to, "--plot"), (json_to, "--json")):
        if path:  # refused before the fit, and nothing made yet
            writable_file(path, flag, create=False)
    runs, notes = read_runs(run_dirs, params)
    N, D, L = (np.array([r[k] for r in runs]) for k in "NDL")
    law = fit(N, D, L)
    if samples:
        law.intervals = bootstrap(N, D, L, samples, full=law)
    residuals = [{**r, "predicted": float(p), "residual": float(np.log(r["L"] / p))}
                 for r, p in zip(runs, predict(law, N, D), strict=True)]
    report: dict[str, Any] = {"law": "E + A/N^alpha + B/D^beta", "params": params,
                              "fit": law.to_dict(), "runs": residuals, "notes": notes}
    if at:
        loss = float(predict(law, *at))
        report["prediction"] = {"N": at[0], "D": at[1], "loss": loss, "ppl": float(np.exp(loss))}
    written = {}
    if plot_to:
        written["plot"] = str(plot(law, N, D, L, plot_to))
    if json_to:
        writable_file(json_to, "--json").write_text(json.dumps(report, indent=2))
        written["json"] = str(json_to)
    return {**report, **written}
