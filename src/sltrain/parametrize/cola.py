"""The CoLA layer: y = B σ(A x), a rank-r bottleneck with a non-linearity between the factors.

Implements CoLA and CoLA-M of "CoLA: Compute-Efficient Pre-Training of LLMs via Low-Rank
Activation" (Liu et al., EMNLP 2025, arXiv 2502.10940).

What we took from where (the authors' code, github.com/alvin-zyl/CoLA, read at commit 91ff0d1):
- σ is SiLU: `ColaLayer` applies `ACT2FN[config.hidden_act]` and every cola_configs/*.json sets
  hidden_act "silu" (cola/cola_layer.py, cola/modeling_cola.py).
- Initialisation: A and B i.i.d. normal with std (r (in + out))^(-1/4) each, so that the entries
  of B A have std 1/sqrt(in + out) (`ColaLayer.__init__`). No bias (the LLaMA configs have none).
- Layers: all seven linears of every block, q, k, v, o, gate, up and down (`ColaAttention`,
  `ColaMLP`); embeddings and lm_head stay dense, and the MLP keeps its own SiLU gate
  (only_lr_act false). These are our default `method.targets`.
- Rank r = d/4: 128 (60M), 256 (130M, 350M), 512 (1B), 1024 (7B) in cola_configs/*.json, which
  are our presets' ranks, so `--rank` defaults to the preset's as for the other methods.
- Learning rate (scripts/cola_scripts/*.sh): AdamW at 6e-3 (60M), 3e-3 (130M, 350M), 2e-3 (1B),
  1e-3 (7B), weight decay 0.01, gradient clipping 0.5, 10% warm-up, bfloat16. We keep the run's
  own defaults: pass `--lr`.
Our choice, not the paper's: CoLA-M. The paper checkpoints whole decoder blocks so that only the
r-wide activations σ(A x) (and the residual stream) are kept and everything full-width is
recomputed (`ColaMDecoderLayer` in cola/modeling_colam.py). That is a change of the block, which
a parameterisation does not own; our `cola_m` recomputes inside each layer instead: it keeps only
the input x for backward and recomputes h = A x and σ(h) there, so the 2 r values per token and
layer that plain CoLA keeps (h for σ', σ(h) for B's gradient) are not stored, for 2 r in + 4 r
more FLOPs per token in backward. Same function and gradients as `cola` (tests/test_cola.py).

No dense form: x ↦ B σ(A x) is not x W^T for any W, so the layer is not `mergeable`: export,
densify, soups, convert, --init-from into a dense run and the weight spectra refuse it in one line.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sltrain.errors import UserError
from sltrain.parametrize.base import FactoredLinear, RankOptions, autocast_off
from sltrain.registry import METHODS

# FLOPs per element of SiLU: forward h s with s = 1 / (1 + exp(-h)) is exp, add, divide and
# multiply (4); backward g s (1 + h (1 - s)) computes s again (3) and five more (8).
SILU_FLOPS, SILU_BACKWARD_FLOPS = 4, 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _RecomputedBottleneck(torch.autograd.Function):
    """y = B σ(A x) keeping only x, A and B for backward: h = A x and σ(h) are recomputed there."""

    @staticmethod
    def forward(ctx, x, A, B, dtype):  # type: ignore[override]
        x = x.to(dtype)
        ctx.save_for_backward(x, A, B)
        return F.linear(F.silu(F.linear(x, A.to(dtype))), B.to(dtype))

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):  # type: ignore[override]
        x, A, B = ctx.saved_tensors
        a, b = A.to(grad_out.dtype), B.to(grad_out.dtype)
        h = F.linear(x, a)
        grad_h = torch.ops.aten.silu_backward(grad_out @ b, h)
        grad_B = _rows(grad_out).t() @ _rows(F.silu(h)) if ctx.needs_input_grad[2] else None
        grad_A = _rows(grad_h).t() @ _rows(x) if ctx.needs_input_grad[1] else None
        grad_x = grad_h @ a if ctx.needs_input_grad[0] else None
        return (grad_x, None if grad_A is None else grad_A.to(A.dtype),
                None if grad_B is None else grad_B.to(B.dtype), None)


class CoLALinear(FactoredLinear):
    """A bias-free layer computing B σ(A x), σ = SiLU (A: rank x in, B: out x rank).

    Its forward is not linear in x, so it has no dense weight (`mergeable` is False); neither can
    the factors be re-split (B σ(A x) changes when A and B do) nor pruned entry by entry.
    """

    mergeable = False
    method: ClassVar[str] = "cola"
    # Recompute the low-rank activation in backward instead of keeping it (CoLA-M).
    recompute: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.A.is_meta:
            self.init_weights(0.0)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """The authors' init, in place (`std` is unused): both factors N(0, (r (in + out))^(-1/2)),
        so B A has std 1/sqrt(in + out)."""
        factor_std = (self.rank * (self.in_features + self.out_features)) ** -0.25
        self.A.normal_(0.0, factor_std, generator=generator)
        self.B.normal_(0.0, factor_std, generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **_: object) -> CoLALinear:
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recompute:
            return F.linear(F.silu(F.linear(x, self.A)), self.B)
        device = x.device.type
        dtype = _compute_dtype(x)
        with torch.autocast(device, enabled=False):
            return _RecomputedBottleneck.apply(x, self.A, self.B, dtype)

    def no_dense_form(self) -> str:
        return (f"method {self.method} has a non-linearity between its factors (y = B·σ(A·x)) "
                "and has no dense form; export, densify, soup, convert, --init-from into a dense "
                "run and weight spectra need one: use the run as it is (sltrain eval RUN)")

    def dense_weight(self) -> torch.Tensor:
        raise UserError(self.no_dense_form())

    def spectra_parts(self) -> dict[str, torch.Tensor]:
        raise UserError(self.no_dense_form())

    # ---- compute ---------------------------------------------------------------------------------
    def flops_per_token(self, tokens_per_batch: int) -> float:
        """2 r (in + out) for the two matmuls, plus σ on the r activations."""
        return 2.0 * self.rank * (self.in_features + self.out_features) + SILU_FLOPS * self.rank

    def backward_flops_per_token(self, tokens_per_batch: int) -> float:
        """Gradients of x, A, h and B: 4 r (in + out), plus σ' on r values; CoLA-M recomputes
        h = A x and σ(h) first (2 r in + σ)."""
        flops = 4.0 * self.rank * (self.in_features + self.out_features) + SILU_BACKWARD_FLOPS * self.rank
        if self.recompute:
            flops += 2.0 * self.rank * self.in_features + SILU_FLOPS * self.rank
        return flops

    def saved_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """A x and σ(A x) (rank values a token each) and, under autocast, the bf16 copies of A
        and B; CoLA-M keeps only its input."""
        if self.recompute:
            return 0
        copies = 2 * self.rank * (self.in_features + self.out_features) if autocast else 0
        return 2 * tokens * self.rank * compute_size + copies

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, σ=silu"
                + (", recompute" if self.recompute else ""))


class CoLAMLinear(CoLALinear):
    """CoLA-M: the CoLA layer keeping only its input for backward (σ(A x) recomputed there)."""

    method = "cola_m"
    recompute = True


METHODS.register("cola", CoLALinear, options=RankOptions,
                 doc="CoLA: y = B·σ(A·x), SiLU between the factors (no dense form to export)")
METHODS.register("cola_m", CoLAMLinear, options=RankOptions,
                 doc="CoLA-M: CoLA recomputing σ(A·x) in backward instead of keeping it")
