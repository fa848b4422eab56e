"""Live tensor bytes on any device, CPU included: the peak of what a block of code allocates.

Counts every storage an operator creates while active, until that storage is freed; no paper.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Allocation:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Counts:
    live: int = 0
    peak: int = 0
    storages: dict[int, int] = field(default_factory=dict)


class LiveTensorBytes(TorchDispatchMode):
    """Within `with LiveTensorBytes() as m:`, `m.peak` is the most bytes the storages created in
    the block held at once (storages that existed before are not counted), and `m.large` lists the
    tensors of at least `record_numel` entries created there.

    Works where `torch.cuda.max_memory_allocated` does not (CPU): every aten operator's outputs
    that do not share an input's storage are new storages, counted until they are freed (a weak
    reference on the storage). Meta tensors hold nothing and are skipped.
    """

    def __init__(self, record_numel: int | None = None) -> None:
        super().__init__()
        self.record_numel = record_numel
        self.large: list[Allocation] = []
        self._counts = _Counts()

    @property
    def peak(self) -> int:
        return self._counts.peak

    @property
    def live(self) -> int:
        return self._counts.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._count(func, t, inputs)
        return out

    def _count(self, func, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr, counts = storage.data_ptr(), self._counts
        if ptr == 0 or ptr in inputs or ptr in counts.storages:
            return
        counts.storages[ptr] = storage.nbytes()
        counts.live += storage.nbytes()
        counts.peak = max(counts.peak, counts.live)
        weakref.finalize(storage, _free, counts, ptr)
        if self.record_numel is not None and t.numel() >= self.record_numel:
            self.large.append(Allocation(str(func), tuple(t.shape), t.dtype))


def _free(counts: _Counts, ptr: int) -> None:
    counts.live -= counts.storages.pop(ptr, 0)
