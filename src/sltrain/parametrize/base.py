"""What every re-parameterised linear layer shares: a dense weight, and what else it can do.

Subclasses define `in_features`, `out_features` and `dense_weight()`; `merged()` follows, and the
capabilities (refactor, cycles, pruning, index counts, spectra) default to "none" until overridden.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from sltrain.registry import Options


def autocast_off(backward: Callable[..., Any]) -> Callable[..., Any]:
    """For the backward of a layer's autograd.Function: run it with autocast off. Eager backward
    runs so already (the loop calls it outside the autocast region); a compiled block's backward
    is traced under the autocast of the block's caller, which would cast its matmuls to bf16."""
    @functools.wraps(backward)
    def run(ctx: Any, grad_out: torch.Tensor) -> Any:
        with torch.autocast(grad_out.device.type, enabled=False):
            return backward(ctx, grad_out)
    return run


# Options the parameterisations share, declared once (an option several entries declare must be
# declared identically). None means "the model preset's value".
class RankOptions(Options):
    rank: int | None = Field(None, gt=0, description="rank r of the B @ A factors (default: the preset's)")


class ScaledRankOptions(RankOptions):
    lora_alpha: float | None = Field(None, gt=0, description="scale s = lora_alpha / rank of B @ A "
                                     "(default: the preset's)")


class DensityOptions(Options):
    density: float | None = Field(None, gt=0, le=1, alias="sp_ratio",
                                  description="fraction of each weight's entries in the sparse part "
                                  "(default: the preset's)")


@torch.no_grad()
def resplit_(A: torch.Tensor, B: torch.Tensor) -> None:
    """Rewrite the factors of B @ A in place as B = U sqrt(S), A = sqrt(S) V^T (the SVD of the
    product): the product is unchanged up to float32 rounding, the rank is kept and the factors
    become balanced (B^T B = A A^T = S)."""
    # B = Qb Rb and A^T = Qa Ra reduce the SVD of the (out x in) product to one of the r x r core
    # Rb Ra^T: O((out + in) r^2) instead of O(out in r), and no dense weight is formed.
    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().t())
    U, S, Vh = torch.linalg.svd(Rb.double() @ Ra.double().t())
    root = S.sqrt()
    B.copy_(Qb @ (U * root).float())
    A.copy_((root[:, None] * Vh).float() @ Qa.t())


