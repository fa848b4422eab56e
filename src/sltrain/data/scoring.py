"""Data pruning by EL2N and GraNd scores ("Deep Learning on a Data Diet: Finding Important Examples
Early in Training", Paul et al., 2021), for the training blocks of a run's data.

    sltrain data score runs/a runs/b --method el2n --keep 0.5 --out data/el2n-50
    sltrain train --data data/el2n-50 ...

A sample is one training block (seq_len inputs, seq_len next-token targets), as the run trained on.

- EL2N: the mean over the block's targets of || softmax(logits_t) - onehot(y_t) ||_2.
- GraNd: the L2 norm of the gradient of the block's mean loss w.r.t. every trainable parameter
  (one backward pass per block).

The paper averages the scores of several models trained briefly from different seeds: every run
or checkpoint given is scored and the scores are averaged. A high score marks a hard (or noisy)
sample; the paper keeps the hardest and drops the easiest (`drop="easy"`); `drop="hard"` keeps the
easiest and `drop="random"` is the baseline at the same size.

The pruned data is a token folder (the format of `sltrain data prepare --out`): train.bin holds
the kept blocks' seq_len input tokens in their original order followed by the one token after
the last kept block, so that `Blocks(train, seq_len)` reads back exactly the kept blocks' inputs.
Where two kept blocks were not adjacent, the last target of the first is the next kept block's
first token instead of its own (one target in seq_len). val.bin is the run's validation stream,
unchanged. Train on it with the same --seq-len.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sltrain.config import RunConfig
from sltrain.data import PreparedData, prepare, prepare_options, tokens
from sltrain.data import tokenizer as bpe
from sltrain.data.packing import Blocks
from sltrain.device import autocast_for, resolve_device
from sltrain.errors import UserError
from sltrain.files import writable_dir
from sltrain.run.folder import load_run_model
from sltrain.train.losses import IGNORE_INDEX, cross_entropy

METHODS = ("el2n", "grand")
DROPS = ("easy", "hard", "random")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_CHUNK_BLOCKS = 1 << 14  # blocks copied per write


def el2n(logits: torch.Tensor, targets: torch.Tensor,
         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per sample (row) of (batch, seq, vocab) logits: the mean over its kept targets of the L2
    norm of softmax(logits) - onehot(target). ||p - e_y||^2 = sum p^2 - 2 p_y + 1."""
    p = torch.softmax(logits.float(), dim=-1)
    keep = targets != ignore_index
    p_y = p.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    err = (p.square().sum(-1) - 2 * p_y + 1).clamp_min(0).sqrt()
    return torch.where(keep, err, 0.0).sum(1) / keep.sum(1).clamp_min(1)


