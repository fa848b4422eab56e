"""CoLA and CoLA-M (sltrain.parametrize.cola): the layer is B·σ(A·x), CoLA-M has CoLA's gradients
without keeping σ(A·x), the counts (parameters, FLOPs, bytes) are what runs, every path to a dense
model refuses in one line, and a short run learns."""

import json

import pytest
import torch
from conftest import LiveGradients, assert_one_line_error, sltrain
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.measure import count_parameters, estimate_memory, measure_memory
from sltrain.measure.flops import model_flops
from sltrain.model import build_model
from sltrain.optim import tricks
from sltrain.parametrize.cola import SILU_BACKWARD_FLOPS, SILU_FLOPS, CoLALinear, CoLAMLinear
from sltrain.run.folder import init_weights_from
from sltrain.train import prune, train

METHODS = ["cola", "cola_m"]
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 256, "method.rank": 16, "data.seq_len": 16}


def pair(in_features=40, out_features=24, rank=6, dtype=torch.float64):
    """A CoLA and a CoLA-M layer holding the same factors."""
    torch.manual_seed(0)
    cola = CoLALinear(in_features, out_features, rank, dtype=dtype)
    cola_m = CoLAMLinear(in_features, out_features, rank, dtype=dtype)
    cola_m.load_state_dict(cola.state_dict())
    return cola, cola_m


@pytest.mark.parametrize("cls", [CoLALinear, CoLAMLinear])
def test_forward_and_gradients_are_b_silu_a_x(cls):
    torch.manual_seed(1)
    layer = cls(40, 24, 6, dtype=torch.float64)
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    A, B = (layer.A.detach().clone().requires_grad_(), layer.B.detach().clone().requires_grad_())
    x_ref = x.detach().clone().requires_grad_()
    h = x_ref @ A.t()
    ref = (h * torch.sigmoid(h)) @ B.t()  # plain torch: B σ(A x), σ(h) = h sigmoid(h)
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for ours, theirs in ((x.grad, x_ref.grad), (layer.A.grad, A.grad), (layer.B.grad, B.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_cola_m_gradients_equal_colas_in_float32_and_under_autocast():
    cola, cola_m = pair(dtype=torch.float32)
    x = torch.randn(4, 7, 40)
    for autocast in (False, True):
        grads = []
        for layer in (cola, cola_m):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = layer(xi)
            assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
            y.float().square().sum().backward()
            grads.append((y.detach().float(), xi.grad, layer.A.grad, layer.B.grad))
        assert all(g.dtype == torch.float32 for g in grads[1][1:])  # grads in the params' dtype
        tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(*grads, strict=True):
            torch.testing.assert_close(ours, theirs, **tol)


def saved_bytes(layer, x):
    """Bytes of the activations (not the parameters) autograd keeps for the layer's backward."""
    params = {p.data_ptr() for p in layer.parameters()}
    total = []

    def pack(t):
        if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(total)


def test_cola_m_does_not_keep_the_low_rank_activation():
    cola, cola_m = pair(in_features=64, out_features=48, rank=8, dtype=torch.float32)
    x = torch.randn(2, 10, 64, requires_grad=True)
    # CoLA keeps h = A x (for σ') and σ(h) (for B's gradient): 2 r floats per token.
    assert saved_bytes(cola, x) == 2 * 8 * 20 * 4
    assert saved_bytes(cola_m, x) == 0  # only x, A, B, which the layer holds anyway


def test_init_is_the_authors():
    layer = CoLALinear(1024, 512, 256)
    std = (256 * (1024 + 512)) ** -0.25
    for p in (layer.A, layer.B):
        assert p.mean().abs() < 0.01 * std and p.std().item() == pytest.approx(std, rel=0.01)
    with torch.no_grad():  # B A has entries of std 1/sqrt(in + out)
        assert (layer.B @ layer.A).std().item() == pytest.approx((1024 + 512) ** -0.5, rel=0.02)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_counts_are_the_factors(method):
    cfg = load_config(None, {**TINY, "method.name": method})
    model = build_model(cfg, device="meta")
    d, f, r, v, n = 64, 128, 16, 256, 2
    per_block = 4 * r * (d + d) + 3 * r * (d + f) + 2 * d  # q k v o, gate up down, two norms
    assert count_parameters(model) == {"total": 2 * v * d + d + n * per_block,
                                       "trainable": 2 * v * d + d + n * per_block,
                                       "sparse": 0, "sparse_indices": 0}


def test_flops_per_token_by_hand_at_the_llama_cpu_shape():
    cola, cola_m = CoLALinear(256, 688, 64, device="meta"), CoLAMLinear(256, 688, 64, device="meta")
    # forward: x A^T is 64 x 256 multiply-adds, then B is 688 x 64; SiLU 4 per activation
    assert cola.flops_per_token(2048) == 2 * 64 * 256 + 2 * 688 * 64 + 4 * 64 == 121_088
    # backward: dB = g^T s, ds = g B, dA = dh^T x, dx = dh A; σ' 8 per activation
    assert cola.backward_flops_per_token(2048) == 2 * (2 * 688 * 64) + 2 * (2 * 64 * 256) + 8 * 64
    # CoLA-M first recomputes h = A x and σ(h)
    assert cola_m.backward_flops_per_token(2048) == (cola.backward_flops_per_token(2048)
                                                     + 2 * 64 * 256 + 4 * 64)
    dense = 2 * 256 * 688
    assert cola.flops_per_token(2048) / dense == pytest.approx(0.344, abs=1e-3)


@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain", "relora", "cola", "cola_m"])
def test_model_flops_are_what_a_training_step_runs(method):
    cfg = load_config(None, {**TINY, "method.name": method, "optimizer.reset_every": 5})
    model = build_model(cfg)
    batch, T = 3, 16
    idx = torch.randint(0, 256, (batch, T))
    # The math kernel runs attention as matmuls the counter sees (the CPU fused one it does not).
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            logits = model(idx)
        with FlopCounterMode(display=False) as bwd:
            logits.sum().backward()
    counts = model_flops(model, T, batch)
    silu = sum(m.rank for m in model.modules() if isinstance(m, CoLALinear))
    recompute = sum(m.rank for m in model.modules() if isinstance(m, CoLAMLinear))
    tokens = batch * T
    assert counts["forward"] == pytest.approx(fwd.get_total_flops() / tokens + SILU_FLOPS * silu)
    assert counts["backward"] == pytest.approx(bwd.get_total_flops() / tokens
                                               + SILU_BACKWARD_FLOPS * silu + SILU_FLOPS * recompute)
    assert counts["train"] == pytest.approx(counts["forward"] + counts["backward"])
    if method == "full":  # the 6 N rule, N the matmul weights, plus attention's 3 x 4 T d L
        n = sum(p.numel() for name, p in model.named_parameters() if name.endswith("proj.weight")
                or name == "lm_head.weight")
        assert counts["train"] == pytest.approx(6 * n + 12 * T * 64 * 2)


@pytest.mark.parametrize("method", METHODS)
def test_memory_estimate_equals_live_tensors_after_a_step(method):
    cfg = load_config(None, {**TINY, "method.name": method})
    model = build_model(cfg)
    watch = LiveGradients(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 16))).float().sum().backward()
    grads = watch.alive_bytes()
    opt.step()
    live = measure_memory(model, opt)
    assert estimate_memory(model).gradients == grads
    assert live == estimate_memory(model) == estimate_memory(build_model(cfg, device="meta"))


