"""Export a run to a Hugging Face `LlamaForCausalLM` folder, and measure the perplexity of either.

A trained model leaves the package as a plain dense LLaMA: every re-parameterised layer is folded
back into one weight (`parametrize.merge`), so `transformers`, lm-eval and friends load it as is.

Usage (README-ready):

    sltrain export runs/my-run --to hf exports/my-run        # newest checkpoint of the run
    sltrain eval runs/my-run                                   # perplexity on the run's val split
    sltrain eval exports/my-run --data embedded                # the same, through transformers

    pip install "lm-eval[hf]"
    lm_eval --model hf --model_args pretrained=exports/my-run,dtype=float32 \
        --tasks lambada_openai,hellaswag --batch_size 16 --output_path results/

The export is a folder with config.json, model.safetensors and the run's tokenizer
(tokenizer.json, tokenizer_config.json). lm-eval reads each task's dataset from the Hugging Face
hub (or a local HF_DATASETS_CACHE), so the tasks need that access even though the model is local.
The model only knows `seq_len` positions (max_position_embeddings): tasks with longer contexts are
truncated by lm-eval. No BOS token is added: documents were separated by the end-of-text token
during training, so that token also serves as BOS and PAD.

RoPE: our attention rotates halves (`x * cos + rotate_half(x) * sin`, the angle table repeated over
both halves), which is Hugging Face LLaMA's default rope, so q_proj and k_proj are copied without
the permutation that Meta's interleaved-pair checkpoints need.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from sltrain.config import RunConfig, build_config, flatten, load_config
from sltrain.data import Blocks, prepare, prepare_options
from sltrain.data.tokenizer import META_FILE, load_tokenizer, save_tokenizer
from sltrain.errors import UserError
from sltrain.files import writable_dir
from sltrain.model import build_model, param_spec
from sltrain.parametrize import merge
from sltrain.train.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    find_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
)
from sltrain.train.evaluate import evaluate
from sltrain.train.loop import autocast_for, resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SPLITS = ("val", "train", "all")


def run_tokenizer(run_dir: Path) -> tuple[Tokenizer, str]:
    """The tokenizer a run trained with, and its end-of-text token."""
    return load_tokenizer(run_dir)


def checkpoint_config(ckpt: Path) -> RunConfig:
    """The run config a checkpoint's weights file records in its metadata."""
    try:
        with safe_open(str(ckpt / MODEL_FILE), "pt") as f:
            meta = (f.metadata() or {}).get("sltrain")
    except (OSError, SafetensorError) as e:
        raise UserError(f"checkpoint {ckpt} cannot be read ({e}); it is damaged") from None
    if meta is None:
        raise UserError(f"{ckpt / MODEL_FILE} records no sltrain config; pass a checkpoint written "
                        "by `sltrain train`")
    try:
        tree = json.loads(meta)["config"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"the sltrain record in {ckpt / MODEL_FILE} is damaged; restore the "
                        "checkpoint or use an earlier one") from None
    return build_config(tree)


def load_run_model(path: Path) -> tuple[nn.Module, RunConfig, Path]:
    """The model of a checkpoint folder (or a run folder's newest checkpoint), as it trained."""
    ckpt = find_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg)
    load_weights(ckpt, model.load_state_dict)
    return model.eval(), cfg, ckpt


