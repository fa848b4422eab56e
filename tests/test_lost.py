import json

import pytest
import torch
from torch import nn

from sltrain.cli import main
from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.measure import count_parameters, estimate_memory, measure_memory
from sltrain.model import build_model
from sltrain.optim.tricks import refactor_
from sltrain.parametrize import merge
from sltrain.parametrize.lost import LOSTLinear, kept_channels
from sltrain.registry import METHODS
from sltrain.run.folder import load_run_model
from sltrain.train import train


def dense(out_features=40, in_features=56, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False).double()
    nn.init.normal_(linear.weight, std=0.02)
    return linear


def lost(linear, rank=8, density=0.25) -> LOSTLinear:
    return LOSTLinear.from_linear(linear, rank=rank, lora_alpha=32.0, density=density, seed=0)


def test_registered():
    assert METHODS["lost"].obj is LOSTLinear
    assert kept_channels(56, 0.25) == 14 and kept_channels(56, 0.001) == 1 and kept_channels(56, 1.0) == 56


@pytest.mark.parametrize("shape", [(40, 56), (56, 40)])
def test_init_reproduces_dense_up_to_the_reported_tail(shape):
    linear = dense(*shape)
    W = linear.weight.detach().clone()
    layer = lost(linear, rank=8, density=0.25)
    k = round(0.25 * shape[1])
    assert layer.C.shape == (shape[0], k) and layer.channels.shape == (k,)
    tail = (W - layer.dense_weight()).norm().item()
    assert abs(tail - layer.init_residual_norm) < 1e-5
    assert abs(layer.init_residual_rel - tail / W.norm().item()) < 1e-12
    # Independently: the residual is the SVD tail U_t S_t V_t^T; the layer keeps its k columns of
    # largest norm and drops the rest, so the tail norm is that of the dropped columns.
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    residual = U[:, 8:] @ torch.diag(S[8:]) @ Vh[8:]
    col = residual.norm(dim=0)
    kept = col.topk(k).indices
    assert set(layer.channels.tolist()) == set(kept.tolist())
    dropped = torch.ones(shape[1], dtype=torch.bool)
    dropped[kept] = False
    assert abs(col[dropped].pow(2).sum().sqrt().item() - tail) < 1e-5
    # The low-rank part is the best rank-8 approximation, split evenly between B and A.
    torch.testing.assert_close(layer.B @ layer.A, U[:, :8] @ torch.diag(S[:8]) @ Vh[:8])
    torch.testing.assert_close(layer.B.t() @ layer.B, layer.A @ layer.A.t())
    # The kept channels carry exactly the residual's columns.
    torch.testing.assert_close(layer.C, residual[:, layer.channels])
    assert 0 < tail < (W - U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]).norm().item()


def test_full_rank_is_exact():
    linear = dense(40, 56)
    layer = lost(linear, rank=40, density=0.1)
    assert (layer.dense_weight() - linear.weight).abs().max() < 1e-12
    assert layer.init_residual_norm < 1e-12


