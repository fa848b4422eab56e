import itertools
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sltrain.config import load_config
from sltrain.measure.tensor_bytes import LiveTensorBytes
from sltrain.model import build_model
from sltrain.parametrize import targeted_linears
from sltrain.parametrize.base import FactoredLinear
from sltrain.parametrize.sltrain import random_support

ROOT = Path(__file__).resolve().parents[1]

# Chi-square critical values at p = 1e-4 (a correct sampler fails one run in 10,000).
CHI2_1E4 = {19: 52.4, 27: 64.1, 55: 100.9}


def preset(method: str, **more) -> object:
    return load_config(None, {"model.preset": "llama-60m", "method.name": method, **more})


def small(method: str, **more) -> object:
    """For the methods that take an SVD or a top-k of each layer's dense init (slow on a CPU)."""
    return load_config(None, {"model.preset": "llama-9m", "model.n_layers": 2, "method.name": method,
                              **more})


def held_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def smallest_dense(cfg) -> int:
    """out * in of the smallest targeted linear of the dense model (counted on meta)."""
    dense = build_model(load_config(None, {"model.preset": cfg.model.preset, "method.name": "full"}),
                        device="meta")
    return min(m.in_features * m.out_features for _, m in targeted_linears(dense, cfg.method.targets))


@pytest.mark.parametrize("numel,nnz", [(20, 1), (20, 5), (20, 10), (20, 11), (20, 19), (20, 20),
                                       (1000, 30), (2**31 + 5, 1000)])
def test_support_is_exactly_nnz_sorted_distinct_and_seeded(numel, nnz):
    s = random_support(numel, nnz, seed=3)
    assert s.numel() == nnz and s.min() >= 0 and s.max() < numel
    assert torch.all(s[1:] > s[:-1])  # sorted and distinct
    assert torch.equal(s, random_support(numel, nnz, seed=3))
    if nnz < numel:  # one other seed may draw the same subset by chance; not five of them
        assert any(not torch.equal(s, random_support(numel, nnz, seed)) for seed in range(4, 9))


def test_support_sampling_memory_is_of_the_support_not_the_matrix():
    # randperm of 10^12 entries would need 8 TB; the sampler's work is O(nnz).
    with LiveTensorBytes() as m:
        s = random_support(10**12, 10_000, seed=0)
    assert s.numel() == 10_000 and torch.all(s[1:] > s[:-1])
    assert m.peak < 40 * 8 * 10_000


@pytest.mark.parametrize("numel,nnz", [(8, 3), (8, 6)])  # the direct and the complement draw
def test_support_is_a_uniform_subset(numel, nnz):
    """Every one of the C(numel, nnz) subsets is drawn equally often (chi-square, p = 1e-4)."""
    subsets = list(itertools.combinations(range(numel), nnz))
    draws = 100 * len(subsets)
    counts = Counter(tuple(random_support(numel, nnz, seed).tolist()) for seed in range(draws))
    assert set(counts) <= set(subsets)
    chi2 = sum((counts[s] - 100) ** 2 / 100 for s in subsets)
    assert chi2 < CHI2_1E4[len(subsets) - 1], chi2


def test_support_entries_are_uniform_in_a_larger_matrix():
    numel, nnz, draws = 20, 4, 5000  # several top-up rounds and drops at this density
    counts = torch.zeros(numel)
    for seed in range(draws):
        counts[random_support(numel, nnz, seed)] += 1
    expected = draws * nnz / numel
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_1E4[19], chi2


@pytest.mark.parametrize("method", ["sltrain", "lowrank", "sparse", "relora", "cola", "full"])
def test_init_never_allocates_a_factored_layers_dense_matrix(method):
    """Every tensor of >= out*in entries (the smallest targeted layer's) created while building
    is one of the built model's own (embeddings, lm_head; ReLoRA's frozen W), once each."""
    cfg = preset(method)
    with LiveTensorBytes(record_numel=smallest_dense(cfg)) as m:
        model = build_model(cfg)
    kept = [tuple(p.shape) for p in model.parameters() if p.numel() >= m.record_numel]
    assert sorted(a.shape for a in m.large) == sorted(kept), m.large
    assert m.peak <= 1.01 * held_bytes(model)  # the parameters, and small transients


def test_lost_and_the_magnitude_mask_hold_one_dense_layer_at_a_time():
    for cfg in (small("lost"), small("sparse", **{"method.mask": "magnitude"})):
        largest = max(m.in_features * m.out_features * 4 for m in build_model(cfg, "meta").modules()
                      if isinstance(m, FactoredLinear))
        with LiveTensorBytes() as m:
            model = build_model(cfg)
        # the dense init of one layer and its SVD / top-k workspace, never the dense model
        assert m.peak <= held_bytes(model) + 6 * largest, (m.peak - held_bytes(model)) / largest