def save_model_run(weights: dict[str, torch.Tensor], cfg: RunConfig, out: Path, source: Path,
                   record: dict[str, Any]) -> Path:
    """Write `weights` (the state dict of a model built by `cfg`) as a run folder without a
    training state: config.json, the tokenizer of the checkpoint folder `source`, and one
    model-only checkpoint at `source`'s step. `sltrain eval`, `export`, `health` and
    `train --init-from` read it like a trained run; `record` (what made it: convert, densify,
    soup) goes to config.json's `derived_from`. Returns the checkpoint folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pass a new --out")
    writable_dir(out, "--out", create=False)
    tok, eos = run_tokenizer(source.parent.parent)
    source_state = load_state(source)
    step = source_state["step"]
    writable_dir(out, "--out")
    save_tokenizer(tok, eos, out, cfg.data.tokenizer)
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "derived_from": record},
                                                indent=2))
    meta = {"config": cfg.to_dict(), "param_spec": param_spec(cfg).to_dict(), **record}
    state = {"step": step, "tokens_seen": source_state.get("tokens_seen", 0), "model_only": True}
    return save_checkpoint(out, step, weights, state, meta, keep=1)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError("this needs transformers; pip install 'sltrain[export]'") from None
    return transformers


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face's: the decoder sits under `model.`, lm_head beside it."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def export_hf(path: Path, out: Path, dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """Write the merged dense model of `path` (run or checkpoint folder) to `out` for transformers."""
    transformers = _transformers()
    ckpt = find_checkpoint(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a folder to export into")
    if (out / "checkpoints").exists() or (out / STATE_FILE).exists():
        raise UserError(f"{out} holds a run or checkpoint; export into another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite its files or choose another")
    writable_dir(out, "OUT", create=False)
    model, cfg, ckpt = load_run_model(ckpt)
    if cfg.model.norm != "pre_rmsnorm" or cfg.model.embed_proj:
        raise UserError(f"the run uses --norm {cfg.model.norm}"
                        + (" with --embed-proj" if cfg.model.embed_proj else "")
                        + "; transformers' LlamaForCausalLM is Pre-RMSNorm only (convert a pre_ln "
                        "run with `sltrain convert --to pre_rmsnorm` first)")
    tok, eos = run_tokenizer(ckpt.parent.parent)
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise UserError(f"the run's tokenizer has no {eos} token; it is not the run's own")

    merge(model)
    tensors = {hf_name(k): v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    dims = cfg.model_dims()
    config = transformers.LlamaConfig(
        vocab_size=dims["vocab_size"], hidden_size=dims["dim"], intermediate_size=dims["ffn_dim"],
        num_hidden_layers=dims["n_layers"], num_attention_heads=dims["n_heads"],
        num_key_value_heads=dims["n_heads"], head_dim=dims["dim"] // dims["n_heads"],
        max_position_embeddings=dims["max_seq_len"], rms_norm_eps=dims["norm_eps"],
        rope_theta=dims["rope_theta"], hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        dtype=dtype, architectures=["LlamaForCausalLM"],
    )
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos,
        model_max_length=dims["max_seq_len"])

    writable_dir(out, "OUT")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    hf_tok.save_pretrained(out)
    # Our own record of the EOS, so that `sltrain eval` of the export splits documents the same.
    (out / META_FILE).write_text(json.dumps({"eos_token": eos}))
    # transformers 4.x (still common under lm-eval) reads `rope_theta` and knows the tokenizer as
    # PreTrainedTokenizerFast; 5.x reads both spellings too.
    _update_json(out / "config.json", rope_theta=dims["rope_theta"])
    _update_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    return {"checkpoint": str(ckpt), "out": str(out), "method": cfg.method.name, "dtype": dtype,
            "params": sum(t.numel() for t in tensors.values()), "source": cfg.data.source}


def _update_json(path: Path, **items: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **items}, indent=2) + "\n")


def is_hf_export(path: Path) -> bool:
    """A folder transformers loads (its config.json names a model_type); run folders have none."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


class _Logits(nn.Module):
    """A transformers causal LM seen as ours are: token ids in, logits out."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=idx, use_cache=False).logits


def load_hf_model(path: Path) -> tuple[nn.Module, Any]:
    """An exported folder as a float32 model returning logits, and its transformers config."""
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path} cannot be loaded by transformers ({first})") from None
    return _Logits(hf_model).eval(), hf_model.config


@dataclass
class EvalSet:
    """What `sltrain eval` reads: its config (data, batch size, device), the blocks of one split
    and how many batches of them."""

    cfg: RunConfig
    device: torch.device
    blocks: Blocks
    batches: int

    @property
    def n_blocks(self) -> int:
        return min(len(self.blocks), self.batches * self.cfg.train.batch_size)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Token-weighted val_loss, val_ppl and val_tokens of `model` on these blocks."""
        return evaluate(model.to(self.device), self.blocks, self.cfg.train.batch_size,
                        self.batches, self.device, autocast_for(self.cfg, self.device))