def test_forward_and_gradients_match_dense_reference():
    layer = lost(dense(40, 56))
    with torch.no_grad():  # move off the SVD init so every part matters independently
        for p in (layer.A, layer.B, layer.C):
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 5, 56, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    A = layer.A.detach().clone().requires_grad_()
    B = layer.B.detach().clone().requires_grad_()
    C = layer.C.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    W = (B @ A).index_add(1, layer.channels, C)
    torch.testing.assert_close(W.detach(), layer.dense_weight(), rtol=0, atol=1e-12)
    y = xr @ W.t()
    torch.testing.assert_close(layer(x).detach(), y.detach(), rtol=0, atol=1e-5)
    (y * g).sum().backward()
    for got, want in ((x.grad, xr.grad), (layer.A.grad, A.grad), (layer.B.grad, B.grad),
                      (layer.C.grad, C.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The gradient of C is the dense weight gradient read at the kept columns.
    G = torch.einsum("bto,bti->oi", g, x.detach())
    torch.testing.assert_close(layer.C.grad, G[:, layer.channels], rtol=0, atol=1e-10)


def test_merged_and_refactored_keep_the_function():
    layer = lost(dense(40, 56))
    x = torch.randn(4, 56, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(layer.merged()(x), y, rtol=0, atol=1e-12)
    with torch.no_grad():
        layer.A.mul_(torch.linspace(0.5, 2.0, 8, dtype=torch.float64)[:, None])
    before = layer.dense_weight()
    refactor_(layer)
    assert (layer.dense_weight() - before).abs().max() < 1e-5


def test_from_meta_linear_has_shapes_only():
    with torch.device("meta"):
        layer = LOSTLinear.from_linear(nn.Linear(56, 40, bias=False), rank=8, density=0.25)
    assert layer.A.shape == (8, 56) and layer.B.shape == (40, 8) and layer.C.shape == (40, 14)
    assert layer.channels.shape == (14,)


def test_parameter_count_equals_formula():
    cfg = load_config(None, {"model.preset": "llama-60m", "method.name": "lost"})
    p, r, delta = cfg.preset, cfg.rank, cfg.density
    counts = count_parameters(build_model(cfg, device="meta"))
    shapes = [(p.dim, p.dim)] * 4 + [(p.dim, p.ffn_dim)] * 2 + [(p.ffn_dim, p.dim)]  # (in, out)
    linear = sum(r * (i + o) + o * round(delta * i) for i, o in shapes)
    total = 2 * p.vocab_size * p.dim + p.n_layers * (linear + 2 * p.dim) + p.dim
    assert counts["total"] == counts["trainable"] == total
    assert counts["sparse"] == p.n_layers * sum(o * round(delta * i) for i, o in shapes)
    assert counts["sparse_indices"] == p.n_layers * sum(round(delta * i) for i, _ in shapes)


def test_memory_estimate_equals_live_tensors_and_command_reports_it(capsys):
    cfg = load_config(None, {"model.preset": "llama-9m", "model.vocab_size": 200,
                             "method.name": "lost", "data.seq_len": 16})
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 200, (2, 16))).sum().backward()
    opt.step()
    live = measure_memory(model, opt)
    assert live == estimate_memory(model, torch.float32) == estimate_memory(build_model(cfg, device="meta"))
    assert live.sparse_indices == 8 * count_parameters(model)["sparse_indices"] > 0  # int64
    capsys.readouterr()
    assert main(["memory", "--model", "llama-9m", "--method", "lost", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "lost" and report["density"] == cfg.density
    meta = build_model(load_config(None, {"model.preset": "llama-9m", "method.name": "lost"}), device="meta")
    assert report["params"] == count_parameters(meta)
    assert report["bytes"]["sparse_indices"] == 8 * report["params"]["sparse_indices"]


def test_model_merge_gives_same_logits():
    cfg = load_config(None, {"model.preset": "llama-9m", "model.vocab_size": 100,
                             "method.name": "lost", "data.seq_len": 16})
    torch.manual_seed(0)
    model = build_model(cfg).double()
    layers = [m for m in model.modules() if isinstance(m, LOSTLinear)]
    assert len(layers) == 7 * cfg.preset.n_layers
    assert all(0 < m.init_residual_rel < 1 for m in layers)
    idx = torch.randint(0, 100, (2, 16))
    before = model(idx)
    merge(model)
    assert not any(isinstance(m, LOSTLinear) for m in model.modules())
    torch.testing.assert_close(model(idx), before, rtol=1e-10, atol=1e-10)


def test_short_run_lowers_loss_and_resumes_the_channels(tiny, tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(None, {**tiny, "method.name": "lost", "method.density": 0.25,
                             "train.steps": 30})
    summary = train(cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line)["loss"] for line in lines]
    assert sum(history[-5:]) / 5 < history[0] - 0.5, history
    assert summary["val_loss"] < history[0] - 0.5
    assert summary["params"]["sparse"] > 0
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000030" / "model.safetensors"))
    channels = [k for k in weights if k.endswith("channels")]
    assert channels and all(weights[k].numel() == (32 if "down_proj" in k else 16) for k in channels)
    # another seed's dense init picks other channels; loading restores the run's (the init is
    # drawn from train.seed, whatever the global RNG)
    model = build_model(load_config(None, {**tiny, "method.name": "lost", "method.density": 0.25,
                                           "train.seed": 123}))
    assert any(not torch.equal(b, weights[n]) for n, b in model.named_buffers() if n in channels)
    model.load_state_dict(weights)
    assert all(torch.equal(b, weights[n]) for n, b in model.named_buffers() if n in channels)
    # what export does: rebuild the run's model from its checkpoint and fold it dense
    ours, _, _ = load_run_model(tmp_path / "run")
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        before = ours(ids)
        torch.testing.assert_close(merge(ours)(ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, words", [
    ({"method.rank": 10_000}, "rank 10000 is impossible"),
    ({"method.density": 1.5}, "density"),
    ({"method.density": 0.0}, "density"),
])
def test_impossible_rank_or_density_refused_in_one_line(overrides, words):
    with pytest.raises(UserError, match=words) as err:
        build_model(load_config(None, {"model.preset": "llama-9m", "method.name": "lost", **overrides}),
                    device="meta")
    assert "\n" not in str(err.value)
