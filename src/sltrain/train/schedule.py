"""Learning-rate schedules as multipliers of the peak rate, by update step (not micro-batch).

Each schedule is a pure function `f(step, total, warmup, min_lr_ratio, **options) -> multiplier`
registered in `sltrain.registry.SCHEDULES` with the class of its keyword-only options (plus
`tokens_per_step` and `peak_lr`, taken from the run). `step` is the 0-based index of the
coming update. Any schedule re-warms after optimizer-state resets (ReLoRA's jagged cosine).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from sltrain.errors import UserError
from sltrain.registry import SCHEDULES, Options


def cosine(step: int, total: int, warmup: int, min_lr_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` (the SLTrain and GaLore default).

    m = (s+1)/W for s < W; else m = r + (1-r)/2 (1 + cos(pi p)), p = min(1, (s-W)/(T-W)).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_steps(total: int, decay_ratio: float) -> int:
    """Length of the final decay (or annealing) phase: the last `decay_ratio` of the run."""
    return round(decay_ratio * total)


def _progress(step: int, start: int, length: int) -> float:
    return min(1.0, max(0.0, (step - start) / max(1, length)))


DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}


def wsd(step: int, total: int, warmup: int, min_lr_ratio: float, *,
        decay_ratio: float = 0.2, decay_shape: str = "1-sqrt") -> float:
    """Warmup-stable-decay ("MiniCPM: Unveiling the Potential of Small Language Models with
    Scalable Training Strategies"; the 1-sqrt cooldown from "Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations").

    With D = round(decay_ratio T) and S = T - D: m = (s+1)/W for s < W; m = 1 for s < S;
    else m = r + (1-r) g(p), p = (s-S)/D, g = 1-p (linear), (1+cos(pi p))/2 (cosine) or
    1-sqrt(p) (1-sqrt).
    """
    if step < warmup:
        return (step + 1) / warmup
    length = decay_steps(total, decay_ratio)
    start = total - length
    if step < start:
        return 1.0
    return min_lr_ratio + (1 - min_lr_ratio) * DECAY_SHAPES[decay_shape](_progress(step, start, length))


def power(step: int, total: int, warmup: int, min_lr_ratio: float, *, tokens_per_step: int,
          peak_lr: float, power_a: float = 4.0, power_b: float = -0.51, decay_ratio: float = 0.2,
          power_decay: str = "exp") -> float:
    """The Power scheduler ("Power Scheduler: A Batch Size and Token Number Agnostic Learning
    Rate Scheduler"): the rate follows a power law of the tokens seen, capped at the peak.

    P(s) = min(1, a n^b / peak) with n = s * tokens_per_step the tokens seen before update s
    (`power_a` is the paper's batch-size factor times a). m = (s+1)/W P(W) for s < W (warm-up to
    the power-law rate); m = P(s) until S = T - round(decay_ratio T); then the rate decays from
    P(S) to r P(S) over the last D steps: P(S) r^p (exp) or P(S) (r + (1-r)(1-p)) (linear),
    p = (s-S)/D.
    """
    def plain(s: int) -> float:
        tokens = s * tokens_per_step
        return 1.0 if tokens <= 0 else min(1.0, power_a * tokens**power_b / peak_lr)

    if step < warmup:
        return (step + 1) / warmup * plain(warmup)
    length = decay_steps(total, decay_ratio)
    start = max(warmup, total - length)
    if step < start:
        return plain(step)
    p = _progress(step, start, total - start)
    shape = min_lr_ratio**p if power_decay == "exp" else min_lr_ratio + (1 - min_lr_ratio) * (1 - p)
    return plain(start) * shape


def infinite(step: int, total: int, warmup: int, min_lr_ratio: float, *,
             cooldown_ratio: float = 0.2, const_lr_ratio: float = 0.5,
             decay_ratio: float = 0.2) -> float:
    """Infinite learning-rate schedule for continual pretraining ("Simple and Scalable Strategies
    to Continually Pre-train Large Language Models"): warm-up, cooldown to a constant, a constant
    phase that can go on for any number of steps, and a final annealing phase.

    With C = round(cooldown_ratio T), D = round(decay_ratio T), A = T - D, c = const_lr_ratio:
    m = (s+1)/W for s < W; m = c + (1-c)/2 (1 + cos(pi (s-W)/C)) for s < W + C; m = c for s < A;
    else m = c (r/c)^p, p = (s-A)/D (exponential annealing to r).
    """
    if step < warmup:
        return (step + 1) / warmup
    cooldown = round(cooldown_ratio * total)
    if step < warmup + cooldown:
        return const_lr_ratio + (1 - const_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * _progress(step, warmup, cooldown)))
    length = decay_steps(total, decay_ratio)
    start = total - length
    if step < start:
        return const_lr_ratio
    return const_lr_ratio * (min_lr_ratio / const_lr_ratio) ** _progress(step, start, length)


def rewarm(step: int, total: int, warmup: int, min_lr_ratio: float, *,
           start_lr_ratio: float = 0.1) -> float:
    """Re-warming for continued pretraining from a checkpoint ("Continual Pre-Training of Large
    Language Models: How to (re)warm your model?"): from `start_lr_ratio` (e.g. where the previous
    run ended) linearly back up to the peak, then cosine decay to `min_lr_ratio`.

    m = q + (1-q) s/W for s < W (q = start_lr_ratio, so the first update runs at q);
    else m = r + (1-r)/2 (1 + cos(pi p)), p = min(1, (s-W)/(T-W)).
    """
    if step < warmup:
        return start_lr_ratio + (1 - start_lr_ratio) * step / warmup
    return cosine(step, total, warmup, min_lr_ratio)


def cosine_restarts(step: int, total: int, warmup: int, min_lr_ratio: float, *,
                    cycle_steps: int = 0, cycle_mult: float = 1.0) -> float:
    """Cosine with warm restarts ("SGDR: Stochastic Gradient Descent with Warm Restarts").

    m = (s+1)/W for s < W; then cycles of length L_i = L_0 mult^i (L_0 = cycle_steps, or T - W
    when 0; lengths rounded to whole steps); in cycle i at offset t: m = r + (1-r)/2 (1 +
    cos(pi t/L_i)), jumping back to 1 at each restart.
    """
    if step < warmup:
        return (step + 1) / warmup
    t = step - warmup
    length = float(cycle_steps or max(1, total - warmup))
    while t >= round(length):
        t -= round(length)
        length *= cycle_mult
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t / round(length)))


# ---- registration: each schedule with its options and its check against the run --------------
class DecayOptions(Options):
    # wsd, power, infinite: the final decay (annealing) phase is the last `decay_ratio` of the run.
    decay_ratio: float = Field(0.2, ge=0, le=1, description="final decay phase, as a fraction of the run")


class WSDOptions(DecayOptions):
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field("1-sqrt", description="shape of the decay")


class PowerOptions(DecayOptions):
    # lr = min(peak, power_a * tokens_seen ** power_b), then `power_decay` at the end.
    power_a: float = Field(4.0, gt=0, description="power schedule: lr = a * tokens ** b")
    power_b: float = Field(-0.51, lt=0, description="power schedule exponent b")
    power_decay: Literal["exp", "linear"] = Field("exp", description="power schedule's final decay")


class InfiniteOptions(DecayOptions):
    # Cosine cooldown from the peak to const_lr_ratio over cooldown_ratio of the run.
    cooldown_ratio: float = Field(0.2, ge=0, le=1, description="infinite: cooldown, fraction of the run")
    const_lr_ratio: float = Field(0.5, gt=0, le=1, description="infinite: the constant phase's rate")


class RewarmOptions(Options):
    start_lr_ratio: float = Field(0.1, ge=0, le=1, description="rewarm: first update's rate / peak")


class RestartOptions(Options):
    cycle_steps: int = Field(0, ge=0, description="first cycle length (0: the whole run after warm-up)")
    cycle_mult: float = Field(1.0, ge=1, description="growth of each next cycle")


def _check_phases(cfg: Any) -> None:
    """Warm-up plus the decay phases fit in the run; an exponential decay has a floor above 0."""
    s, total = cfg.schedule, cfg.train.steps
    decays = "decay_ratio" in SCHEDULES[s.name].options.model_fields
    warm, phases = cfg.warmup_steps, round(s.decay_ratio * total) if decays else 0
    if s.name == "infinite":
        phases += round(s.cooldown_ratio * total)
    if warm + phases > total:
        raise UserError(f"schedule {s.name}: warm-up ({warm}) plus its decay phases ({phases}) exceed "
                        f"the {total} steps; lower --warmup-steps/--warmup-ratio, --decay-ratio or "
                        "--cooldown-ratio")
    exp_decay = s.name == "infinite" or (s.name == "power" and s.power_decay == "exp")
    if exp_decay and s.min_lr_ratio == 0:
        raise UserError(f"schedule {s.name} decays exponentially and cannot reach zero; "
                        "set --min-lr-ratio above 0")
    if s.name == "infinite" and s.min_lr_ratio > s.const_lr_ratio:
        raise UserError(f"schedule infinite anneals from --const-lr-ratio {s.const_lr_ratio} "
                        f"down to --min-lr-ratio {s.min_lr_ratio}; set min <= const")


SCHEDULES.register("cosine", cosine, validate=_check_phases,
                   doc="linear warm-up, cosine decay to --min-lr-ratio (default)")
SCHEDULES.register("wsd", wsd, options=WSDOptions, validate=_check_phases,
                   doc="warmup-stable-decay (MiniCPM)")
SCHEDULES.register("power", power, options=PowerOptions, validate=_check_phases,
                   doc="Power scheduler: lr = a * tokens ** b, then a final decay")
SCHEDULES.register("infinite", infinite, options=InfiniteOptions, validate=_check_phases,
                   doc="infinite schedule for continual pretraining: cooldown, constant, anneal")
SCHEDULES.register("rewarm", rewarm, options=RewarmOptions, validate=_check_phases,
                   doc="re-warming for continued pretraining from a checkpoint")
SCHEDULES.register("cosine_restarts", cosine_restarts, options=RestartOptions, validate=_check_phases,
                   doc="cosine with warm restarts (SGDR)")


def schedule_options(cfg: Any) -> dict[str, Any]:
    """The keyword options the run's schedule takes: its registered options, and from the run
    `tokens_per_step` and `peak_lr` where its function asks for them."""
    run = {"tokens_per_step": cfg.tokens_per_step, "peak_lr": cfg.optimizer.lr}
    params = inspect.signature(SCHEDULES[cfg.schedule.name].obj).parameters
    return {**{k: v for k, v in run.items() if k in params}, **dict(cfg.schedule.options())}


def multiplier(cfg: Any, step: int) -> float:
    """The run's schedule multiplier at update `step` (no restarts), e.g. for plots."""
    return SCHEDULES[cfg.schedule.name].obj(step, cfg.train.steps, cfg.warmup_steps,
                                        cfg.schedule.min_lr_ratio, **schedule_options(cfg))


def restart_ramp(step: int, cycle_start: int | None, restart_warmup: int) -> float:
    """After an optimizer-state reset at update `cycle_start` the rate climbs linearly back over
    `restart_warmup` updates (ReLoRA's jagged schedule, the recovery ramp of momentum resets).
    `step` is the 0-based index of the coming update; the first one after the reset gets
    1 / restart_warmup of the rate, never zero."""
    if cycle_start is None or restart_warmup == 0:
        return 1.0
    return min(1.0, (step - cycle_start + 1) / restart_warmup)


def build_scheduler(
    optimizer: Optimizer, name: str, total: int, warmup: int, min_lr_ratio: float,
    restart_warmup: int = 0, cycle_start: Callable[[int], int | None] = lambda step: None,
    **options: Any,
) -> LambdaLR:
    """A LambdaLR over update steps; `cycle_start(step)` gives the last optimizer-state reset
    at or before `step` (or None), after which the rate re-warms over `restart_warmup` steps.
    `options` are the schedule's keyword options (`schedule_options(cfg)`)."""
    fn = SCHEDULES[name].obj
    return LambdaLR(optimizer, lambda step: fn(step, total, warmup, min_lr_ratio, **options)
                    * restart_ramp(step, cycle_start(step), restart_warmup))
