"""Peak training memory predicted from shapes: the training state, the activations kept for
backward and the largest transient, at the moment of a step where they add up to the most.

No paper: it counts what each op of the LLaMA block (model/llama.py), the factored layers'
autograd functions, the chunked loss (train/losses.py) and the optimizer steps keep, on a
meta-device model (nothing is allocated); benchmarks/peak_prediction.py holds it against runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sltrain.config import RunConfig
from sltrain.measure.memory import MemoryBreakdown, estimate_memory
from sltrain.model.llama import CRMSNorm
from sltrain.parametrize.base import FactoredLinear
from sltrain.train.checkpointing import checkpointed_blocks

IDS = 8  # bytes of an int64 token id: the embedding keeps the inputs, the loss the targets


@dataclass(frozen=True)
class Precision:
    """Element sizes a `--precision` mode computes with."""

    stream: int  # the residual stream and the norms' outputs (the embedding's dtype)
    compute: int  # matmul operands and outputs
    autocast: bool  # bf16 autocast over float32 weights


PRECISIONS = {"fp32": Precision(4, 4, False), "bf16-mixed": Precision(4, 2, True),
              "bf16": Precision(2, 2, False)}


def precision_of(model: nn.Module, precision: str) -> Precision:
    """The element sizes `model` computes with under `precision`: under autocast an embedding
    projection's output, and so the residual stream after it, is bf16."""
    p = PRECISIONS[precision]
    if p.autocast and model.embed_proj is not None:
        return Precision(p.compute, p.compute, True)
    return p


@dataclass
class PeakPrediction:
    """The predicted peak of a training step and what is alive at it: `states` (weights,
    optimizer states, sparse indices and the gradients alive then), `activations` (tensors saved
    for backward, alive then), `transient` (temporaries of the work running then). `moment`
    says where in the step the peak falls; `saved` is what one micro-batch's forward saves."""

    states: int
    activations: int
    transient: int
    moment: str
    saved: int

    @property
    def total(self) -> int:
        return self.states + self.activations + self.transient

    def to_dict(self) -> dict[str, Any]:
        return {"states": self.states, "activations": self.activations,
                "transient": self.transient, "total": self.total, "moment": self.moment,
                "saved_activations": self.saved}


# ---- activations: what the forward saves for backward ------------------------------------------
def norm_bytes(norm: nn.Module, width: int, tokens: int, p: Precision) -> int:
    """A norm keeps its input in float32 (itself, or a float copy), float32 statistics (1/rms;
    LayerNorm's mean and 1/std; CRMSNorm's 1/rms and the sum it squares) and, where it has a
    gain, the normalised input before it (stream dtype)."""
    stats = 8 if isinstance(norm, (nn.LayerNorm, CRMSNorm)) else 4
    gain = p.stream * width if getattr(norm, "weight", None) is not None else 0
    return tokens * (4 * width + stats + gain)


def linear_bytes(layer: nn.Module, tokens: int, p: Precision, float_input: bool) -> int:
    """What one linear keeps beyond its parameters and an input the caller counts: under
    autocast a bf16 copy of a float32 input, and for a dense layer autocast's bf16 weight copy;
    a factored layer's own (`FactoredLinear.saved_bytes`)."""
    cast = tokens * layer.in_features * p.compute if p.autocast and float_input else 0
    if isinstance(layer, FactoredLinear):
        return cast + layer.saved_bytes(tokens, p.compute, p.autocast)
    return cast + (2 * layer.weight.numel() if p.autocast else 0)