class FactoredLinear(nn.Module, ABC):
    """A bias-free linear layer whose weight is composed from other tensors.

    Besides `dense_weight()`, a layer says what the tricks, the pruning and the measurements may
    do with it (peft-style: the class knows, no list of classes elsewhere). The class attributes
    are read before any model exists (config checks); the defaults suit a layer that can do none
    of it. A subclass overrides what applies to it.
    """

    in_features: int
    out_features: int
    # B @ A with both factors free: `refactor_` may re-split them (optimizer.refactor).
    refactorable: ClassVar[bool] = False
    # Gradual magnitude pruning acts on `prunable_tensors()` (prune.target_sparsity).
    prunable: ClassVar[bool] = False
    # `end_cycle_` changes the layer every optimizer.reset_every steps (ReLoRA's merges).
    has_cycles: ClassVar[bool] = False
    # The key of the event CycleTricks records when the layers end a cycle.
    cycle_event: ClassVar[str] = "cycle_end"
    # The forward is x W^T for one dense W (`dense_weight()`), which export, densify, soups,
    # --init-from into a dense model and the weight spectra read. Where it is not (CoLA's
    # B·σ(A·x)), `no_dense_form()` says why and `parametrize.merge` refuses with it.
    mergeable: ClassVar[bool] = True

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""

    # ---- initialisation --------------------------------------------------------------------------
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Initialise every tensor of the layer in place, where it lies (lean initialisation:
        the model is built on the meta device, then materialised and initialised one module at a
        time). `std` is the Normal std of the dense init the model's dense linears get, for layers
        defined from such an init; random draws come from `generator` (on the layer's device).

        A layer class that does not override this is built the old way instead: from a dense,
        initialised nn.Linear through `from_linear` (`inits_in_place` is False)."""
        raise NotImplementedError(f"{type(self).__name__} does not initialise in place")

    @classmethod
    def inits_in_place(cls) -> bool:
        """Whether the class overrides `init_weights` (so no dense init need exist)."""
        return cls.init_weights is not FactoredLinear.init_weights

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A bias-free nn.Linear with the same forward as this layer."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=False,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        return linear

    def no_dense_form(self) -> str:
        """Why a layer that is not `mergeable` has no dense weight (one line, for the refusal)."""
        return f"{type(self).__name__} has no dense weight"

    # ---- factors ---------------------------------------------------------------------------------
    def factors(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """(A, B) of the layer's low-rank product B @ A, or None where it has none."""
        return None

    def refactor_(self) -> None:
        """Re-split B @ A through its SVD in place (`resplit_`), keeping the same Parameters, so
        optimizer state stays keyed to them; their moments then describe other coordinates."""
        factors = self.factors()
        if not self.refactorable or factors is None:
            raise TypeError(f"{type(self).__name__} has no freely re-splittable B @ A factors")
        resplit_(*factors)

    # ---- cycles and warm start -------------------------------------------------------------------
    def end_cycle_(self, generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """End a cycle (layers with `has_cycles`), drawing any fresh values from `generator`;
        returns the parameters restarted, whose optimizer moments are now stale."""
        raise TypeError(f"{type(self).__name__} has no cycles")

    def trainable_for_warm_start(self) -> list[nn.Parameter]:
        """The parameters a warm start switches between (all must be in the optimizer); empty for
        a layer without one."""
        return []

    def set_warm_start(self, on: bool) -> None:
        """Enter (on) or leave the warm-start phase; only layers with a warm start have one."""
        raise TypeError(f"{type(self).__name__} has no warm start")

    # ---- pruning and counting --------------------------------------------------------------------
    def prunable_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """(name suffix, parameter) of what gradual magnitude pruning zeroes, entry by entry."""
        return []

    def index_buffers(self) -> list[torch.Tensor]:
        """The index tensors (sparse supports, kept channels) the layer stores beside its weights."""
        return []

    def sparse_counts(self) -> dict[str, int]:
        """{"sparse": entries of the sparse part, "sparse_indices": index entries stored}."""
        return {"sparse": 0, "sparse_indices": sum(b.numel() for b in self.index_buffers())}

    # ---- measurement -----------------------------------------------------------------------------
    @torch.no_grad()
    def spectra_parts(self) -> dict[str, torch.Tensor]:
        """Named dense (out, in) matrices whose singular values describe the layer: "weight" and,
        where the layer sums parts, each part ("low_rank", "sparse") from its own composition."""
        return {"weight": self.dense_weight()}

    # ---- compute ---------------------------------------------------------------------------------
    def flops_per_token(self, tokens_per_batch: int) -> float:
        """Forward FLOPs per token (2 per multiply-add of the matmuls), work done once per forward
        call amortised over its `tokens_per_batch` tokens. Default: a dense x W^T, 2 in out."""
        return 2.0 * self.in_features * self.out_features

    def backward_flops_per_token(self, tokens_per_batch: int) -> float:
        """Backward FLOPs per token: the gradients of the input and of every matmul operand cost
        one matmul each, twice the forward (the "6 N" rule's 4 N) unless the layer says otherwise."""
        return 2.0 * self.flops_per_token(tokens_per_batch)

    # ---- memory (the peak prediction of `sltrain memory`, measure/peak.py) ----------------------
    def saved_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """Bytes a forward over `tokens` tokens keeps for backward besides the layer's parameters
        and one copy of its input in the compute dtype (`compute_size` bytes an element), which
        the caller counts: inner activations, and under bf16 autocast the bf16 copies of the
        weights F.linear takes. Default: none (a custom autograd Function saving only its input
        and parameters)."""
        return 0

    def backward_transient_bytes(self, tokens: int, compute_size: int, autocast: bool) -> int:
        """The most bytes the backward holds at once besides the gradients it returns, such as a
        dense weight recomposed from the factors. Default: none worth counting."""
        return 0
