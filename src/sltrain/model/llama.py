"""The LLaMA decoder in one file: RMSNorm, rotary embeddings, SwiGLU, causal SDPA attention.

Implements "LLaMA: Open and Efficient Foundation Language Models" (Touvron et al., 2023), with
untied embeddings and module names that match Hugging Face's `LlamaForCausalLM`.

`norm` picks where and which normalisation the blocks use:
- `pre_rmsnorm` (LLaMA's): x + F(RMSNorm(x)).  `pre_ln`: the same with LayerNorm (gain, no bias).
- `pre_crmsnorm` ("Pre-RMSNorm and Pre-CRMSNorm Transformers"): the residual stream is kept
  zero-mean and stored in dim - 1 coordinates (the last is minus the sum of the others);
  CRMSNorm(x) = x / sqrt((sum x^2 + (sum x)^2) / dim + eps), without gain (folded into the next
  linear by the converter, `model/convert.py`).
- `post_ln`: LN(x + F(x)).  `mix_ln` ("Mix-LN"): Post-LN in the first `mix_ln_ratio` of the
  blocks, Pre-LN in the rest.  `layernorm_scaling` ("The Curse of Depth in Large Language
  Models"): Pre-RMSNorm with each block's norm outputs scaled by 1/sqrt(block index, from 1).
- `single_scale_rmsnorm` ("Outlier-Safe Pre-Training"): Pre-RMSNorm with one scalar gain per norm.
`embed_proj` adds the learnable dim x dim embedding projection of outlier-safe pretraining
(initialised to the identity).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from sltrain.errors import UserError
from sltrain.registry import NORMS, Options


@dataclass
class LlamaConfig:
    dim: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    norm: str = "pre_rmsnorm"
    mix_ln_ratio: float = 0.25
    embed_proj: bool = False

    @property
    def form(self) -> NormForm:
        return NORMS[self.norm].obj

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def resid_dim(self) -> int:
        """Width of the residual stream: dim, or dim - 1 for the compressed CRMSNorm form."""
        return self.dim + self.form.resid_offset

    def post_ln(self, layer: int) -> bool:
        return self.form.post_ln(self, layer)


# Token files store ids as uint32 (data/tokens.py), so no larger vocabulary can be trained on.
MAX_VOCAB = 2**32
# A tensor's size in bytes must fit an int64; at up to 8 bytes an element that is 2**60 elements.
_MAX_NUMEL = 2**60


def check_dims(dims: dict[str, Any]) -> None:
    """Refuse a decoder shape (RunConfig.model_dims()) that cannot be built, as one UserError."""
    dim, heads, ffn, vocab = dims["dim"], dims["n_heads"], dims["ffn_dim"], dims["vocab_size"]
    if dim % heads or (dim // heads) % 2:
        # Rotary embeddings rotate pairs of coordinates, so each head needs an even size.
        why = (f"does not split into {heads} heads" if dim % heads else
               f"/ --n-heads {heads} gives heads of odd size {dim // heads}, but rotary "
               "embeddings need an even size")
        fits = [h for h in range(1, min(dim, 4 * heads) + 1) if dim % (2 * h) == 0]
        other = f" or --n-heads {min(fits, key=lambda h: abs(h - heads))}" if fits else ""
        raise UserError(f"--dim {dim} {why}; pass --dim {-(-dim // (2 * heads)) * 2 * heads}{other}")
    if vocab > MAX_VOCAB:
        raise UserError(f"--vocab-size {vocab} is above {MAX_VOCAB:,}, the most token ids a token "
                        "file stores; pass a smaller --vocab-size")
    for name, rows, cols in (("token embedding", vocab, dim), ("attention", dim, dim),
                             ("feed-forward", ffn, dim),
                             ("rotary table", dims.get("max_seq_len", 1), dim // heads)):
        if rows * cols > _MAX_NUMEL:
            raise UserError(f"the {name} weight of --dim {dim} would hold {rows:,} x {cols:,} "
                            "values, more than one tensor can; pass smaller sizes")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for stability under bf16 autocast, as LLaMA does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with a gain and no bias, normalising in float32 like RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, None, None, self.eps).type_as(x) \
            * self.weight


class CRMSNorm(nn.Module):
    """RMSNorm of the zero-mean `dim`-vector whose first dim - 1 coordinates are `x`; no gain."""

    def __init__(self, compressed_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.dim = eps, compressed_dim + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ms = (xf.pow(2).sum(-1, keepdim=True) + xf.sum(-1, keepdim=True).pow(2)) / self.dim
        return (xf * torch.rsqrt(ms + self.eps)).type_as(x)


class ScalarRMSNorm(RMSNorm):
    """RMSNorm with a single learnable gain (outlier-safe pretraining)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        nn.Module.__init__(self)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))


@dataclass(frozen=True)
class NormForm:
    """How a registered normalisation enters the decoder: the norm layer `layer(width, eps)`,
    which blocks normalise after the residual add (Post-LN), the residual stream's width offset
    and whether each block's sublayer inputs are scaled by 1/sqrt(depth)."""

    layer: Callable[[int, float], nn.Module]
    post_ln: Callable[[LlamaConfig, int], bool] = lambda cfg, layer: False
    resid_offset: int = 0
    depth_scaled: bool = False


