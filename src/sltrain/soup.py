"""Model soups: average the dense weights of several checkpoints of one architecture.

Implements the uniform and greedy soups of "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time" (Wortsman et al., ICML 2022).

Every re-parameterised layer is folded to its dense weight (`parametrize.merge`) before averaging:
the mean of s*B@A + S over ingredients is a weight, while the mean of the Bs times the mean of the
As is not, and SLTrain ingredients of different seeds do not even share a sparse support. The soup
is therefore a dense (`full`) run folder that `sltrain eval` and `sltrain export` read.

    sltrain soup runs/seed0 runs/seed1 runs/seed2 --out runs/soup                 # uniform
    sltrain soup runs/a/checkpoints/step_* --recipe greedy --out runs/greedy-soup
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sltrain.config import RunConfig, build_config
from sltrain.data.tokenizer import fingerprint as tokenizer_fingerprint
from sltrain.data.tokenizer import load_tokenizer
from sltrain.errors import UserError
from sltrain.evaluate import check_max_batches, eval_set, run_eval_config
from sltrain.files import writable_dir
from sltrain.model import build_model
from sltrain.parametrize import merge
from sltrain.run.folder import load_run_model, save_model_run

RECIPES = ("uniform", "greedy")
SOUP_FILE = "soup.json"


@dataclass
class Ingredient:
    path: Path  # as given: a run folder or a checkpoint folder
    checkpoint: Path
    cfg: RunConfig
    weights: dict[str, torch.Tensor]  # the merged dense state dict, on the CPU


def load_ingredient(path: Path) -> Ingredient:
    """A checkpoint (or a run's newest) with every factored layer folded to its dense weight."""
    model, cfg, ckpt = load_run_model(path)
    merge(model)
    return Ingredient(path, ckpt, cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()})


def check_compatible(ingredients: list[Ingredient]) -> None:
    """One architecture and one tokenizer, or one UserError naming the first difference."""
    first = ingredients[0]
    dims = first.cfg.model_dims()
    tok = tokenizer_fingerprint(*load_tokenizer(first.checkpoint.parent.parent))
    for other in ingredients[1:]:
        theirs = other.cfg.model_dims()
        diff = next((k for k in dims if dims[k] != theirs[k]), None)
        if diff is not None:
            raise UserError(f"{other.path} has model {diff} {theirs[diff]} but {first.path} has "
                            f"{dims[diff]}; a soup needs checkpoints of one architecture")
        if tokenizer_fingerprint(*load_tokenizer(other.checkpoint.parent.parent)) != tok:
            raise UserError(f"{other.path} was trained with another tokenizer than {first.path}; "
                            "a soup needs checkpoints of one tokenizer (same data and vocabulary)")
        if other.weights.keys() != first.weights.keys():
            raise UserError(f"{other.path} holds other weights than {first.path}; a soup needs "
                            "checkpoints of one architecture")


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts (summed in float64, returned in each tensor's dtype);
    non-float tensors must agree and are copied."""
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            if any(not torch.equal(s[name], first) for s in states[1:]):
                raise UserError(f"the ingredients differ in the non-float tensor {name}, which "
                                "cannot be averaged; soup checkpoints of one architecture")
            out[name] = first.clone()
            continue
        total = torch.zeros_like(first, dtype=torch.float64)
        for s in states:
            total += s[name].to(torch.float64)
        out[name] = (total / len(states)).to(first.dtype)
    return out


def soup_config(cfg: RunConfig) -> RunConfig:
    """The config of a dense model of `cfg`'s architecture: its method is `full`."""
    tree = cfg.to_dict()
    tree["method"]["name"] = "full"
    return build_config(tree)


def dense_model(cfg: RunConfig, weights: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(soup_config(cfg))
    model.load_state_dict(weights)
    return model.eval()


class Evaluator:
    """Validation loss of dense weights on one fixed set of blocks (`sltrain eval`'s defaults:
    the first ingredient's data, split and block length, with `overrides` on top)."""

    def __init__(self, first: Ingredient, overrides: dict[str, Any], max_batches: int | None):
        run_cfg = first.cfg
        self.set = eval_set(run_eval_config(run_cfg, overrides), run_cfg.model_dims()["vocab_size"],
                            run_cfg.data.seq_len, first.checkpoint.parent.parent, "val",
                            max_batches, split_flag=False)
        self.arch = run_cfg

    def __call__(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.set.evaluate(dense_model(self.arch, weights))


def make_soup(paths: list[Path], out: Path, recipe: str = "uniform",
              overrides: dict[str, Any] | None = None,
              max_batches: int | None = None) -> dict[str, Any]:
    """Average the checkpoints at `paths` by `recipe`, write the dense soup run folder `out`, and
    return the record also written to out/soup.json."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)}")
    if not paths:
        raise UserError("a soup needs at least one checkpoint; pass run or checkpoint folders")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pass a new --out")
    writable_dir(out, "--out", create=False)
    check_max_batches(max_batches)
    ingredients = [load_ingredient(p) for p in paths]
    check_compatible(ingredients)
    evaluator = Evaluator(ingredients[0], dict(overrides or {}), max_batches)
    scores = [evaluator(i.weights) for i in ingredients]

    trials = []  # greedy: each candidate soup's loss, kept or not
    if recipe == "uniform":
        kept = list(range(len(ingredients)))
        weights = average([i.weights for i in ingredients])
        result = evaluator(weights)
    else:
        # Best first; each next ingredient joins only if the soup's loss does not rise.
        order = sorted(range(len(ingredients)), key=lambda i: scores[i]["val_loss"])
        kept, weights, result = [order[0]], ingredients[order[0]].weights, scores[order[0]]
        for i in order[1:]:
            candidate = average([ingredients[j].weights for j in [*kept, i]])
            trial = evaluator(candidate)
            better = trial["val_loss"] <= result["val_loss"]
            trials.append({"added": i, "val_loss": trial["val_loss"], "val_ppl": trial["val_ppl"],
                           "kept": better})
            if better:
                kept, weights, result = [*kept, i], candidate, trial

    first = ingredients[0]
    cfg = soup_config(first.cfg)
    ckpt = save_model_run(weights, cfg, out, first.checkpoint, {"command": "soup", "recipe": recipe})
    record = {
        "recipe": recipe,
        "checkpoint": str(ckpt),
        "eval": {"data": evaluator.set.cfg.data.source, "split": "val",
                 "seq_len": evaluator.set.cfg.data.seq_len, "blocks": evaluator.set.n_blocks,
                 "tokens": result["val_tokens"]},
        "ingredients": [{"path": str(i.path), "checkpoint": str(i.checkpoint),
                         "method": i.cfg.method.name, "seed": i.cfg.train.seed,
                         "val_loss": s["val_loss"], "val_ppl": s["val_ppl"], "kept": n in kept}
                        for n, (i, s) in enumerate(zip(ingredients, scores, strict=True))],
        "kept": kept,
        "greedy_trials": trials,
        "soup": {"val_loss": result["val_loss"], "val_ppl": result["val_ppl"]},
    }
    (out / SOUP_FILE).write_text(json.dumps(record, indent=2))
    return record
