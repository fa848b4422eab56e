"""Model health metrics: kurtosis, weight spectra with SLTrain's parts, output nuclear norm."""

import json
import math

import pytest
import torch

from sltrain.cli import main
from sltrain.config import load_config
from sltrain.measure.health import excess_kurtosis, output_nuclear_norm, weight_spectra
from sltrain.model import build_model
from sltrain.parametrize.sltrain import SparseLowRankLinear
from sltrain.train import train


def test_excess_kurtosis_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    assert excess_kurtosis(torch.randn(1_000_000, generator=g)) == pytest.approx(0.0, abs=0.05)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1_000_000,))
    assert excess_kurtosis(laplace) == pytest.approx(3.0, abs=0.15)
    assert excess_kurtosis(2.5 * laplace + 7) == pytest.approx(excess_kurtosis(laplace), rel=1e-6)


def test_output_nuclear_norm_bounds():
    n, v = 32, 64
    confident_distinct = torch.full((n, v), -1e4)
    confident_distinct[torch.arange(n), torch.arange(n)] = 0.0  # one-hot, all different
    assert output_nuclear_norm(confident_distinct) == pytest.approx(1.0, abs=1e-9)
    same = torch.randn(1, v).expand(n, v)  # one distribution everywhere: rank one
    p = torch.softmax(same[0].double(), -1)
    assert output_nuclear_norm(same) == pytest.approx(p.norm().item() / math.sqrt(n), rel=1e-9)


def test_weight_spectra_split_sltrain_layers_into_their_parts():
    cfg = load_config(None, {"model.dim": 64, "model.n_layers": 1, "model.n_heads": 4,
                             "model.ffn_dim": 128, "model.vocab_size": 64, "method.rank": 8,
                             "method.density": 0.1})
    model = build_model(cfg)
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, SparseLowRankLinear)
    torch.nn.init.normal_(layer.B)  # B starts at zero: give the low-rank part some weight
    spectra = weight_spectra(model)
    s = spectra["layers.0.self_attn.q_proj"]
    w = layer.dense_weight().double()
    assert s["weight"] == pytest.approx(torch.linalg.svdvals(w).tolist(), rel=1e-9)
    low = (layer.B @ layer.A).double() * layer.scaling
    assert len(s["low_rank"]) == 8
    assert s["low_rank"] == pytest.approx(torch.linalg.svdvals(low)[:8].tolist(), rel=1e-9)
    assert s["low_rank_share"] == pytest.approx((low.pow(2).sum() / w.pow(2).sum()).item(), rel=1e-9)
    assert sum(1 for x in s["sparse"] if x > 1e-9) <= 64
    assert "lm_head" not in spectra and len(spectra) == 7


def test_health_during_training_and_after(tiny, tmp_path, capsys):
    train(load_config(None, {**tiny, "train.steps": 4, "train.eval_every": 2, "train.health": True}))
    run = tmp_path / "run"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(len(r["kurtosis"]) == 2 and 0 < r["output_nuclear_norm"] <= 1 for r in evals)
    assert main(["health", str(run), "--out", str(tmp_path / "h")]) == 0
    png = (tmp_path / "h" / "spectrum.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = json.loads((tmp_path / "h" / "health.json").read_text())
    assert 0 < report["weights"]["layers.1.mlp.down_proj"]["low_rank_share"] < 1
    assert main(["health", str(run), "--layers", "layers.9.mlp.up_proj"]) == 2
    assert "no learned weight named layers.9.mlp.up_proj" in capsys.readouterr().err
