"""Model health: activation kurtosis per layer, the weight spectra, the output's nuclear norm.

- Excess kurtosis of each block's output (the residual stream), E[(x - mean)^4] / var^2 - 3 over
  all its elements: 0 for a Gaussian, large when a few outlier features dominate (the quantity
  outlier-safe pretraining drives down).
- The singular values of every learned weight and, for SLTrain layers, of its low-rank part
  s·B·A and its sparse part S apart, with each part's share of the weight's energy ||.||_F^2:
  the SLTrain paper's motivating figure (a low-rank head plus a flat sparse tail).
- The nuclear norm of the batch's output distribution, ||softmax(logits)||_* / N over the N
  predicted tokens (the "matrix nuclear-norm" measure: high when predictions are both confident
  and diverse across tokens, low when the model predicts the same distribution everywhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sltrain.parametrize.base import FactoredLinear


def excess_kurtosis(x: torch.Tensor) -> float:
    x = x.detach().double().flatten()
    centred = x - x.mean()
    var = centred.pow(2).mean()
    return (centred.pow(4).mean() / var.pow(2) - 3.0).item() if var > 0 else 0.0


@torch.no_grad()
def activation_kurtosis(model: nn.Module, x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Excess kurtosis of each block's output on the batch `x`, and the logits."""
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda m, i, o: outputs.append(o))
               for block in model.layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return [excess_kurtosis(o) for o in outputs], logits


@torch.no_grad()
def output_nuclear_norm(logits: torch.Tensor) -> float:
    """||P||_* / N for the (N, V) matrix P of predicted distributions."""
    probs = torch.softmax(logits.detach().double().flatten(0, -2), dim=-1)
    return (torch.linalg.svdvals(probs).sum() / probs.shape[0]).item()


def _svdvals(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double().cpu())


def _energy(w: torch.Tensor) -> float:
    return w.double().pow(2).sum().item()


def layer_spectra(m: FactoredLinear) -> dict[str, Any]:
    """Singular values of each of the layer's `spectra_parts()` and, for each part beside the
    weight, its share of the weight's energy ||.||_F^2 as "<part>_share"."""
    parts = m.spectra_parts()
    energy = _energy(parts["weight"])
    out: dict[str, Any] = {}
    for key, w in parts.items():
        values = _svdvals(w)
        if key == "low_rank" and hasattr(m, "rank"):
            values = values[: m.rank]  # B·A has at most `rank` non-zero singular values
        out[key] = values.tolist()
    for key, w in parts.items():
        if key != "weight":
            out[f"{key}_share"] = _energy(w) / energy if energy else float("nan")
    return out


@torch.no_grad()
def weight_spectra(model: nn.Module) -> dict[str, dict[str, Any]]:
    """For every attention/MLP weight: singular values of W, and for layers made of parts
    (SLTrain: low rank plus sparse) those of each part with its energy share."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FactoredLinear):
            out[name] = layer_spectra(m)
        elif isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            out[name] = {"weight": _svdvals(m.weight).tolist()}
    return out


def health_record(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The per-step metrics (cheap: one forward, no SVD of weights)."""
    was_training = model.training
    model.eval()
    kurt, logits = activation_kurtosis(model, x)
    model.train(was_training)
    return {"kurtosis": kurt, "kurtosis_max": max(kurt),
            "output_nuclear_norm": output_nuclear_norm(logits)}


def plot_spectra(spectra: dict[str, dict[str, Any]], out: Path, layers: list[str] | None = None,
                 title: str = "") -> Path:
    """One panel per layer: singular values of W, s·B·A and S (log scale), shares in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = layers or list(spectra)[:4]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        s = spectra[name]
        for key, style in (("weight", "-"), ("low_rank", "--"), ("sparse", ":")):
            if key in s:
                label = {"weight": "W", "low_rank": "s·B·A", "sparse": "S"}[key]
                if key != "weight":
                    label += f" ({s[key + '_share']:.0%} of ||W||²)"
                values = [v for v in s[key] if v > 1e-12]
                ax.semilogy(range(1, len(values) + 1), values, style, label=label)
        ax.set_title(name.removeprefix("layers."), fontsize=9)
        ax.set_xlabel("index")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("singular value")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
