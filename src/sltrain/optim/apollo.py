"""APOLLO and APOLLO-Mini: the gradient scaled per channel (or tensor) by Adam in a random projection.

"APOLLO: SGD-like Memory, AdamW-level Performance" (Zhu et al., MLSys 2025).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.optim import projector
from sltrain.optim.base import SltrainOptimizer, adam_direction, adam_step_size, apply_update_
from sltrain.optim.fira import GROWTH_LIMIT
from sltrain.optim.galore import check_rank
from sltrain.optim.projector import SubspaceOptions
from sltrain.registry import OPTIMIZERS, Options

MINI_RANK, MINI_SCALE, APOLLO_SCALE = 1, 128.0, 1.0  # the paper's settings of the two variants
SEED_ADVANCE = 0xF  # apollo-torch's next_seed: the 15th draw of a generator seeded with the seed


def next_seed(seed: int) -> int:
    """The seed of the next random projection after one drawn from `seed` (apollo-torch's rule)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (SEED_ADVANCE,), generator=generator).tolist()[-1]


def random_basis(seed: int, shape: torch.Size, rank: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The projection of an (m, n) gradient: r x n (right, m >= n) or m x r (left), Gaussian with
    variance 1/r, drawn in float32 from a generator seeded with `seed` on `device`."""
    side = shape[1] if projector.is_right(shape) else shape[0]
    size = (rank, side) if projector.is_right(shape) else (side, rank)
    generator = torch.Generator(device=device).manual_seed(seed)
    P = torch.randn(size, generator=generator, device=device, dtype=torch.float32) / math.sqrt(rank)
    return P.to(dtype)


class Apollo(SltrainOptimizer):
    """APOLLO on the "matrix" groups, AdamW elsewhere.

    For an (m, n) gradient G, R = G P^T (or P^T G) with a Gaussian P of rank r, redrawn every
    `update_proj_gap` updates from a seed; Adam runs on R; the ratio ||Adam(R)|| / ||R|| per row
    (right projection) or column ("channel", APOLLO) or over the whole tensor ("tensor",
    APOLLO-Mini) scales G itself, whose norm may then grow at most 1.01x per update (Fira's
    limiter), and the update is sqrt(scale) times that. State per matrix: the two rank-r moments
    and the limiter's last norm; P is never stored, it is redrawn from its seed each update.

    Matches `apollo_torch.APOLLOAdamW` (proj "random", proj_type "std") step for step. Seeds: a
    parameter's first seed is `group["seed"]` plus its index in the group; a group without one
    takes the reference's rule (the 1-based position of its parameters across all groups), and
    the builder gives every matrix its own group and seed, so that the per-layer copies
    (`--per-layer-updates`, one parameter each) draw the same projections as the plain optimizer.
    Deliberate differences, each shown by a test: weight decay acts on the weight before the
    update (decoupled AdamW; the reference decays the updated weight), and a matrix whose smaller
    side is not above r gets plain Adam (the reference would project it to a larger space).
    """

    moment_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 256,
                 update_proj_gap: int = 200, scale: float = APOLLO_SCALE,
                 scale_type: Literal["channel", "tensor"] = "channel", scale_front: bool = False,
                 limiter: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type,
                        scale_front=scale_front, limiter=limiter, kind="other", seed=None)
        super().__init__(params, defaults)
        position = 1
        for group in self.param_groups:
            if group["seed"] is None:
                group["seed"] = position
            position += len(group["params"])

    def _rank(self, p: torch.Tensor, group: dict) -> int | None:
        return projector.subspace_rank(p.shape, group["rank"]) if group["kind"] == "matrix" else None

    def _refresh_seed(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Draw a new projection on updates 0, gap, 2 gap, ... (the reference's schedule)."""
        if "seed" not in state:
            state["seed"] = group["seed"] + next(i for i, q in enumerate(group["params"]) if q is p)
        elif state["step"] % group["update_proj_gap"] == 0:
            state["seed"] = next_seed(state["seed"])

    def _scaling(self, direction: torch.Tensor, low: torch.Tensor, group: dict,
                 right: bool) -> torch.Tensor:
        """||Adam(R)|| / ||R|| per channel (the larger side's rows or columns) or per tensor."""
        if group["scale_type"] == "tensor":
            return torch.norm(direction) / (torch.norm(low) + 1e-8)
        dim = 1 if right else 0
        factor = torch.norm(direction, dim=dim) / (torch.norm(low, dim=dim) + 1e-8)
        return factor.unsqueeze(1) if right else factor

    def _limit(self, update: torch.Tensor, state: dict) -> torch.Tensor:
        """Fira's norm-growth limiter: the update's norm grows at most GROWTH_LIMIT per step."""
        norm = torch.norm(update)
        if "scaled_grad" in state:
            limiter = torch.clamp(norm / (state["scaled_grad"] + 1e-8), min=GROWTH_LIMIT) / GROWTH_LIMIT
            update = update / limiter
            norm = norm / limiter
        state["scaled_grad"] = norm
        return update

    def matrix_update(self, p: torch.Tensor, state: dict, group: dict, rank: int) -> torch.Tensor:
        """The update direction of one matrix, before the bias-corrected step size."""
        grad, right = p.grad, projector.is_right(p.shape)
        state.setdefault("step", 0)
        self._refresh_seed(p, state, group)
        P = random_basis(state["seed"], p.shape, rank, grad.device, grad.dtype)
        low = grad @ P.t() if right else P.t() @ grad
        state["step"] += 1
        beta1, beta2 = group["betas"]
        direction, _ = adam_direction(low, state, beta1, beta2, group["eps"])
        update = grad * self._scaling(direction, low, group, right)
        root_scale = math.sqrt(group["scale"])
        if group["scale_front"]:
            update *= root_scale
        if group["limiter"]:
            update = self._limit(update, state)
        if not group["scale_front"]:
            update *= root_scale
        return update

    def update_(self, p: torch.Tensor, group: dict) -> None:
        rank = self._rank(p, group)
        if rank is None:
            self.adamw_other_(p, group)
            return
        state = self.state[p]
        update = self.matrix_update(p, state, group, rank)
        beta1, beta2 = group["betas"]
        apply_update_(p, update, -adam_step_size(group["lr"], beta1, beta2, state["step"]), group)

    def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
        rank = self._rank(p, group)
        if rank is None:
            return 2 * p.numel() * element_size
        limiter = element_size if group["limiter"] else 0  # the 0-d norm of the last update
        return 2 * rank * max(p.shape) * element_size + limiter


def seeded_groups(groups: list[dict]) -> list[dict]:
    """Every "matrix" parameter in a group of its own, seeded by the reference's rule (its 1-based
    position across all groups), so that a per-layer copy holding it alone keeps its seed."""
    out, position = [], 1
    for group in groups:
        if group["kind"] == "matrix":
            settings = {k: v for k, v in group.items() if k != "params"}
            out += [{**settings, "params": [p], "seed": position + i}
                    for i, p in enumerate(group["params"])]
        else:
            out.append(group)
        position += len(group["params"])
    return out


def _build(model: nn.Module, cfg: OptimizerConfig, rank: int, scale_type: str,
           default_scale: float) -> Apollo:
    from sltrain.optim import param_groups

    groups = seeded_groups(check_rank(param_groups(model, cfg), rank))
    return Apollo(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, rank=rank,
                  update_proj_gap=cfg.update_proj_gap, scale=cfg.apollo_scale or default_scale,
                  scale_type=scale_type, scale_front=cfg.apollo_scale_front)


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> Apollo:
    return _build(model, cfg, rank, "channel", APOLLO_SCALE)


def build_mini(model: nn.Module, cfg: OptimizerConfig, rank: int) -> Apollo:
    return _build(model, cfg, MINI_RANK, "tensor", MINI_SCALE)


class ApolloMiniOptions(Options):
    """Options of APOLLO-Mini (its rank is 1); the projection gap is the subspace optimizers'."""

    update_proj_gap: int = SubspaceOptions.model_fields["update_proj_gap"]
    apollo_scale: float | None = Field(
        None, gt=0, description="APOLLO's scale: the update is sqrt(scale) x the scaled gradient "
        f"(default {APOLLO_SCALE:g} for apollo, {MINI_SCALE:g} for apollo_mini)")
    apollo_scale_front: bool = Field(
        False, description="apply sqrt(scale) before the norm-growth limiter, not after (the "
        "paper's advice for short warm-ups)")


class ApolloOptions(ApolloMiniOptions):
    proj_rank: int | None = SubspaceOptions.model_fields["proj_rank"]


OPTIMIZERS.register("apollo", build, options=ApolloOptions,
                    doc="APOLLO: gradient scaled per channel by Adam in a random rank-r projection")
OPTIMIZERS.register("apollo_mini", build_mini, options=ApolloMiniOptions,
                    doc="APOLLO-Mini: rank-1 random projection, one scaling factor per tensor")