def test_memory_command_prints_flops(capsys):
    assert sltrain("memory", "--method", "cola", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert sltrain("memory", "--method", "full", "--json") == 0
    dense = json.loads(capsys.readouterr().out)
    assert report["rank"] == 64 and report["flops_per_token"]["linears"] < dense["flops_per_token"]["linears"]
    assert sltrain("memory", "--method", "cola_m") == 0
    assert "FLOPs per token: forward" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cola_run(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cola") / "run"
    cfg = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
           "model.vocab_size": 512, "method.rank": 16, "method.name": "cola",
           "data.source": str(small_corpus), "data.seq_len": 32, "train.batch_size": 8,
           "train.steps": 2, "train.eval_every": 0, "train.eval_batches": 2,
           "train.progress": False, "train.out_dir": str(out)}
    train(load_config(None, cfg))
    return out, cfg


def test_every_way_to_a_dense_model_refuses_in_one_line(cola_run, tmp_path, capsys):
    run, cfg = cola_run
    why = ("method cola has a non-linearity between its factors", "no dense form")
    assert_one_line_error(capsys, sltrain("export", run, "--to", "hf", tmp_path / "hf"), *why)
    assert_one_line_error(capsys, sltrain("densify", run, "--out", tmp_path / "dense"), *why)
    assert_one_line_error(capsys, sltrain("soup", run, run, "--out", tmp_path / "soup"), *why)
    assert_one_line_error(capsys, sltrain("health", run), *why)
    assert not any((tmp_path / name).exists() for name in ("hf", "dense", "soup"))
    dense = build_model(load_config(None, {**cfg, "method.name": "full"}))
    with pytest.raises(UserError, match="no dense form"):
        init_weights_from(dense, run)
    assert sltrain("eval", run, "--max-batches", 1) == 0  # the run itself evaluates


@pytest.mark.parametrize("method", METHODS)
def test_refactor_and_pruning_refuse_cola(method):
    for key, value in (("optimizer.refactor", True), ("prune.target_sparsity", 0.5)):
        cfg = load_config(None, {**TINY, "method.name": method, key: value,
                                 "optimizer.reset_every": 5})
        with pytest.raises(UserError, match=f"not {method}"):
            (tricks if key.startswith("optimizer") else prune).validate(cfg)


@pytest.mark.parametrize("method", METHODS)
def test_short_run_lowers_the_loss(tiny, tmp_path, method):
    summary = train(load_config(None, {**tiny, "method.name": method, "train.steps": 30}))
    history = [json.loads(line)["loss"] for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 30
    first, last = history[0], sum(history[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert summary["val_loss"] < first - 0.5
    model = build_model(load_config(None, {**tiny, "method.name": method}), device="meta")
    assert not any(isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
                   for name, m in model.named_modules())  # all seven linears of each block are CoLA

