"""Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm, exactly ("Pre-RMSNorm and Pre-CRMSNorm Transformers:
Equivalent and Efficient Pre-LN Transformers", Jiang et al., 2023).

LayerNorm only sees the zero-mean part of its input. Centre every vector written into the residual
stream (the token embeddings and the output rows of o_proj and down_proj) and the stream stays
zero-mean, so each LayerNorm equals an RMSNorm with the same gain: that is Pre-RMSNorm. A zero-mean
vector of dim d is fixed by its first d - 1 coordinates (the last is minus their sum): store the
stream in d - 1 dimensions, normalise with CRMSNorm, and fold each norm's gain and the dropped
coordinate into the linears that read the normalised vector: that is Pre-CRMSNorm.

Both act on dense models (factored layers are merged first: centring densifies a sparse S).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sltrain.config import build_config
from sltrain.errors import UserError
from sltrain.model.llama import Llama
from sltrain.parametrize import merge

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
           "mlp.up_proj")  # linears that read a block's normalised input
WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # linears that write into the residual stream


def _centred_rows(w: torch.Tensor) -> torch.Tensor:
    """(I - 11^T / d) W for a weight with d output rows: every output vector becomes zero-mean."""
    return w - w.mean(0, keepdim=True)


@torch.no_grad()
def to_pre_rmsnorm(model: Llama) -> Llama:
    """The Pre-RMSNorm model with the same function as the Pre-LN `model` (left unchanged)."""
    if model.cfg.norm != "pre_ln":
        raise UserError(f"only a pre_ln model converts; this one is {model.cfg.norm}")
    src = merge(copy.deepcopy(model)).state_dict()
    ref = next(model.parameters())
    out = Llama(replace(model.cfg, norm="pre_rmsnorm")).to(ref.device, ref.dtype)
    sd = dict(src)
    if model.cfg.embed_proj:  # the projection writes the stream's first vector
        sd["embed_proj.weight"] = _centred_rows(sd["embed_proj.weight"])
    else:
        emb = sd["embed_tokens.weight"]
        sd["embed_tokens.weight"] = emb - emb.mean(-1, keepdim=True)
    for i in range(model.cfg.n_layers):
        for name in WRITERS:
            key = f"layers.{i}.{name}.weight"
            sd[key] = _centred_rows(sd[key])
    out.load_state_dict(sd, strict=True)
    return out


@torch.no_grad()
def to_pre_crmsnorm(model: Llama) -> Llama:
    """The Pre-CRMSNorm model (residual stream in dim - 1) equal to the Pre-LN `model`."""
    if model.cfg.embed_proj:
        raise UserError("a model with an embedding projection has no Pre-CRMSNorm form; convert "
                        "it to pre_rmsnorm")
    sd = to_pre_rmsnorm(model).state_dict()
    cfg = replace(model.cfg, norm="pre_crmsnorm")
    ref = next(model.parameters())
    out = Llama(cfg).to(ref.device, ref.dtype)
    d = cfg.dim

    def fold(w: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        # W diag(gain) applied to [n', -sum n'] == (W diag(gain))[:, :d-1] - its last column.
        wg = w * gain
        return wg[:, : d - 1] - wg[:, d - 1 :]

    new = {"embed_tokens.weight": sd["embed_tokens.weight"][:, : d - 1],
           "lm_head.weight": fold(sd["lm_head.weight"], sd["norm.weight"])}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        gains = {"self_attn": sd[p + "input_layernorm.weight"],
                 "mlp": sd[p + "post_attention_layernorm.weight"]}
        for name in READERS:
            new[f"{p}{name}.weight"] = fold(sd[f"{p}{name}.weight"], gains[name.split(".")[0]])
        for name in WRITERS:
            new[f"{p}{name}.weight"] = sd[f"{p}{name}.weight"][: d - 1]
    out.load_state_dict(new, strict=True)
    return out


CONVERTERS = {"pre_rmsnorm": to_pre_rmsnorm, "pre_crmsnorm": to_pre_crmsnorm}


def convert_run(path: Path, to: str, out: Path) -> dict[str, Any]:
    """`sltrain convert`: the newest checkpoint of a Pre-LN run (or a checkpoint folder) written
    to `out` as an equivalent dense run with norm `to`, which eval, export and --init-from read."""
    from sltrain.run.folder import load_run_model, save_model_run  # run/ builds on the model

    if to not in CONVERTERS:
        raise UserError(f"unknown target norm '{to}'; choose one of {', '.join(CONVERTERS)}")
    model, cfg, ckpt = load_run_model(path)
    if cfg.model.norm != "pre_ln":
        raise UserError(f"{ckpt} was trained with --norm {cfg.model.norm}; only a pre_ln run "
                        "converts (its Pre-RMSNorm and Pre-CRMSNorm forms are exact)")
    converted = CONVERTERS[to](model)
    tree = cfg.to_dict()
    tree["model"]["norm"] = to
    tree["method"]["name"] = "full"  # factored layers are merged: centring densifies them
    new_cfg = build_config(tree)
    record = {"command": "convert", "source": str(ckpt), "from_norm": "pre_ln", "to_norm": to,
              "from_method": cfg.method.name}
    saved = save_model_run(converted.state_dict(), new_cfg, out, ckpt, record)
    return {"checkpoint": str(saved), "source": str(ckpt), "to": to,
            "params": sum(p.numel() for p in converted.parameters()),
            "source_params": sum(p.numel() for p in model.parameters())}
