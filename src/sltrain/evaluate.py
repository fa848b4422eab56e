"""Perplexity of a run, checkpoint or Hugging Face export on a data split (`sltrain eval`), and
the evaluation setup `sltrain soup` shares: one split, its blocks and a batch count.

The loss is the token-weighted mean cross-entropy over whole blocks in order (`measure.loss`),
the quantity GaLore and SLTrain report as validation perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sltrain.config import RunConfig, flatten, load_config
from sltrain.data import Blocks, prepare, prepare_options
from sltrain.device import autocast_for, resolve_device
from sltrain.errors import UserError
from sltrain.export import is_hf_export, load_hf_model
from sltrain.measure.loss import evaluate
from sltrain.run.folder import load_run_model

SPLITS = ("val", "train", "all")


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
                        self.batches, self.device, autocast_for(self.cfg, self.device),
                        chunk_tokens=self.cfg.loss.chunk_tokens)


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
