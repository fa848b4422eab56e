"""8-bit AdamW: bitsandbytes' blockwise-quantised optimizer states (CPU and CUDA).

"8-bit Optimizers via Block-wise Quantization" (Dettmers et al., ICLR 2022).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sltrain.config import OptimizerConfig
from sltrain.errors import UserError
from sltrain.optim.base import adam_moments_
from sltrain.optim.rounding import CHUNK, LOW_PRECISION, flat_chunks, round_into_
from sltrain.registry import OPTIMIZERS

BLOCKSIZE = 256  # bitsandbytes' block size for blockwise 8-bit optimizer states
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 states (bitsandbytes' default)


def bitsandbytes():
    # Its import warns on stderr when an optional CPU kernel package is absent, which would make
    # every one-line refusal of a run using 8-bit states two lines; that kernel is not used here.
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("8-bit optimizer states need bitsandbytes; pip install bitsandbytes") from None
    finally:
        log.setLevel(level)
    return bnb


def blockwise_bytes(numel: int) -> int:
    """One uint8 code per element plus one float32 absmax per block of 256."""
    return numel + 4 * ((numel + BLOCKSIZE - 1) // BLOCKSIZE)


def quantized_moments_bytes(numel: int) -> int:
    """Two 8-bit moments (or two float32 ones below MIN_8BIT_SIZE elements)."""
    return 2 * (blockwise_bytes(numel) if numel >= MIN_8BIT_SIZE else 4 * numel)


_QMAPS: dict[tuple[bool, str], torch.Tensor] = {}


def quantization_map(signed: bool, device: torch.device) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code (256 float32 values), one shared tensor per device."""
    key = (signed, str(device))
    if key not in _QMAPS:
        _QMAPS[key] = bitsandbytes().functional.create_dynamic_map(signed=signed).to(device)
    return _QMAPS[key]


