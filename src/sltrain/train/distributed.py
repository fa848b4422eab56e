"""Data-parallel training under torchrun: DDP or FSDP2, one process per device.

`torchrun --nproc_per_node N -m sltrain train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `init` joins
the process group (NCCL on GPUs, gloo on CPU) and `wrap` wraps the model as `train.parallel` says:

- `ddp`: `DistributedDataParallel`; weights and optimizer states replicated, gradients all-reduced.
  Every parameterisation and optimizer works (the SLTrain support is drawn from (seed, layer name),
  so it is identical on every rank without communication).
- `fsdp`: `fully_shard` (FSDP2) on each block and on the root; weights, gradients and optimizer
  states sharded on dim 0. Only element-wise optimizers work on shards (AdamW); subspace and
  orthogonalising optimizers need whole matrices and are refused.

`train.batch_size` stays the global batch: every rank draws the same batch of block indices and
takes its slice, so a run on N processes sees exactly the data of a single-process run.
Checkpoints are the same files whatever the world size (full state dicts, written by rank 0).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sltrain.config import RunConfig
from sltrain.errors import UserError
from sltrain.optim.tricks import warm_start_steps
from sltrain.parametrize import can
from sltrain.registry import OPTIMIZERS


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "none", "ddp" or "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks (itself when alone)."""
        return self.sum([value])[0] / self.size

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (the values themselves when alone)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (the same shape on each) concatenated along dim 0 in rank order
        (`t` itself when alone)."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        return self.sum([float(flag)])[0] > 0 if self.active else flag

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def init(cfg: RunConfig, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes; alone when WORLD_SIZE is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                            "visible); lower --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = World(rank, size, local_rank, cfg.train.parallel)
    check(cfg, world)
    return world, device


def check(cfg: RunConfig, world: World) -> None:
    """Refuse what cannot run data-parallel, naming the fix."""
    if world.size <= 1:
        return
    tc, oc = cfg.train, cfg.optimizer
    if tc.batch_size % world.size:
        raise UserError(f"--batch-size {tc.batch_size} (the global batch) does not split over "
                        f"{world.size} processes; pass a multiple of {world.size}")
    if oc.per_layer_updates:
        raise UserError("--per-layer-updates steps each parameter before its gradient is reduced "
                        "across processes; train it in one process or drop the flag")
    if warm_start_steps(cfg):
        raise UserError(f"method {cfg.method.name}'s --warm-start-steps changes which parameters "
                        "train mid-run, which data-parallel wrappers cannot follow; pass "
                        "--warm-start-steps 0")
    if tc.parallel == "fsdp":
        # Only an optimizer registered as element-wise can step a shard without the whole matrix.
        if not OPTIMIZERS[oc.name].info.get("elementwise"):
            raise UserError(f"--optimizer {oc.name} needs whole matrices but --parallel fsdp "
                            "shards them; use --parallel ddp or --optimizer adamw")
        if can(cfg.method.name, "has_cycles") or oc.reset_every:
            raise UserError(f"method {cfg.method.name}'s cycles and the --reset-every tricks "
                            "rewrite whole weights, which FSDP shards; use --parallel ddp")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model as the training step calls it (the unwrapped model stays the one to save)."""
    if not world.active:
        return model
    if world.parallel == "fsdp":
        fully_shard = _fully_shard()
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    # The sparse supports are identical by construction; nothing to broadcast each step.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, last: bool):
    """Skip the gradient reduction of every micro-batch but the last of an update step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


# ---- full state dicts (the checkpoint format does not depend on the world size) --------------
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def model_state(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The full state dict (on rank 0; gathered from the shards under FSDP)."""
    if world.parallel != "fsdp" or not world.active:
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def load_model_state(model: nn.Module, world: World, tensors: dict[str, torch.Tensor]) -> None:
    if world.parallel != "fsdp" or not world.active:
        unwrap(model).load_state_dict(tensors, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, tensors, options=_options())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters in its own index order."""
    name_of = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """torch's usual index-keyed optimizer state dict, gathered from the shards under FSDP."""
    if world.parallel != "fsdp" or not world.active:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options())
    if not world.main:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in by_name["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
                         state: dict) -> None:
    if world.parallel != "fsdp" or not world.active:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