def test_meta_build_allocates_nothing_and_dtype_is_honoured():
    with LiveTensorBytes() as m:
        meta = build_model(preset("sltrain"), device="meta")
    assert m.peak == 0 and all(p.is_meta for p in meta.parameters())
    model = build_model(preset("sltrain"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    layer = next(m for m in model.modules() if isinstance(m, FactoredLinear))
    assert layer.support.dtype == torch.int32


@pytest.mark.parametrize("method", ["sltrain", "full"])
def test_param_dtype_build_is_the_cast_float32_build_at_the_cast_models_memory(method):
    """`train --precision bf16` builds with param_dtype: each module drawn in float32 and cast at
    once. The values are the float32 build's, cast; the peak is the bf16 model plus one module's
    float32 transient (the largest: the embedding or the LM head), never the float32 model."""
    cfg = preset(method)
    ref = {k: (v.to(torch.bfloat16) if v.is_floating_point() and "rope" not in k else v)
           for k, v in build_model(cfg).state_dict().items()}
    with LiveTensorBytes() as m:
        model = build_model(cfg, param_dtype=torch.bfloat16)
    got = model.state_dict()
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    assert model.rope_cos.dtype == torch.float32
    largest = max(p.numel() for p in model.parameters())
    assert m.peak <= held_bytes(model) + 4 * largest + 2**20, (m.peak, held_bytes(model))


def test_same_seed_same_model_whatever_the_global_rng_and_another_seed_another():
    torch.manual_seed(1)
    a = build_model(preset("sltrain")).state_dict()
    torch.manual_seed(2)
    b = build_model(preset("sltrain")).state_dict()
    c = build_model(preset("sltrain", **{"train.seed": 1})).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("layers.0.self_attn.q_proj.support", "layers.0.self_attn.q_proj.A",
                "embed_tokens.weight"):
        assert not torch.equal(a[key], c[key])


def _close(t: torch.Tensor, mean: float, std: float) -> None:
    """Sample mean and std of `t` within 5 standard errors of Normal/uniform draws'."""
    t, n = t.detach().double(), t.numel()
    assert abs(t.mean().item() - mean) <= 5 * std / math.sqrt(n), (t.mean().item(), mean)
    assert abs(t.std().item() - std) <= 5 * std / math.sqrt(2 * n), (t.std().item(), std)


def test_sltrain_paper_init_starts_b_at_zero():
    model = build_model(small("sltrain", **{"method.b_init": "zero"}))
    layers = [m for m in model.modules() if hasattr(m, "b_init")]
    assert layers and all(m.b_init == "zero" and torch.all(m.B == 0) for m in layers)


@pytest.mark.parametrize("method", ["sltrain", "lowrank", "relora", "sparse", "lost", "cola",
                                    "full"])
def test_init_distributions_are_todays(method):
    cfg = small(method) if method == "lost" else preset(method)
    model = build_model(cfg)
    std, r = cfg.model.init_std, cfg.preset.rank
    _close(model.embed_tokens.weight, 0, std)
    _close(model.lm_head.weight, 0, std)
    assert torch.all(model.norm.weight == 1) and torch.all(model.layers[1].input_layernorm.weight == 1)
    uniform = 1 / math.sqrt(3)  # the std of U(-1, 1)
    for name, layer in model.named_modules():
        if not name.endswith(tuple(cfg.method.targets)):
            continue
        bound = 1 / math.sqrt(layer.in_features)
        if method == "full":
            _close(layer.weight, 0, std)
        elif method == "sltrain":  # --b-init uniform, the default
            _close(layer.A, 0, bound * uniform)
            _close(layer.values, 0, bound * uniform)
            _close(layer.B, 0, uniform / math.sqrt(r))
        elif method == "lowrank":
            _close(layer.A, 0, bound * uniform)
            _close(layer.B, 0, uniform / math.sqrt(r))
        elif method == "relora":
            _close(layer.weight, 0, std)
            _close(layer.A, 0, bound * uniform)
            assert torch.all(layer.B == 0)
        elif method == "sparse":
            _close(layer.values, 0, std)
        elif method == "cola":
            factor_std = (r * (layer.in_features + layer.out_features)) ** -0.25
            _close(layer.A, 0, factor_std)
            _close(layer.B, 0, factor_std)
        else:  # LOST: W0 ~ Normal(0, std) split exactly into B A + S plus the dropped tail
            assert 0 < layer.init_residual_rel < 1


def test_the_benchmark_measures_a_peak_near_the_parameter_bytes(tmp_path):
    """Peak RSS of a fresh process building llama-60m SLTrain, above its RSS before the build."""
    out = tmp_path / "init.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "init_memory.py"), "--configs",
                    "llama-60m:sltrain:float32", "--out", str(out)], check=True, capture_output=True)
    import json

    (row,) = json.loads(out.read_text())
    held = row["param_bytes"] + row["buffer_bytes"]
    # The old build (dense model first) peaked at ~2.3x these bytes at this size.
    assert row["peak_rss_above_start"] <= 1.25 * held + 16 * 2**20, row
