"""Training objectives for next-token prediction, picked by name from the `[loss]` section.

`cross_entropy` (the default); `z_loss`, the spherical-family loss of "The Z-loss: a shift and
scale invariant classification loss belonging to the Spherical Family" (de Brebisson & Vincent,
2016); `logit_z_reg`, cross-entropy plus the log-partition penalty coef * logsumexp(logits)^2 of
PaLM. Every loss takes (batch, seq, vocab) logits and (batch, seq) targets, skips targets equal to
`ignore_index` in numerator and denominator, and reduces by "mean", "sum", "none" (per token,
flat) or "sample" (each sequence's mean over its kept tokens: shape (batch,), the input of sample
reweighting, `reweight.py`).

A loss registered with `per_token=True` is a function of each logits row alone (its "none"
reduction is the per-token loss), so it also runs chunked from the final hidden states
(`head_loss`): the (tokens, vocab) float32 logits are formed `chunk_tokens` rows at a time in the
forward and again in the backward, never all at once (the memory trick of Liger-Kernel's fused
linear cross-entropy and of Cut Cross-Entropy, Wijmans et al., 2024, in plain torch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from sltrain.registry import LOSSES, Options

if TYPE_CHECKING:
    from sltrain.config import RunConfig
    from sltrain.train.distributed import World
    from sltrain.train.reweight import SampleReweighter

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none", "sample")
# Keeps the z-scores finite on a row whose logits are all equal (std 0); far below any real
# variance, so the invariances hold to float32 precision.
_VAR_EPS = 1e-12


def _flat(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.float().flatten(0, -2), targets.flatten()


def _reduce(per_token: torch.Tensor, keep: torch.Tensor, reduction: str,
            batch: int = 1) -> torch.Tensor:
    """Per-token losses (already zero where `keep` is False) reduced the way F.cross_entropy does:
    "mean" divides by the number of kept tokens; "sample" does so within each of the `batch`
    sequences (a sequence with no kept token gets 0)."""
    if reduction == "sample":
        kept = keep.view(batch, -1).sum(1).clamp_min(1)
        return per_token.view(batch, -1).sum(1) / kept
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / keep.sum()
    raise ValueError(f"unknown reduction '{reduction}'; use one of {', '.join(REDUCTIONS)}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", *,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy on float32 logits (the model's negative log-likelihood)."""
    o, t = _flat(logits, targets)
    if reduction == "sample":
        per_token = F.cross_entropy(o, t, ignore_index=ignore_index, reduction="none")
        return _reduce(per_token, t != ignore_index, reduction, targets.shape[0])
    return F.cross_entropy(o, t, ignore_index=ignore_index, reduction=reduction)


def z_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", *,
           a: float = 0.1, b: float = 10.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(1/a) * softplus(a * (b - z_target)), with z = (o - mean(o)) / std(o) over the vocabulary.

    Only the target's z-score is needed, so the cost is the row's mean and variance (population
    variance, 1/V) plus one gather. Unchanged when a row is shifted by a constant or scaled by a
    positive constant. `b` is how many standard deviations above the row mean the target's logit
    is pushed; `a` sets how sharply the loss saturates once it is there.
    """
    o, t = _flat(logits, targets)
    keep = t != ignore_index
    var, mean = torch.var_mean(o, dim=-1, correction=0)
    o_target = o.gather(1, torch.where(keep, t, 0).unsqueeze(1)).squeeze(1)
    z_target = (o_target - mean) / torch.sqrt(var + _VAR_EPS)
    per_token = torch.where(keep, F.softplus(a * (b - z_target)) / a, 0.0)
    return _reduce(per_token, keep, reduction, targets.shape[0])


def logit_z_reg(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", *,
                coef: float = 1e-4, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy + coef * logsumexp(o)^2: keeps the softmax normaliser near 1 (log Z near 0)."""
    o, t = _flat(logits, targets)
    keep = t != ignore_index
    ce = F.cross_entropy(o, t, ignore_index=ignore_index, reduction="none")
    penalty = torch.where(keep, torch.logsumexp(o, dim=-1).square(), 0.0)
    return _reduce(ce + coef * penalty, keep, reduction, targets.shape[0])


class ZLossOptions(Options):
    # (1/a) softplus(a (b - z_target)) on standardised logits: a > 0 sets how sharply it
    # saturates, b how many standard deviations above the row mean the target is pushed.
    z_loss_a: float = Field(0.1, gt=0, allow_inf_nan=False, description="z-loss sharpness a")
    z_loss_b: float = Field(10.0, allow_inf_nan=False, description="z-loss target margin b (in std)")


