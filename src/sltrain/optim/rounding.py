"""Stochastic rounding of float32 values into bfloat16 storage, drawn from seeded generators.

"Revisiting BFloat16 Training" (Zamirai et al., 2020): rounding up with probability equal to the
distance from the value below makes the stored value exact in expectation, so an update far
below bf16's resolution (1/256 relative) still moves a weight or a moment instead of vanishing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

# Elements per slice of a bf16 update: its float32 temporaries (about 12 bytes an element) stay
# ~12 MiB instead of three float32 copies of the largest weight. A multiple of bitsandbytes'
# 256-element blocks, so 8-bit states can be sliced with it.
CHUNK = 1 << 20

# Storage dtypes whose updates are computed in float32 and rounded back (float64 stays itself).
LOW_PRECISION = (torch.bfloat16, torch.float16)


class StochasticRounding:
    """One generator per device, all seeded from the run's seed; its state is part of a run's
    training state, so that a resumed run rounds exactly as the uninterrupted one would.
    Every process of a data-parallel run draws the same numbers, so replicas stay identical."""

    def __init__(self, seed: int = 0) -> None:
        self.seed(seed)

    def seed(self, seed: int) -> StochasticRounding:
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}  # saved states of devices not used yet
        return self

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            if key in self._pending:
                generator.set_state(self._pending.pop(key))
            else:
                generator.manual_seed(self._seed)
            self._generators[key] = generator
        return self._generators[key]

    def state_dict(self) -> dict[str, Any]:
        states = {**self._pending, **{k: g.get_state() for k, g in self._generators.items()}}
        return {"seed": self._seed, "generators": states}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a saved state; None (a checkpoint from before bf16 training) keeps the seed."""
        if state is None:
            return
        self.seed(state["seed"])
        # Generators are created on first use: a state saved on a GPU does not need one here.
        self._pending = dict(state["generators"])


# The process's rounding streams: the Trainer seeds them and saves them with the training state.
ROUNDING = StochasticRounding()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def round_into_(target: torch.Tensor, source: torch.Tensor) -> None:
    """target <- source: rounded stochastically when a float32 source goes into bfloat16 storage,
    a plain copy otherwise (float32 storage, or a source already in the target's dtype)."""
    target, source = _local(target), _local(source)
    if target.dtype != torch.bfloat16 or source.dtype != torch.float32:
        target.copy_(source)
        return
    # bfloat16 is float32's upper 16 bits: adding a uniform 16-bit integer to the lower half and
    # truncating rounds the magnitude up with exactly the probability of the dropped fraction.
    bits = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device,
                         generator=ROUNDING.generator(source.device))
    bits.add_(source.view(torch.int32)).bitwise_and_(-65536)
    target.copy_(bits.view(torch.float32))


def update_state_(state: torch.Tensor, new: torch.Tensor,
                  op: Callable[[torch.Tensor, torch.Tensor], object]) -> torch.Tensor:
    """Apply `op(state, new)`, an in-place update of `state` (a moving average: `mul_` then
    `add_`, or `lerp_`), and return `state`. A float32 state is updated as it is, in the
    reference packages' order; a bf16 one in float32 a slice at a time and rounded back
    stochastically, because in bf16 itself v * 0.999 rounds back to v (the average never decays)
    and a contribution below 1/256 of the average vanishes. `new` has `state`'s shape."""
    if state.dtype not in LOW_PRECISION:
        op(state, new)
        return state
    for _, (s16, x) in flat_chunks(state, new.contiguous()):
        s32 = s16.float()
        op(s32, x.float())
        round_into_(s16, s32)
    return state


def flat_chunks(*tensors: torch.Tensor, size: int = CHUNK) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(start, matching views) of the flattened `tensors` (equal numel), `size` elements at a
    time; writing into a view writes the tensor. Not all contiguous: the whole tensors once."""
    tensors = tuple(_local(t) for t in tensors)
    if not all(t.is_contiguous() for t in tensors):
        yield 0, list(tensors)
        return
    flats = [t.view(-1) for t in tensors]
    for start in range(0, flats[0].numel(), size):
        yield start, [f[start:start + size] for f in flats]