class MixLNOptions(Options):
    mix_ln_ratio: float = Field(0.25, ge=0, le=1, description="mix_ln: the first fraction of blocks Post-LN")


def _no_embed_proj(cfg: Any) -> None:
    if cfg.model.embed_proj:
        raise UserError("--embed-proj needs a full-width residual stream; it cannot go with "
                        "--norm pre_crmsnorm (drop one of them)")


NORMS.register("pre_rmsnorm", NormForm(RMSNorm), doc="Pre-RMSNorm (LLaMA's; default)")
NORMS.register("pre_ln", NormForm(LayerNorm), doc="Pre-LayerNorm")
NORMS.register("pre_crmsnorm", NormForm(lambda dim, eps: CRMSNorm(dim, eps), resid_offset=-1),
               validate=_no_embed_proj, doc="Pre-CRMSNorm: Pre-LN's exact form in a dim - 1 stream")
NORMS.register("post_ln", NormForm(LayerNorm, post_ln=lambda cfg, layer: True),
               doc="Post-LayerNorm (the original Transformer)")
NORMS.register("mix_ln", NormForm(LayerNorm, post_ln=lambda cfg, layer: layer < round(
    cfg.mix_ln_ratio * cfg.n_layers)), options=MixLNOptions, doc="Mix-LN: Post-LN early, Pre-LN late")
NORMS.register("layernorm_scaling", NormForm(RMSNorm, depth_scaled=True),
               doc="LayerNorm scaling: sublayer inputs scaled by 1/sqrt(depth)")
NORMS.register("single_scale_rmsnorm", NormForm(ScalarRMSNorm),
               doc="RMSNorm with one learnable gain (outlier-safe pretraining)")


def make_norm(cfg: LlamaConfig) -> nn.Module:
    return cfg.form.layer(cfg.resid_dim, cfg.norm_eps)


def init_seed(seed: int, name: str) -> int:
    """The seed of module `name`'s init draws: from the run seed and the name alone (kept apart
    from the seeds `parametrize.layer_seed` gives the sparse supports)."""
    return (seed * 1_000_003 + zlib.crc32(f"init:{name}".encode())) % (2**63)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner, d = cfg.n_heads * cfg.head_dim, cfg.resid_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.o_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d = cfg.resid_dim
        self.gate_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    # Set by train.checkpointing: recompute this block's activations in the backward.
    checkpointed = False

    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.post_ln = cfg.post_ln(layer)
        self.scale = (layer + 1) ** -0.5 if cfg.form.depth_scaled else 1.0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.input_layernorm(x + self.self_attn(x, cos, sin))
            return self.post_attention_layernorm(x + self.mlp(x))
        if self.scale != 1.0:
            x = x + self.self_attn(self.input_layernorm(x) * self.scale, cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x) * self.scale)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def cast_parameters_(params: Iterable[nn.Parameter], dtype: torch.dtype) -> None:
    """Store each floating parameter of `params` in `dtype`, in place."""
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.n_heads} heads of even size")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.resid_dim)
        self.embed_proj = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.embed_proj else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # Post-LN blocks end normalised already; the final norm stays (as in Mix-LN's code).
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.resid_dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None,
                     device: torch.device | str | None = None,
                     param_dtype: torch.dtype | None = None) -> None:
        """Initialise every module in place, one at a time (torchtitan's pattern): Normal(0, std)
        for embeddings and dense linears, ones for norms, the identity for embed_proj, and a
        re-parameterised layer's own `init_weights(std, generator)`.

        A module still on the meta device is first materialised on `device` (its own tensors
        only), so a model built on meta holds its parameters and one module's transients, never a
        dense copy. With a `seed`, each module draws from its own generator seeded by the seed and
        its name: the same seed gives the same model in any process, whatever the order; without
        one, from the global RNG. With `param_dtype`, each module's floating parameters are cast
        to it right after their own initialisation: the same values as casting the initialised
        model, without ever holding all of it in float32 (buffers keep their dtype).
        """
        for name, module in self.named_modules():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if any(t.is_meta for t in own):
                if device is None:
                    raise ValueError("init_weights of a meta-device model needs a device")
                module.to_empty(device=device, recurse=False)
                own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if own:
                generator = None
                if seed is not None:
                    generator = torch.Generator(own[0].device).manual_seed(init_seed(seed, name))
                self._init_module(module, std, generator)
                if param_dtype is not None:
                    cast_parameters_(module.parameters(recurse=False), param_dtype)

    def _init_module(self, module: nn.Module, std: float, generator: torch.Generator | None) -> None:
        if module is self:
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
            self.rope_cos = cos.to(self.rope_cos.device, self.rope_cos.dtype)
            self.rope_sin = sin.to(self.rope_sin.device, self.rope_sin.dtype)
        elif module is self.embed_proj:
            nn.init.eye_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std, generator=generator)
        elif isinstance(module, (RMSNorm, LayerNorm)):
            nn.init.ones_(module.weight)
        elif hasattr(module, "init_weights"):
            module.init_weights(std, generator)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            raise TypeError(f"cannot initialise {type(module).__name__}: give it init_weights")

    def forward(self, idx: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        """Logits (batch, seq, vocab); with `return_hidden`, the final normalised hidden states
        (batch, seq, dim) that `lm_head` would map to them (the chunked losses take these)."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(idx)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        for layer in self.layers:
            if layer.checkpointed and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
