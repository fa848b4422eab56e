"""Dynamic loss-based sample reweighting of "Dynamic Loss-Based Sample Reweighting for Improved
Large Language Model Pretraining" (Sow et al., ICLR 2025).

Each training micro-batch, every sample (block) i has its mean token loss l_i. Over the batch (the
global batch under torchrun: every rank's losses are gathered) the losses are mapped linearly onto
[-delta, delta],

    l~ = 2 delta l / (max - min) - delta (max + min) / (max - min),

a strategy scores them,

    uniform    f = 0                        (every weight equal: plain training)
    linupper   f = min(l~ + delta, delta)   (down-weights low-loss samples; the paper's pick)
    quadratic  f = 1 - l~^2 / delta^2       (down-weights both extremes)
    extremes   f = |l~|                     (up-weights both extremes)

and the weights are w = softmax(f / temperature) (a larger temperature is more uniform). The
objective is sum_i w_i l_i with w detached, so its gradient is sum_i w_i grad l_i. During the first
`warmup_steps` update steps the weights are uniform: the losses of a barely trained model say
little about the samples. With uniform weights and equal token counts the objective equals the
plain token-mean loss.
"""

from __future__ import annotations

import math

import torch

from sltrain.train.distributed import World

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")
_SPAN_EPS = 1e-6  # max - min of a batch whose losses are (nearly) all equal


def normalise(losses: torch.Tensor, delta: float) -> torch.Tensor:
    """The losses mapped linearly onto [-delta, delta] (min -> -delta, max -> delta)."""
    lo, hi = losses.min(), losses.max()
    span = (hi - lo).clamp_min(_SPAN_EPS)
    return 2 * delta * losses / span - delta * (hi + lo) / span


def scores(strategy: str, losses: torch.Tensor, delta: float) -> torch.Tensor:
    """f(l~) of each sample for `strategy`."""
    if strategy == "uniform":
        return torch.zeros_like(losses)
    z = normalise(losses, delta)
    if strategy == "linupper":
        return torch.clamp(z + delta, max=delta)
    if strategy == "quadratic":
        return 1 - z.square() / delta**2
    if strategy == "extremes":
        return z.abs()
    raise ValueError(f"unknown reweighting strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")


def sample_weights(losses: torch.Tensor, strategy: str, temperature: float = 1.0,
                   delta: float = 1.0) -> torch.Tensor:
    """softmax(f(l~) / temperature) over the batch (float32, no gradient)."""
    losses = losses.detach().float()
    return torch.softmax(scores(strategy, losses, delta) / temperature, dim=0)


class SampleReweighter:
    """Turns per-sample losses of this rank's slice of the batch into the reweighted objective.

    Under torchrun the data-parallel wrapper averages gradients over ranks, so each rank returns
    world.size * sum_(its samples) w_i l_i: the average is sum_(all samples) w_i grad l_i. The
    statistics of the weights of the micro-batches since `step_metrics` are logged per step.
    """

    def __init__(self, strategy: str, temperature: float = 1.0, delta: float = 1.0,
                 warmup_steps: int = 0, world: World | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown reweighting strategy '{strategy}'; use one of "
                             f"{', '.join(STRATEGIES)}")
        self.strategy, self.temperature, self.delta = strategy, temperature, delta
        self.warmup_steps = warmup_steps
        self.world = world or World()
        self._stats: list[torch.Tensor] = []  # (max_w, entropy) per micro-batch
        self._stats_step = -1  # a skipped (non-finite) step's statistics are dropped

    def weights(self, losses: torch.Tensor, step: int) -> torch.Tensor:
        """The weights of a whole batch's losses at update step `step` (0-based)."""
        if step < self.warmup_steps:
            return torch.full_like(losses, 1.0 / losses.numel(), dtype=torch.float32)
        return sample_weights(losses, self.strategy, self.temperature, self.delta)

    def __call__(self, per_sample: torch.Tensor, step: int) -> torch.Tensor:
        if step != self._stats_step:
            self._stats, self._stats_step = [], step
        local = per_sample.detach().float()
        w = self.weights(self.world.gather(local), step)
        n = w.numel()
        max_w, entropy = torch.stack([w.max(), -(w * torch.log(w.clamp_min(1e-30))).sum()]).double()
        # Kept on the device, read once per step (step_metrics): no host sync per micro-batch.
        self._stats.append(torch.stack([max_w * n, entropy / math.log(n) if n > 1 else
                                        torch.ones_like(entropy)]))
        start = self.world.rank * local.numel()
        mine = w[start : start + local.numel()].to(per_sample.dtype)
        return self.world.size * (mine * per_sample).sum()

    def step_metrics(self) -> dict[str, float]:
        """reweight_max_w: the largest weight times the batch size (1 = uniform);
        reweight_entropy: the weights' entropy / log(batch size) (1 = uniform). Means over the
        step's micro-batches (the same on every rank)."""
        if not self._stats:
            return {}
        max_w, ent = torch.stack(self._stats).mean(0).tolist()
        self._stats.clear()
        return {"reweight_max_w": max_w, "reweight_entropy": ent}