class LogitZOptions(Options):
    logit_z_coef: float = Field(1e-4, gt=0, allow_inf_nan=False,
                                description="coefficient of the logsumexp(logits)^2 penalty")


# `kwargs` maps a config option to the keyword of the loss function; `per_token` says each
# token's loss depends on its own logits row only, so `head_loss` may compute it chunk by chunk.
LOSSES.register("cross_entropy", cross_entropy, per_token=True,
                doc="token-mean cross-entropy (default)")
LOSSES.register("z_loss", z_loss, options=ZLossOptions, kwargs={"z_loss_a": "a", "z_loss_b": "b"},
                per_token=True,
                doc="Z-loss on standardised logits (a softplus margin on the target's z-score)")
LOSSES.register("logit_z_reg", logit_z_reg, options=LogitZOptions, kwargs={"logit_z_coef": "coef"},
                per_token=True, doc="cross-entropy + coef * logsumexp(logits)^2")


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 logits of `hidden` rows through the head `weight`, the matmul done in `dtype` (what
    `lm_head` computes under autocast, then `.float()` as the losses do)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.to(dtype), weight.to(dtype)).float()


class _Rows:
    """A per-token loss of logits rows and its gradient with respect to them, by autograd."""

    def __init__(self, per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss = per_token

    def grad(self, logits: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits.requires_grad_()
            return torch.autograd.grad(self.loss(logits, targets), logits, g)[0]


class _CrossEntropyRows(_Rows):
    """Cross-entropy rows with the closed-form gradient g * (softmax - onehot): no second pass
    of the loss under autograd."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="none")

    def grad(self, logits: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        keep = targets != self.ignore_index
        p = torch.softmax(logits, dim=-1)
        p.scatter_add_(1, torch.where(keep, targets, 0).unsqueeze(1), -keep.unsqueeze(1).to(p.dtype))
        return p.mul_(torch.where(keep, g, 0.0).unsqueeze(1))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Per-token losses of logits = hidden @ weight^T, `chunk` rows of logits at a time.

    Saves only hidden, weight and targets. The backward forms each chunk's logits again, asks the
    rows for d(loss)/d(logits) and turns that into the chunk's share of grad_hidden and
    grad_weight (the latter summed in float32).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, chunk):  # type: ignore[override]
        device = hidden.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(hidden.dtype, weight.dtype))
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        with torch.autocast(device, enabled=False):  # the loss itself in float32, as unfused
            for s in range(0, hidden.shape[0], chunk):
                out[s:s + chunk] = rows.loss(_head_logits(hidden[s:s + chunk], weight, dtype),
                                             targets[s:s + chunk])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.rows, ctx.chunk, ctx.dtype = rows, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
                  if ctx.needs_input_grad[1] else None)
        w = weight.to(dtype)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(dtype)
            g = ctx.rows.grad(_head_logits(h, w, dtype), targets[s:s + chunk],
                              grad_out[s:s + chunk]).to(dtype)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ w
            if grad_w is not None and dtype == torch.float32:
                grad_w.addmm_(g.t(), h)
            elif grad_w is not None:  # the chunk's product in the compute dtype, summed in float32
                grad_w.add_(g.t() @ h)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None)


def _rows(fn: Callable[..., torch.Tensor], logits: torch.Tensor, targets: torch.Tensor,
          **options: Any) -> torch.Tensor:
    """`fn`'s per-token losses of (tokens, vocab) logits rows, as a flat (tokens,) tensor."""
    return fn(logits.unsqueeze(0), targets.unsqueeze(0), "none", **options)


def head_loss(fn: Callable[..., torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor,
              targets: torch.Tensor, reduction: str = "mean", chunk_tokens: int = 1024,
              **options: Any) -> torch.Tensor:
    """`fn(hidden @ weight^T, targets, reduction, **options)` for a per-token loss `fn`, without
    the full logits: (batch, seq, dim) hidden states, the (vocab, dim) head weight and (batch, seq)
    targets; `chunk_tokens` logits rows live at a time."""
    t = targets.flatten()
    ignore_index = options.get("ignore_index", IGNORE_INDEX)
    plain_ce = fn is cross_entropy and set(options) <= {"ignore_index"}
    rows = _CrossEntropyRows(ignore_index) if plain_ce else _Rows(partial(_rows, fn, **options))
    per_token = _ChunkedHeadLoss.apply(hidden.flatten(0, -2), weight, t, rows, chunk_tokens)
    return _reduce(per_token, t != ignore_index, reduction, targets.shape[0])


def loss_options(cfg: RunConfig) -> dict[str, Any]:
    """The hyperparameters of the configured loss, as keyword arguments of its function."""
    names = LOSSES[cfg.loss.name].info.get("kwargs", {})
    return {names.get(k, k): v for k, v in dict(cfg.loss.options()).items()}


class TrainingLoss:
    """The objective the loop minimises, chosen once from the config.

    When it is not cross-entropy it also keeps the plain cross-entropy of the last `grad_accum`
    calls (one update step's micro-batches), so each step can log `ce` beside `loss` and runs with
    different objectives stay comparable.

    With a `reweighter` the "mean" objective is the weighted sum of the per-sample losses (weights
    from the loss values, `reweight.py`) at update step `self.step`, which the loop sets; `ce` is
    then the plain token-mean cross-entropy.
    """

    def __init__(self, name: str, grad_accum: int = 1,
                 reweighter: SampleReweighter | None = None, chunk_tokens: int = 0,
                 compile: bool = False, **options: Any) -> None:
        self.name = name
        self.options = options
        self.reweighter = reweighter
        self.chunk_tokens = chunk_tokens
        self.step = 0
        self._fn = LOSSES[name].obj
        if compile and not self.chunked:  # `train.compile`: the loss on whole logits, compiled
            from sltrain.train.compile import compile_loss

            self._fn = compile_loss(self._fn)
        self._ce: deque[torch.Tensor] = deque(maxlen=grad_accum)  # on the device: read per step

    @property
    def _logs_ce(self) -> bool:
        return self.name != "cross_entropy" or self.reweighter is not None

    @property
    def chunked(self) -> bool:
        """Whether `from_hidden` applies: chunking is on and the loss is per-token."""
        return self.chunk_tokens > 0 and bool(LOSSES[self.name].info.get("per_token"))

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        loss = self._objective(lambda r: self._fn(logits, targets, r, **self.options), reduction)
        if self._logs_ce:
            with torch.no_grad():
                self._ce.append(cross_entropy(logits.detach(), targets).detach())
        return loss

    def from_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
        """The same loss of logits = hidden @ weight^T (the final hidden states through the
        lm_head weight), computed `chunk_tokens` rows at a time (`head_loss`)."""
        def of(fn: Callable[..., torch.Tensor], r: str, **options: Any) -> torch.Tensor:
            return head_loss(fn, hidden, weight, targets, r, self.chunk_tokens, **options)

        loss = self._objective(lambda r: of(self._fn, r, **self.options), reduction)
        if self._logs_ce:
            with torch.no_grad():
                self._ce.append(of(cross_entropy, "mean").detach())
        return loss

    def _objective(self, loss_of: Callable[[str], torch.Tensor], reduction: str) -> torch.Tensor:
        """`loss_of(reduction)`, or under reweighting the weighted per-sample losses."""
        if self.reweighter is not None and reduction == "mean":
            return self.reweighter(loss_of("sample"), self.step)
        return loss_of(reduction)

    def step_metrics(self, mean: Callable[[float], float] = lambda v: v) -> dict[str, float]:
        """{"ce": mean cross-entropy of the step's micro-batches} ({} for unweighted
        cross-entropy itself) and the reweighting statistics; `mean` averages over ranks
        (World.mean)."""
        out = {}
        if self._logs_ce:
            ce = torch.stack(list(self._ce)).double().sum().item() if self._ce else 0.0
            out["ce"] = mean(ce / max(1, len(self._ce)))
        if self.reweighter is not None:
            out.update(self.reweighter.step_metrics())
        return out


def build_loss(cfg: RunConfig, world: World | None = None) -> TrainingLoss:
    lc = cfg.loss
    reweighter = None
    if lc.reweight != "none":
        from sltrain.train.reweight import SampleReweighter

        reweighter = SampleReweighter(lc.reweight, lc.reweight_temperature, lc.reweight_delta,
                                      lc.reweight_warmup_steps, world)
    return TrainingLoss(lc.name, cfg.train.grad_accum, reweighter, lc.chunk_tokens,
                        cfg.train.compile, **loss_options(cfg))