def grand(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
          autocast: AbstractContextManager | None = None) -> torch.Tensor:
    """Per sample (row of x, y): the L2 norm of the gradient of its mean cross-entropy w.r.t. all
    trainable parameters of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(x.shape[0]):
        with autocast or torch.autocast(x.device.type, enabled=False):
            logits = model(x[i : i + 1])
        grads = torch.autograd.grad(cross_entropy(logits, y[i : i + 1]), params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.float().square().sum() for g in grads if g is not None)))
    return torch.stack(norms)


def score_blocks(model: nn.Module, blocks: Blocks, n: int, method: str, batch_size: int,
                 device: torch.device, autocast: AbstractContextManager,
                 progress: bool = False) -> np.ndarray:
    """Scores of the first `n` blocks, in order, as float64."""
    if method not in METHODS:
        raise UserError(f"unknown scoring method '{method}'; use one of {', '.join(METHODS)}")
    model.eval()
    out = np.empty(n, dtype=np.float64)
    for start in tqdm(range(0, n, batch_size), disable=not progress, unit="batch", leave=False,
                      desc=f"scoring ({method})"):
        x, y = blocks.batch(range(start, min(n, start + batch_size)))
        x, y = x.to(device), y.to(device)
        if method == "el2n":
            with torch.no_grad(), autocast:
                logits = model(x)
            s = el2n(logits, y)
        else:
            s = grand(model, x, y, autocast)
        out[start : start + len(s)] = s.detach().double().cpu().numpy()
    return out


def _load(paths: Sequence[Path]) -> list[tuple[nn.Module, RunConfig, Path]]:
    """The models of the runs/checkpoints, refusing ones that did not train on the same data."""
    if not paths:
        raise UserError("no run to score with; pass one or more run or checkpoint folders")
    loaded = [load_run_model(path) for path in paths]
    _, first, ckpt0 = loaded[0]
    tok0 = bpe.fingerprint(*bpe.load_tokenizer(ckpt0.parent.parent))
    for _, cfg, ckpt in loaded[1:]:
        same = (cfg.data.source, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.max_tokens) == \
            (first.data.source, first.data.seq_len, first.data.val_fraction, first.data.max_tokens)
        if not same or bpe.fingerprint(*bpe.load_tokenizer(ckpt.parent.parent)) != tok0:
            raise UserError(f"{ckpt} trained on other data, blocks or tokenizer than {ckpt0}; "
                            "score with runs of the same --data, --seq-len and tokenizer")
    return loaded


def score_runs(paths: Sequence[Path], method: str, max_blocks: int | None = None,
               batch_size: int | None = None, device: str = "auto",
               progress: bool = False) -> tuple[np.ndarray, PreparedData, RunConfig, list[str]]:
    """The scores of the run's training blocks (the first `max_blocks`) averaged over the models
    of `paths`, the run's data, the first run's config and the checkpoints used."""
    if method not in METHODS:
        raise UserError(f"unknown scoring method '{method}'; use one of {', '.join(METHODS)}")
    if max_blocks is not None and max_blocks < 1:
        raise UserError(f"--max-blocks {max_blocks} must be at least 1; omit it for all blocks")
    loaded = _load([Path(p) for p in paths])
    _, cfg, ckpt = loaded[0]
    dev = resolve_device(device)
    data = prepare(cfg.data, cfg.model_dims()["vocab_size"], ckpt.parent.parent,
                   **prepare_options(cfg))
    blocks = Blocks(data.train, cfg.data.seq_len)
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    if n == 0:
        raise UserError("the run's training split holds no block to score")
    bs = batch_size or cfg.train.batch_size
    total = np.zeros(n, dtype=np.float64)
    for model, run_cfg, _ in loaded:
        total += score_blocks(model.to(dev), blocks, n, method, bs, dev,
                              autocast_for(run_cfg, dev), progress)
        model.cpu()
    return total / len(loaded), data, cfg, [str(c) for _, _, c in loaded]


def _check_choice(keep: float, drop: str) -> None:
    if not 0 < keep <= 1:
        raise UserError(f"--keep {keep} must be a fraction in (0, 1]; e.g. --keep 0.5")
    if drop not in DROPS:
        raise UserError(f"unknown --drop '{drop}'; use one of {', '.join(DROPS)}")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not tokens.is_token_folder(out))):
        raise UserError(f"{out} exists and is not a prepared data folder; pass a new or empty --out")
    writable_dir(out, "--out", create=False)


def select(scores: np.ndarray, keep: float, drop: str = "easy", seed: int = 0) -> np.ndarray:
    """Indices of the blocks to keep, ascending: round(keep * n) of them (at least one), dropping
    the lowest scores ("easy"), the highest ("hard") or a random subset ("random")."""
    _check_choice(keep, drop)
    n = len(scores)
    k = max(1, round(keep * n))
    if drop == "random":
        kept = np.random.default_rng(seed).choice(n, size=k, replace=False)
    else:
        order = np.argsort(scores, kind="stable")  # easiest first; ties keep block order
        kept = order[n - k :] if drop == "easy" else order[:k]
    return np.sort(kept)


def write_pruned(data: PreparedData, seq_len: int, kept: np.ndarray, out: Path,
                 record: dict[str, Any]) -> dict[str, Any]:
    """Write the token folder `out` holding the kept blocks (see the module docstring)."""
    _check_out(out)
    writable_dir(out, "--out")
    stream, T = data.train, seq_len
    writers = {s: tokens.StreamWriter(out, s, stream.dtype) for s in tokens.SPLITS}
    try:
        for start in range(0, len(kept), _CHUNK_BLOCKS):
            idx = kept[start : start + _CHUNK_BLOCKS]
            writers["train"].append(stream[(idx[:, None] * T + np.arange(T)).ravel()])
        last = int(kept[-1]) * T + T
        writers["train"].append(np.asarray(stream[last : last + 1]))
        for i in range(0, len(data.val), 1 << 24):
            writers["val"].append(np.asarray(data.val[i : i + (1 << 24)]))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    splits = {s: {**w.close(), "complete": True} for s, w in writers.items()}
    bpe.save_tokenizer(data.tokenizer, data.eos_token, out, data.meta.get("tokenizer"))
    meta = {**data.meta, "splits": splits, "format": tokens.FORMAT,
            "tokenizer_sha256": bpe.fingerprint(data.tokenizer, data.eos_token),
            "pruned": {**record, "seq_len": seq_len, "kept_blocks": int(len(kept))},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tokens.write_atomic(out / tokens.META, json.dumps(meta, indent=2))
    return meta


def summary(scores: np.ndarray) -> dict[str, Any]:
    q = np.quantile(scores, QUANTILES)
    return {"count": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max()),
            "quantiles": {f"{p:g}": float(v) for p, v in zip(QUANTILES, q, strict=True)}}


def score_and_prune(paths: Sequence[Path], method: str, keep: float, out: Path,
                    drop: str = "easy", max_blocks: int | None = None,
                    batch_size: int | None = None, device: str = "auto", seed: int = 0,
                    progress: bool = False) -> dict[str, Any]:
    """`sltrain data score`: write out/scores.npy, out/scores.json and the pruned token folder."""
    _check_choice(keep, drop)  # refuse before the (slow) scoring
    _check_out(out)
    scores, data, cfg, sources = score_runs(paths, method, max_blocks, batch_size, device, progress)
    kept = select(scores, keep, drop, seed)
    record = {"method": method, "sources": sources, "keep": keep, "drop": drop, "seed": seed,
              "data": cfg.data.source, "scored_blocks": int(scores.size)}
    write_pruned(data, cfg.data.seq_len, kept, out, record)
    np.save(out / "scores.npy", scores)
    report = {**record, **summary(scores), "seq_len": cfg.data.seq_len,
              "kept_blocks": int(len(kept)), "kept_mean": float(scores[kept].mean())}
    tokens.write_atomic(out / "scores.json", json.dumps(report, indent=2))
    return report