def _linears(block: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The block's linears, each with whether its input is a (float32 under autocast) norm output."""
    a, m = block.self_attn, block.mlp
    return [(a.q_proj, True), (a.k_proj, True), (a.v_proj, True), (a.o_proj, False),
            (m.gate_proj, True), (m.up_proj, True), (m.down_proj, False)]


def block_bytes(block: nn.Module, cfg: Any, tokens: int, p: Precision) -> int:
    """Bytes one decoder block's forward keeps for backward: two norms; q and k after
    RoPE, v, the attention output and its float32 log-sum-exp (fused SDPA's saved tensors: no
    T x T matrix); SwiGLU's gate, up, silu(gate) and their product; the norm outputs the linears
    keep as their input (under autocast each keeps its own bf16 copy instead); the linears' own."""
    d, inner = cfg.resid_dim, cfg.n_heads * cfg.head_dim
    per_token = 4 * inner * p.compute + 4 * cfg.n_heads + 4 * cfg.ffn_dim * p.compute
    if not p.autocast:
        per_token += 2 * d * p.stream
    linears = sum(linear_bytes(layer, tokens, p, norm_in) for layer, norm_in in _linears(block))
    norms = sum(norm_bytes(n, d, tokens, p) for n in (block.input_layernorm,
                                                   block.post_attention_layernorm))
    return norms + tokens * per_token + linears


def _hidden_size(p: Precision) -> int:
    """Bytes an element of the final norm's output: float32 under autocast (its float32 gain)."""
    return 4 if p.autocast else p.stream


def head_bytes(model: nn.Module, tokens: int, p: Precision, chunk: int) -> int:
    """The final norm, the token ids and targets, and the loss's: the chunked loss keeps the
    hidden states; the plain one the lm_head's input (its bf16 copies under autocast), the
    logits the step holds and log_softmax's float32 output."""
    d, vocab = model.cfg.resid_dim, model.cfg.vocab_size
    kept = norm_bytes(model.norm, d, tokens, p) + 2 * IDS * tokens
    if model.embed_proj is not None:  # keeps the embedding's output as its input (or a bf16 copy)
        kept += linear_bytes(model.embed_proj, tokens, p, float_input=True)
        kept += 0 if p.autocast else tokens * d * p.stream
    if chunk:
        return kept + tokens * d * _hidden_size(p)
    head_input = tokens * d * (p.compute if p.autocast else p.stream)
    return kept + head_input + (2 * vocab * d if p.autocast else 0) + tokens * vocab * (p.compute + 4)


def saved_bytes(model: nn.Module, cfg: RunConfig, p: Precision, tokens: int) -> tuple[int, list[int]]:
    """(bytes of the loss end's activations, each block's kept bytes): a checkpointed block
    keeps only its input."""
    chosen = set(checkpointed_blocks(cfg.train.activation_checkpointing, len(model.layers)))
    blocks = [tokens * model.cfg.resid_dim * p.stream if i in chosen else
              block_bytes(b, model.cfg, tokens, p) for i, b in enumerate(model.layers)]
    return head_bytes(model, tokens, p, cfg.loss.chunk_tokens), blocks


# ---- transients: temporaries of the work running at a moment ------------------------------------
def loss_transients(model: nn.Module, tokens: int, p: Precision, chunk: int,
                    weight_size: int) -> tuple[int, int]:
    """(forward, backward) temporaries of the loss. Chunked: a chunk's float32 logits and
    log-softmax; in the backward its logits, softmax and the previous chunk's gradient, plus
    grad_hidden and, over bf16 weights, the float32 sum of the head's gradient. Plain: the
    float32 copy of bf16 logits; in the backward two float32 logits-sized gradients."""
    d, vocab = model.cfg.resid_dim, model.cfg.vocab_size
    head_copy = 2 * vocab * d if p.autocast else 0  # the head weight cast to bf16
    if not chunk:
        forward = tokens * vocab * 4 if p.compute < 4 else 0
        return forward, 8 * tokens * vocab + head_copy
    rows = min(chunk, tokens)
    previous = p.compute if tokens > rows else 0
    grad_sum = (4 - weight_size) * vocab * d  # beyond the gradient it becomes
    backward = rows * vocab * (8 + previous) + tokens * d * _hidden_size(p) + head_copy + grad_sum
    return rows * vocab * 8 + head_copy, backward


def layer_transient(layer: nn.Module, tokens: int, p: Precision) -> int:
    """A linear's backward temporaries: a factored layer's own; a dense layer's bf16 weight
    gradient under autocast (cast to the float32 gradient afterwards)."""
    if isinstance(layer, FactoredLinear):
        return layer.backward_transient_bytes(tokens, p.compute, p.autocast)
    return 2 * layer.weight.numel() if p.autocast else 0


def block_transient(block: nn.Module, cfg: Any, tokens: int, p: Precision) -> int:
    """A block's backward temporaries: SwiGLU's input gradients (two ffn-wide tensors a token
    beyond what they free) and the largest of its linears'."""
    layers = max(layer_transient(layer, tokens, p) for layer, _ in _linears(block))
    return 2 * tokens * cfg.ffn_dim * p.compute + layers


def step_transient(optimizer: torch.optim.Optimizer, weight_size: int) -> int:
    """The most bytes an optimizer step holds besides states and gradients, as the optimizer
    states it (`step_transient_bytes`); for one that does not, a float32 update direction and
    one temporary the size of its largest parameter."""
    own = getattr(optimizer, "step_transient_bytes", None)
    if own is not None:
        return own(weight_size)
    largest = max((q.numel() for g in optimizer.param_groups for q in g["params"]), default=0)
    return 2 * 4 * largest


# ---- the step as a sequence of moments ------------------------------------------------------------
@dataclass
class _Unit:
    """One stretch of the backward: the activations it frees once done, the parameters whose
    gradients it makes, the temporaries it holds."""

    name: str
    kept: int
    params: list[nn.Parameter]
    transient: int


def backward_units(model: nn.Module, cfg: RunConfig, p: Precision, tokens: int,
                   weight_size: int) -> tuple[int, list[_Unit]]:
    """(the loss's forward temporaries, the backward's units in order: the loss and lm_head,
    the blocks from the last, the embedding). A checkpointed block's unit holds its
    recomputed activations as a temporary."""
    head, blocks = saved_bytes(model, cfg, p, tokens)
    loss_forward, loss_backward = loss_transients(model, tokens, p, cfg.loss.chunk_tokens,
                                                  weight_size)
    chosen = set(checkpointed_blocks(cfg.train.activation_checkpointing, len(model.layers)))
    units = [_Unit("the loss", head, [*model.lm_head.parameters(), *model.norm.parameters()],
                   loss_backward)]
    for i in reversed(range(len(model.layers))):
        block = model.layers[i]
        recompute = block_bytes(block, model.cfg, tokens, p) if i in chosen else 0
        units.append(_Unit(f"block {i}", blocks[i], list(block.parameters()),
                           block_transient(block, model.cfg, tokens, p) + recompute))
    embedding = [*model.embed_tokens.parameters(),
                 *(model.embed_proj.parameters() if model.embed_proj is not None else [])]
    units.append(_Unit("the embedding", 0, embedding, 0))
    return loss_forward, units


@dataclass
class _Step:
    """How gradients live during a step: `accumulated` bytes from earlier micro-batches (all of
    them with accumulation), stepped and freed in hooks (`hook_step(param)`: that step's
    temporaries), the graph retained (the first pass of exact per-layer clipping)."""

    base: int
    weight_size: int
    accumulated: int
    hook_step: Any = None
    retain: bool = False


def sweep(units: list[_Unit], step: _Step) -> list[PeakPrediction]:
    """The backward's moments, one per unit: what is alive while it runs."""
    alive, made, out = sum(u.kept for u in units), 0, []
    saved = alive
    for u in units:
        sizes = {id(q): q.numel() * step.weight_size for q in u.params if q.requires_grad}
        largest = max(sizes.values(), default=0)
        extra = 0
        if step.accumulated:  # each new gradient exists beside the sum it is added into
            held, extra = step.accumulated, largest
        elif step.hook_step is not None:  # freed in its hook: one at a time
            held = largest
            if not step.retain:
                extra = max((step.hook_step(q) for q in u.params if id(q) in sizes), default=0)
        else:
            held = made + sum(sizes.values())
        # A hook steps a parameter once the work making its gradient is done.
        out.append(PeakPrediction(step.base + held, alive, max(u.transient, extra),
                                  f"the backward of {u.name}", saved))
        alive -= 0 if step.retain else u.kept
        made += sum(sizes.values())
    return out


def _stepper(optimizer: torch.optim.Optimizer, weight_size: int) -> Any:
    """param -> the temporaries of stepping it alone (per-layer updates: its own optimizer)."""
    return lambda q: max(step_transient(sub, weight_size) for sub in optimizer.optimizers_for(q))


def step_moments(cfg: RunConfig, state: MemoryBreakdown, optimizer: torch.optim.Optimizer,
                 weight_size: int, loss_forward: int, units: list[_Unit]) -> list[PeakPrediction]:
    """Every moment of an update step: the end of the forward, each unit of the backward (twice
    under exact per-layer clipping: its first pass keeps the graph), the optimizer step."""
    base = state.weights + state.optimizer_states + state.sparse_indices
    saved = sum(u.kept for u in units)
    per_layer = hasattr(optimizer, "optimizers_for")
    hooks = getattr(optimizer, "steps_in_hooks", False)
    step = _Step(base, weight_size, state.gradients if cfg.train.grad_accum > 1 else 0,
                 _stepper(optimizer, weight_size) if hooks else None)
    moments = [PeakPrediction(base + step.accumulated, saved, loss_forward,
                              "the end of the forward", saved), *sweep(units, step)]
    o = cfg.optimizer
    if hooks and o.grad_clip > 0 and o.per_layer_clip == "exact":
        step.retain = True
        for m in sweep(units, step):
            m.moment = f"{m.moment}, in the first pass of exact clipping"
            moments.append(m)
    if not hooks:
        params = [q for g in optimizer.param_groups for q in g["params"]]
        temporaries = (max(map(_stepper(optimizer, weight_size), params)) if per_layer
                       else step_transient(optimizer, weight_size))
        moments.append(PeakPrediction(base + state.gradients, 0, temporaries,
                                      "the optimizer step", saved))
    return moments


class StepModel:
    """A setup's peak predictions from its meta-device model (default: built here; nothing is
    allocated): the model and its optimizer are built once, then `predict` prices any
    precision, micro-batch and checkpointing of it cheaply (`sltrain memory --budget` tries
    many). `close()` drops the optimizer's hooks."""

    def __init__(self, cfg: RunConfig, model: nn.Module | None = None) -> None:
        from sltrain.model import build_model
        from sltrain.optim import build_optimizer

        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg, device="meta")
        # Clipping does not change the state (estimate_memory builds it so too).
        self.optimizer = build_optimizer(self.model, cfg.optimizer.model_copy(
            update={"grad_clip": 0.0}), cfg.rank, cfg.train.grad_accum)

    def predict(self, precision: str, batch_size: int | None = None,
                checkpointing: str | None = None) -> PeakPrediction:
        """The peak of an update step under `precision` (fp32, bf16-mixed or bf16), at the
        config's micro-batch and checkpointing unless given: the moment of the step
        (`step_moments`) whose state, activations and temporaries add up to the most."""
        from sltrain.device import weight_dtype

        train = {"batch_size": batch_size or self.cfg.train.batch_size,
                 "activation_checkpointing": checkpointing or self.cfg.train.activation_checkpointing}
        cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update=train)})
        dtype = weight_dtype(precision)
        weight_size = torch.empty((), dtype=dtype).element_size()
        tokens = cfg.train.batch_size * cfg.data.seq_len
        loss_forward, units = backward_units(self.model, cfg, precision_of(self.model, precision),
                                             tokens, weight_size)
        state = estimate_memory(self.model, dtype, cfg.optimizer, cfg.rank, cfg.train.grad_accum,
                                built=self.optimizer)
        moments = step_moments(cfg, state, self.optimizer, weight_size, loss_forward, units)
        return max(moments, key=lambda m: m.total)

    def close(self) -> None:
        if hasattr(self.optimizer, "remove_hooks"):
            self.optimizer.remove_hooks()


def predict_peak(cfg: RunConfig, precision: str, model: nn.Module | None = None) -> PeakPrediction:
    """The predicted peak of an update step of `cfg` under `precision` (`StepModel.predict`)."""
    step_model = StepModel(cfg, model)
    try:
        return step_model.predict(precision)
    finally:
        step_model.close()
