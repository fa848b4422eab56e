import pytest
import torch

from sltrain.config import PRESETS, load_config
from sltrain.measure import count_parameters
from sltrain.model import build_model
from sltrain.parametrize import merge


def formula(preset: str, method: str) -> int:
    """Parameter count of a LLaMA preset under a parameterisation, by hand."""
    p = PRESETS[preset]
    d, f, r = p.dim, p.ffn_dim, p.rank
    shapes = [(d, d)] * 4 + [(d, f)] * 3  # q, k, v, o; gate, up, down (in/out order is moot)
    if method == "full":
        linear = sum(a * b for a, b in shapes)
    elif method == "lowrank":
        linear = sum(r * (a + b) for a, b in shapes)
    else:
        linear = sum(r * (a + b) + round(p.density * a * b) for a, b in shapes)
    return 2 * p.vocab_size * d + p.n_layers * (linear + 2 * d) + d


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain"])
def test_counts_equal_formula(preset, method):
    cfg = load_config(None, {"model.preset": preset, "method.name": method})
    counts = count_parameters(build_model(cfg, device="meta"))
    assert counts["total"] == counts["trainable"] == formula(preset, method)


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("llama-60m", (58.1, 42.8, 43.5)),
        ("llama-130m", (134.1, 94.0, 96.5)),
        ("llama-350m", (368.0, 185.2, 194.3)),
        ("llama-1b", (1339.1, 609.3, 645.5)),
        ("llama-7b", (6738.4, 2820.9, 3144.7)),
    ],
)
def test_counts_match_published(preset, expected):
    """REFERENCE.md §1: full / low-rank / SLTrain counts in millions (7B with delta 0.05)."""
    got = []
    for method in ("full", "lowrank", "sltrain"):
        cfg = load_config(None, {"model.preset": preset, "method.name": method})
        got.append(round(count_parameters(build_model(cfg, device="meta"))["total"] / 1e6, 1))
    assert tuple(got) == expected


def test_embeddings_head_and_norms_stay_dense():
    cfg = load_config(None, {"model.preset": "llama-9m"})
    model = build_model(cfg)
    names = {type(m).__name__ for m in model.modules()}
    assert "SparseLowRankLinear" in names
    assert type(model.lm_head).__name__ == "Linear" and type(model.embed_tokens).__name__ == "Embedding"
    assert all(type(m).__name__ == "SparseLowRankLinear" for n, m in model.named_modules()
               if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))


def test_model_merge_gives_same_logits():
    torch.manual_seed(0)
    for method in ("lowrank", "sltrain"):
        cfg = load_config(None, {"model.preset": "llama-9m", "model.vocab_size": 100,
                                 "method.name": method, "data.seq_len": 16})
        model = build_model(cfg).double()
        for m in model.modules():  # move away from the zero-B init so the low-rank path counts
            if hasattr(m, "B"):
                torch.nn.init.normal_(m.B, std=0.1)
        idx = torch.randint(0, 100, (2, 16))
        before = model(idx)
        merge(model)
        assert not any(hasattr(m, "B") for m in model.modules())
        torch.testing.assert_close(model(idx), before, rtol=1e-10, atol=1e-10)


def test_model_is_causal():
    cfg = load_config(None, {"model.preset": "llama-9m", "model.vocab_size": 100, "data.seq_len": 16})
    model = build_model(cfg)
    idx = torch.randint(0, 100, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 100
    torch.testing.assert_close(model(idx)[0, :10], model(changed)[0, :10])
    assert not torch.allclose(model(idx)[0, 10:], model(changed)[0, 10:])
