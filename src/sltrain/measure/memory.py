"""Bytes of training state (weights, gradients, optimizer states, sparse indices) and peaks.

`estimate_memory` works from a meta-device model without allocating it; `measure_memory` sums
the tensors a live model and optimizer actually hold. Tests keep the two equal.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sltrain.config import OptimizerConfig, RunConfig
from sltrain.parametrize.base import FactoredLinear


@dataclass
class MemoryBreakdown:
    weights: int
    gradients: int
    optimizer_states: int
    sparse_indices: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.sparse_indices

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _index_bytes(model: nn.Module) -> int:
    return sum(_bytes(b) for m in model.modules() if isinstance(m, FactoredLinear)
               for b in m.index_buffers())


def _gradient_bytes(trainable: list[torch.Tensor], size: int, per_layer: bool, grad_accum: int) -> int:
    """Gradients alive at the peak: all of them, except with per-layer updates and no
    accumulation, where each is freed by its hook before the next one completes."""
    sizes = [p.numel() * size for p in trainable]
    if per_layer and grad_accum == 1:
        return max(sizes, default=0)
    return sum(sizes)


def estimate_memory(
    model: nn.Module,
    dtype: torch.dtype = torch.float32,
    optimizer: OptimizerConfig | None = None,
    rank: int = 0,
    grad_accum: int = 1,
    built: torch.optim.Optimizer | None = None,
) -> MemoryBreakdown:
    """Training-state bytes of `model` (any device, meta included) stored in `dtype`, with the
    optimizer `optimizer` describes (AdamW by default). The optimizer is built over the model
    without allocating any state (or is `built`, already so); each optimizer states its own
    bytes from the shapes."""
    from sltrain.optim import build_optimizer

    # Clipping does not change the state; per-layer updates would refuse it.
    cfg = (optimizer or OptimizerConfig()).model_copy(update={"grad_clip": 0.0})
    size = torch.empty((), dtype=dtype).element_size()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt = built if built is not None else build_optimizer(model, cfg, rank, grad_accum)
    try:
        states = sum(opt.state_bytes(p, group, size)
                     for group in opt.param_groups for p in group["params"])
        states += opt.shared_state_bytes()
    finally:
        if built is None and hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
    return MemoryBreakdown(
        weights=sum(p.numel() for p in params) * size,
        gradients=_gradient_bytes(trainable, size, cfg.per_layer_updates, grad_accum),
        optimizer_states=states,
        sparse_indices=_index_bytes(model),
    )


def estimate_for(cfg: RunConfig, precision: str, model: nn.Module | None = None) -> MemoryBreakdown:
    """What `sltrain memory --precision` reports: the training-state bytes a run of `cfg` holds
    under `precision` (fp32, bf16-mixed or bf16), from `model` (default: built on meta)."""
    from sltrain.device import weight_dtype
    from sltrain.model import build_model

    model = model if model is not None else build_model(cfg, device="meta")
    return estimate_memory(model, weight_dtype(precision), cfg.optimizer, cfg.rank,
                           cfg.train.grad_accum)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def state_dict_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in `optimizer.state_dict()`, each storage counted once (tensors
    shared between parameters, like bitsandbytes' quantisation maps, are held once)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in _tensors(optimizer.state_dict()):
        storage = _local(t).untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def measure_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> MemoryBreakdown:
    """Bytes the live tensors of this process hold (its shards under FSDP); gradients are counted
    as allocated at the peak of a step."""
    params = [_local(p) for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    per_layer = hasattr(optimizer, "grad_accum")
    size = params[0].element_size() if params else 4
    return MemoryBreakdown(
        weights=sum(_bytes(p) for p in params),
        gradients=_gradient_bytes(trainable, size, per_layer, getattr(optimizer, "grad_accum", 1)),
        optimizer_states=state_dict_bytes(optimizer),
        sparse_indices=_index_bytes(model),
    )


def rss_bytes() -> int:
    """This process's resident set size now (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak memory of the training phase of this process, comparable across methods.

    CUDA: `torch.cuda.max_memory_allocated` since `start()`. CPU: the resident set size sampled
    every `interval_s` by a thread, minus the size at `start()`, so that the interpreter, the
    libraries and the token arrays (the same for every method) are left out; it counts weights,
    gradients, optimizer states and activations. Large tensors are mmapped by the allocator and
    returned on free, so the sampled RSS follows the live tensor bytes. Where /proc is missing it
    falls back to the process's peak RSS (ru_maxrss).

    The sampler ends with `stop()` or `result()`, or once this object is garbage: a run that
    fails or is dropped before its summary leaves no thread behind (each one left waking 500
    times a second would take the interpreter's lock from every later run in the process).
    """

    THREAD_NAME = "sltrain-peak-rss"

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif rss_bytes():
            self.baseline = self.peak = rss_bytes()
            # The thread holds a weak reference only, so that dropping this object ends it.
            self._thread = threading.Thread(target=_sample, name=self.THREAD_NAME, daemon=True,
                                            args=(weakref.ref(self), self._stop, self.interval_s))
            self._thread.start()
            weakref.finalize(self, self._stop.set)
        return self

    def stop(self) -> None:
        """End the sampler (idempotent); the peak keeps what it saw."""
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    def result(self) -> tuple[int, str]:
        """(bytes, what was measured); stops the sampler."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda_max_memory_allocated"
        if self._thread is None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss * (1 if sys.platform == "darwin" else 1024), "cpu_peak_rss"
        self.stop()
        return self.peak - self.baseline, "cpu_peak_rss_above_baseline"


def _sample(owner: weakref.ref[PeakMemory], stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        peak = owner()
        if peak is None:
            return
        peak.peak = max(peak.peak, rss_bytes())
        del peak  # no strong reference while waiting