def adam_direction_8bit(grad: torch.Tensor, state: dict, beta1: float, beta2: float, eps: float,
                        step: int | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """Adam with blockwise 8-bit moments in bitsandbytes' state layout (state1/state2 codes,
    absmax1/absmax2 per block of 256, shared qmap1/qmap2): dequantise, update in float32,
    quantise back, a slice at a time (whole 256-blocks, so the same codes as the whole tensor at
    once, without float32 copies of it: 0.8 GB for llama-350m's embedding). The direction comes
    back in `dtype`. Tensors below MIN_8BIT_SIZE elements keep float32 moments, as in bitsandbytes.
    """
    if "state1" not in state:
        if grad.numel() >= MIN_8BIT_SIZE:
            blocks = (grad.numel() + BLOCKSIZE - 1) // BLOCKSIZE
            for i, signed in (("1", True), ("2", False)):
                state["state" + i] = torch.zeros_like(grad, dtype=torch.uint8)
                state["absmax" + i] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
                state["qmap" + i] = quantization_map(signed, grad.device)
        else:
            state["state1"] = torch.zeros_like(grad, dtype=torch.float32)
            state["state2"] = torch.zeros_like(grad, dtype=torch.float32)
    step = state["step"] if step is None else step
    if state["state1"].dtype != torch.uint8:
        direction, correction = adam_moments_(state["state1"], state["state2"], grad.float(),
                                              beta1, beta2, eps, step)
        return direction.to(dtype), correction
    F = bitsandbytes().functional
    direction = torch.empty_like(grad, dtype=dtype)
    for start, pieces in flat_chunks(grad.contiguous(), state["state1"], state["state2"], direction):
        g, codes, out = pieces[0], pieces[1:3], pieces[3]
        blocks = slice(start // BLOCKSIZE, (start + g.numel() + BLOCKSIZE - 1) // BLOCKSIZE)
        absmax = [state["absmax" + i][blocks] for i in "12"]
        m, v = (F.dequantize_blockwise(c, absmax=a, code=state["qmap" + i], blocksize=BLOCKSIZE)
                for c, a, i in zip(codes, absmax, "12", strict=True))
        chunk, correction = adam_moments_(m, v, g.float(), beta1, beta2, eps, step)
        for moment, c, a, i in zip((m, v), codes, absmax, "12", strict=True):
            F.quantize_blockwise(moment, code=state["qmap" + i], absmax=a, out=c,
                                 blocksize=BLOCKSIZE)
        out.copy_(chunk)
    return direction, correction


def sliced_update(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor, gindex: int,
                  pindex: int) -> None:
    """bitsandbytes' blockwise 8-bit AdamW step (its update_step's call) slice by slice: blocks of
    256 are independent, so slices of multiples of 256 give the unsliced step. A bf16 weight is
    stepped on float32 copies of its slices, rounded back stochastically; a float32 one in place
    (on CPU bitsandbytes dequantises both moments of the whole tensor to float32 at once: four
    float32 copies of the largest weight at the peak, now of one slice)."""
    F, state = bitsandbytes().functional, opt.state[p]
    config = opt.get_config(gindex, pindex, group)
    state["step"] += 1
    (beta1, beta2, *beta3), tensors = config["betas"], (p, p.grad.contiguous(), state["state1"],
                                                        state["state2"])
    for start, (weight, grad, state1, state2) in flat_chunks(*tensors):
        blocks = slice(start // BLOCKSIZE, (start + weight.numel() + BLOCKSIZE - 1) // BLOCKSIZE)
        w = weight.float()  # the weight itself when float32
        F.optimizer_update_8bit_blockwise(
            opt.optimizer_name, grad.float(), w, state1, state2, beta1, beta2,
            beta3[0] if beta3 else 0.0, config.get("alpha", 0.0), config["eps"], state["step"],
            config["lr"], state["qmap1"], state["qmap2"], state["absmax1"][blocks],
            state["absmax2"][blocks], config["weight_decay"], gnorm_scale=1.0,
            skip_zeros=config["skip_zeros"])
        if w is not weight:
            round_into_(weight, w)


def build(model: nn.Module, cfg: OptimizerConfig, rank: int) -> torch.optim.Optimizer:
    from sltrain.optim import param_groups

    bnb = bitsandbytes()

    class Adam8bit(bnb.optim.AdamW8bit):
        """bitsandbytes' AdamW8bit; the two quantisation maps are shared by all parameters.

        bitsandbytes computes in float32 but writes a bf16 weight back rounded to nearest (no
        stochastic rounding: bitsandbytes issue #1165), losing every step below 1/256 of the
        weight; a bf16 parameter is therefore stepped by bitsandbytes' own update on float32
        copies, slice by slice, and rounded back stochastically (see `sliced_update`)."""

        moment_keys = ("state1", "state2")  # uint8 codes (float32 below MIN_8BIT_SIZE)

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            eight_bit = self.state[p]["state1"].dtype == torch.uint8
            if eight_bit and (p.dtype in LOW_PRECISION or p.device.type == "cpu"):
                return sliced_update(self, group, p, gindex, pindex)
            if p.dtype not in LOW_PRECISION:
                return super().update_step(group, p, gindex, pindex)
            weight, grad = p.data, p.grad  # below MIN_8BIT_SIZE: small float32-state tensors
            p.grad = None  # a gradient must match its parameter's dtype whenever it is set
            p.data = weight.float()
            p.grad = grad.float()
            try:
                super().update_step(group, p, gindex, pindex)
                round_into_(weight, p.data)
            finally:
                p.grad = None
                p.data = weight
                p.grad = grad

        def state_bytes(self, p: torch.Tensor, group: dict, element_size: int) -> int:
            return quantized_moments_bytes(p.numel())

        def shared_state_bytes(self) -> int:
            has_8bit = any(p.numel() >= MIN_8BIT_SIZE for g in self.param_groups for p in g["params"])
            return 2 * 256 * 4 if has_8bit else 0

        def step_transient_bytes(self, element_size: int) -> int:
            """bf16 weights step on float32 copies of a slice of the weight and of its gradient
            (`sliced_update`); float32 ones in place, in bitsandbytes' kernel."""
            if element_size >= 4:
                return 0
            largest = max(p.numel() for g in self.param_groups for p in g["params"])
            return 2 * 4 * min(largest, CHUNK)

    return Adam8bit(param_groups(model, cfg, split_matrices=False), lr=cfg.lr,
                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                    min_8bit_size=MIN_8BIT_SIZE)


OPTIMIZERS.register("adam8bit", build, doc="AdamW with bitsandbytes' blockwise 8-bit moments")
