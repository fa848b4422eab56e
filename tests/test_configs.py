"""The named recipes in configs/: every file validates, builds its model and optimizer on meta.

Cheap (nothing is allocated, no data is read); the paper sizes follow REFERENCE.md section 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sltrain.config import load_config
from sltrain.measure import count_parameters
from sltrain.model import build_model
from sltrain.optim import validate

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

# SLTrain paper (REFERENCE.md section 1): steps, warm-up, rank, alpha, density, parameters (M).
PAPER = {
    "llama-60m": (11_000, 1_100, 128, 32, 0.03, 43.5),
    "llama-130m": (22_000, 2_200, 256, 16, 0.03, 96.5),
    "llama-350m": (65_000, 6_500, 256, 16, 0.03, 194.3),
    "llama-1b": (140_000, 10_000, 512, 8, 0.03, 645.5),
    "llama-7b": (150_000, 15_000, 1024, 8, 0.05, 3144.7),
}


def test_recipes_are_found():
    names = {p.stem for p in CONFIGS}
    assert {"sltrain-cpu", "llama-60m-sltrain", "llama-60m-full", "llama-60m-galore",
            "llama-7b-sltrain-8bit-per-layer"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_validates_and_builds_on_meta(path: Path):
    cfg = load_config(path)
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    validate(cfg, model)  # the optimizer checks `sltrain train` makes before it reads any data


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith(tuple(PAPER))],
                         ids=lambda p: p.stem)
def test_paper_recipe_has_the_paper_setup(path: Path):
    cfg = load_config(path)
    steps, warmup, rank, alpha, density, params_m = PAPER[cfg.model.preset]
    assert (cfg.train.steps, cfg.warmup_steps) == (steps, warmup)
    assert cfg.data.seq_len == 256 and cfg.train.batch_size * cfg.train.grad_accum == 512
    assert cfg.data.source == "hf:allenai/c4:en" and cfg.data.tokenizer == "t5-base"
    assert cfg.schedule.name == "cosine" and cfg.schedule.min_lr_ratio == 0.1
    assert cfg.optimizer.weight_decay == 0.0
    if cfg.method.name == "sltrain":
        assert (cfg.rank, cfg.lora_alpha, cfg.density) == (rank, alpha, density)
        total = count_parameters(build_model(cfg, device="meta"))["total"]
        assert round(total / 1e6, 1) == params_m