def run_eval_config(run_cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A run's config with evaluation `overrides` (dotted keys) on top, on the best device."""
    return load_config(None, {**flatten(run_cfg.to_dict()), "train.device": "auto", **overrides})


def check_max_batches(max_batches: int | None) -> None:
    """Refuse a --max-batches below 1 (before any model or data is loaded)."""
    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches {max_batches} must be at least 1; omit it for all blocks")


def eval_set(cfg: RunConfig, vocab: int, context: int, tokenizer_dir: Path, split: str = "val",
             max_batches: int | None = None, split_flag: bool = True) -> EvalSet:
    """The blocks of `split` of `cfg`'s data, tokenised with the model's tokenizer, for a model
    of `vocab` ids and `context` positions: `max_batches` of `cfg.train.batch_size` blocks, in
    order (all when None, see `check_max_batches`). `split_flag`: the command lets the user pick
    another split."""
    seq_len = cfg.data.seq_len
    if seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds the model's {context} positions; pass "
                        f"--seq-len {context} or less")
    device = resolve_device(cfg.train.device)
    # The token budget of a streamed source is the run's (its cached streams are read again).
    data = prepare(cfg.data, vocab, tokenizer_dir, **prepare_options(cfg))
    tokens = np.concatenate([data.train, data.val]) if split == "all" else getattr(data, split)
    blocks = Blocks(tokens, seq_len)
    if len(blocks) == 0:
        raise UserError(f"the {split} split is shorter than one block of {seq_len + 1} tokens; "
                        "lower --seq-len" + (" or pick another --split" if split_flag else ""))
    batches = math.ceil(len(blocks) / cfg.train.batch_size) if max_batches is None else max_batches
    return EvalSet(cfg, device, blocks, batches)


def perplexity(path: Path, overrides: dict[str, Any] | None = None, split: str = "val",
               max_batches: int | None = None) -> dict[str, Any]:
    """Token-weighted mean loss and perplexity of a run, checkpoint or export on a data split.

    `overrides` are dotted config keys (`data.source`, `data.seq_len`, `train.batch_size`,
    `train.device`, ...) on top of the run's own config; an export records no data source, so it
    needs `data.source`. `max_batches` of `train.batch_size` blocks, in order; all when None.
    """
    overrides = dict(overrides or {})
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    check_max_batches(max_batches)
    if is_hf_export(path):
        if "data.source" not in overrides:
            raise UserError(f"{path} is a transformers export, which records no data; pass --data")
        model, hf_config = load_hf_model(path)
        context, vocab = hf_config.max_position_embeddings, hf_config.vocab_size
        cfg = load_config(None, {"data.seq_len": context, **overrides})
        tokenizer_dir, what = path, "transformers export"
    else:
        model, run_cfg, ckpt = load_run_model(path)
        context, vocab = run_cfg.data.seq_len, run_cfg.model_dims()["vocab_size"]
        cfg = run_eval_config(run_cfg, overrides)
        tokenizer_dir, what = ckpt.parent.parent, f"checkpoint {ckpt.name}"
    es = eval_set(cfg, vocab, context, tokenizer_dir, split, max_batches)
    result = es.evaluate(model)
    return {"model": str(path), "kind": what, "data": cfg.data.source, "split": split,
            "seq_len": cfg.data.seq_len, "blocks": es.n_blocks,
            "loss": result["val_loss"], "ppl": result["val_ppl"], "tokens": result["val_tokens"]}
