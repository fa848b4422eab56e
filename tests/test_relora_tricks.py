import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.model import build_model
from sltrain.optim.tricks import CycleTricks, include_warm_start_params, prune_state_, refactor_, validate
from sltrain.parametrize.lowrank import LowRankLinear
from sltrain.parametrize.relora import ReLoRALinear
from sltrain.parametrize.sltrain import SparseLowRankLinear
from sltrain.registry import METHODS
from sltrain.train.schedule import build_scheduler

TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 512, "method.rank": 16, "method.name": "relora", "optimizer.reset_every": 3}


def relora_layer(dtype=torch.float64) -> ReLoRALinear:
    torch.manual_seed(0)
    linear = nn.Linear(24, 20, bias=False, dtype=dtype)
    layer = ReLoRALinear.from_linear(linear, rank=4, lora_alpha=8)
    assert torch.equal(layer.weight, linear.weight)
    nn.init.normal_(layer.B)  # B starts at zero; make the low-rank path matter
    return layer


# ---- the layer ------------------------------------------------------------------------------------
def test_relora_registered_and_init():
    assert METHODS["relora"].obj is ReLoRALinear
    layer = ReLoRALinear.from_linear(nn.Linear(300, 200, bias=False), rank=16, lora_alpha=32)
    assert layer.scaling == 2.0 and torch.all(layer.B == 0)
    assert layer.A.abs().max() <= 1 / 300**0.5
    assert not layer.weight.requires_grad and layer.A.requires_grad and layer.B.requires_grad


def test_relora_from_meta_linear():
    with torch.device("meta"):
        layer = ReLoRALinear.from_linear(nn.Linear(32, 16, bias=False), rank=4, lora_alpha=8)
    assert layer.weight.is_meta and layer.A.is_meta and layer.B.is_meta


def test_relora_forward_and_gradients_match_dense_reference():
    layer = relora_layer()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 20, dtype=torch.float64)
    (layer(x) * target).sum().backward()
    ours = [x.grad.clone(), layer.A.grad.clone(), layer.B.grad.clone()]
    assert layer.weight.grad is None
    x.grad = layer.A.grad = layer.B.grad = None
    dense = layer.weight + layer.scaling * layer.B @ layer.A
    y = F.linear(x, dense)
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.dense_weight(), dense.detach())
    (y * target).sum().backward()
    for a, b in zip(ours, [x.grad, layer.A.grad, layer.B.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_merge_and_reinit_keeps_function_and_parameters():
    layer = relora_layer()
    before = layer.dense_weight()
    ids = [id(layer.weight), id(layer.A), id(layer.B)]
    old_A = layer.A.detach().clone()
    layer.merge_and_reinit_()
    assert [id(layer.weight), id(layer.A), id(layer.B)] == ids
    assert torch.all(layer.B == 0) and not torch.equal(layer.A, old_A)
    assert layer.A.abs().max() <= 1 / 24**0.5
    torch.testing.assert_close(layer.dense_weight(), before)
    torch.testing.assert_close(layer.weight.detach(), before)


def test_merge_and_reinit_draws_from_the_given_generator():
    a, b = relora_layer(), relora_layer()
    a.merge_and_reinit_(torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG must not matter
    b.merge_and_reinit_(torch.Generator().manual_seed(5))
    assert torch.equal(a.A, b.A)


def test_cycle_merges_draw_the_same_factors_whatever_the_global_rng():
    (_, _, _, t1, l1), (_, _, _, t2, l2) = tiny_run(), tiny_run()
    torch.manual_seed(1)
    t1.after_step(3)
    torch.manual_seed(2)
    t2.after_step(3)
    assert all(torch.equal(a.A, b.A) for a, b in zip(l1, l2, strict=True))
    assert not torch.equal(l1[0].A, l1[1].A)  # q_proj and k_proj: same shape, own draws


def test_warm_start_switches_what_trains():
    layer = relora_layer()
    layer(torch.randn(2, 24, dtype=torch.float64)).sum().backward()
    layer.set_warm_start(True)
    assert layer.weight.requires_grad and not layer.A.requires_grad and not layer.B.requires_grad
    assert layer.A.grad is None and layer.B.grad is None  # no stale gradient to step with
    layer(torch.randn(2, 24, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad is not None and layer.A.grad is None
    layer.set_warm_start(False)
    assert not layer.weight.requires_grad and layer.A.requires_grad and layer.B.requires_grad
    assert layer.weight.grad is None


# ---- refactorisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lowrank", "sltrain"])
def test_refactor_keeps_product_and_balances(kind):
    torch.manual_seed(1)
    if kind == "lowrank":
        layer = LowRankLinear(96, 64, rank=16)
    else:
        layer = SparseLowRankLinear(96, 64, rank=16, lora_alpha=32, density=0.05)
        nn.init.normal_(layer.B, std=0.05)
    with torch.no_grad():
        layer.A.mul_(torch.linspace(0.1, 3.0, 16)[:, None])  # make the split unbalanced
    A, B = layer.A, layer.B
    before = layer.dense_weight()
    assert not torch.allclose(B.t() @ B, A @ A.t(), atol=1e-3)
    refactor_(layer)
    assert layer.A is A and layer.B is B and A.shape == (16, 96) and B.shape == (64, 16)
    assert (layer.dense_weight() - before).abs().max() < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(B.t() @ B, A @ A.t(), rtol=1e-4, atol=1e-5)
        gram = B.t() @ B
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-5)


def test_refactor_rejects_other_layers():
    with pytest.raises(TypeError):
        refactor_(relora_layer())


# ---- state pruning --------------------------------------------------------------------------------
def stepped(optimizer_cls, shape=(64, 128), steps=3, **kw):
    torch.manual_seed(2)
    p, q = nn.Parameter(torch.randn(*shape)), nn.Parameter(torch.randn(10))
    opt = optimizer_cls([p, q], lr=1e-3, **kw)
    for _ in range(steps):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    return p, q, opt


def test_prune_state_adamw():
    p, q, opt = stepped(torch.optim.AdamW)
    n = p.numel()
    old = {k: v.clone() for k, v in opt.state[p].items()}
    zeroed = prune_state_(opt, [p], 0.9)
    assert zeroed == 2 * (n - round(0.1 * n))
    for key in ("exp_avg", "exp_avg_sq"):
        t, o = opt.state[p][key], old[key]
        assert int((t != 0).sum()) == round(0.1 * n)
        kept = t != 0
        assert torch.equal(t[kept], o[kept])  # survivors untouched
        assert o[kept].abs().min() >= o[~kept].abs().max()  # and they are the largest
    assert torch.equal(opt.state[p]["step"], old["step"])
    assert opt.state[q]["exp_avg"].count_nonzero() == 10  # parameters not named are untouched
    prune_state_(opt, [p, q], 1.0)
    assert all(opt.state[t][k].count_nonzero() == 0 for t in (p, q) for k in ("exp_avg", "exp_avg_sq"))
    assert float(opt.state[p]["step"]) == 3.0


def test_prune_state_keeps_other_entries_and_follows_wrappers():
    p, _, inner = stepped(torch.optim.SGD, momentum=0.9)
    inner.state[p]["ortho"] = torch.randn(4, 4)
    inner.state[p]["sub_exp_avg"] = torch.randn(4, 4)
    ortho = inner.state[p]["ortho"].clone()

    class PerLayer:  # the shape of a per-layer optimizer wrapper
        def optimizers_for(self, t):
            return [inner] if t is p else []

    prune_state_(PerLayer(), [p], 1.0)
    assert inner.state[p]["momentum_buffer"].count_nonzero() == 0
    assert inner.state[p]["sub_exp_avg"].count_nonzero() == 0
    assert torch.equal(inner.state[p]["ortho"], ortho)


def test_prune_state_bitsandbytes_8bit():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    p, q, opt = stepped(bnb.optim.AdamW8bit)  # p: 8192 elements -> 8-bit states; q: float32 states
    state = opt.state[p]
    assert state["state1"].dtype == torch.uint8 and opt.state[q]["state1"].dtype == torch.float32
    old = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    n, keep = p.numel(), round(0.1 * p.numel())
    prune_state_(opt, [p, q], 0.9)
    for i in ("1", "2"):
        codes, qmap = state["state" + i], state["qmap" + i]
        zero = int(qmap.abs().argmin())
        assert qmap[zero] == 0
        assert int((codes == zero).sum()) == n - keep
        kept = codes != zero
        assert torch.equal(codes[kept], old["state" + i][kept])
        before = bnbf.dequantize_blockwise(old["state" + i], absmax=old["absmax" + i], code=qmap,
                                           blocksize=256)
        assert before[kept].abs().min() >= before[~kept].abs().max()
        assert torch.equal(state["absmax" + i], old["absmax" + i])
    assert int(opt.state[q]["state1"].count_nonzero()) == 1  # round(0.1 * 10)
    prune_state_(opt, [p], 1.0)
    for i in ("1", "2"):
        values = bnbf.dequantize_blockwise(state["state" + i], absmax=state["absmax" + i],
                                           code=state["qmap" + i], blocksize=256)
        assert values.count_nonzero() == 0
    assert state["step"] == old["step"] == 3
    p.grad = torch.randn_like(p)
    opt.step()  # the optimizer still runs on the pruned state
    assert torch.isfinite(p).all()


# ---- the cycle ------------------------------------------------------------------------------------
def tiny_run(overrides=None, steps=7):
    cfg = load_config(overrides={**TINY, **(overrides or {})})
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    include_warm_start_params(model, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tricks = CycleTricks(model, optimizer, cfg)
    layers = [m for m in model.modules() if isinstance(m, ReLoRALinear)]
    return cfg, model, optimizer, tricks, layers


def train_step(model, optimizer):
    idx = torch.randint(0, 512, (2, 16))
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_cycle_tricks_relora_merges_and_prunes():
    cfg, model, optimizer, tricks, layers = tiny_run()
    assert len(layers) == 2 * 7
    expected = {id(m): m.weight.detach().clone() for m in layers}
    ids = [id(p) for p in model.parameters()]
    events = {}
    for step in range(1, 8):
        train_step(model, optimizer)
        before = {id(m): m.dense_weight() for m in layers}
        if step % 3 == 0:
            for m in layers:
                expected[id(m)] += m.scaling * m.B.detach() @ m.A.detach()
        events[step] = tricks.after_step(step)
        for m in layers:
            torch.testing.assert_close(m.dense_weight(), before[id(m)])  # a merge keeps the function
        if step % 3 == 0:
            assert all(torch.all(m.B == 0) for m in layers)
            for m in layers:
                for p in (m.A, m.B):  # exactly the largest 0.1% of each moment survive
                    st = optimizer.state[p]
                    for key in ("exp_avg", "exp_avg_sq"):
                        assert int(st[key].count_nonzero()) == round(0.001 * p.numel()), key
                    assert st["step"] == step
    assert {s for s, e in events.items() if e} == {3, 6}
    assert events[3] == {"relora_merge": 14}
    assert [id(p) for p in model.parameters()] == ids
    for m in layers:
        torch.testing.assert_close(m.weight.detach(), expected[id(m)])
        assert not m.weight.requires_grad
    assert [tricks.cycle_start(s) for s in range(8)] == [None, None, None, 3, 3, 3, 6, 6]


def test_cycle_tricks_relora_warm_start():
    cfg, model, optimizer, tricks, layers = tiny_run({"method.warm_start_steps": 2})
    m = layers[0]
    assert m.weight.requires_grad and not m.A.requires_grad
    w0 = m.weight.detach().clone()
    events = {}
    for step in range(1, 6):
        train_step(model, optimizer)
        if step == 1:
            assert not torch.equal(m.weight, w0) and torch.all(m.B == 0)  # only W trains
            assert m.A not in optimizer.state
        events[step] = tricks.after_step(step)
        if step == 2:
            assert not m.weight.requires_grad and m.A.requires_grad and m.B.requires_grad
            assert m.weight not in optimizer.state  # its moments were freed
            w2 = m.weight.detach().clone()
        if step in (3, 4):
            assert torch.equal(m.weight, w2)  # frozen after the warm start
    assert events == {1: {}, 2: {"relora_warm_start_end": 1}, 3: {}, 4: {}, 5: {"relora_merge": 14}}
    assert [tricks.cycle_start(s) for s in range(9)] == [None, None, 2, 2, 2, 5, 5, 5, 8]


def test_warm_start_needs_factors_in_the_optimizer():
    cfg = load_config(overrides={**TINY, "method.warm_start_steps": 2})
    model = build_model(cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(RuntimeError, match="include_warm_start_params"):
        CycleTricks(model, optimizer, cfg)


@pytest.mark.parametrize("method", ["lowrank", "sltrain"])
def test_cycle_tricks_refactor_and_reset(method):
    cfg, model, optimizer, tricks, _ = tiny_run({"method.name": method, "optimizer.refactor": True,
                                                 "optimizer.reset_momentum": True})
    layers = [m for m in model.modules() if isinstance(m, (LowRankLinear, SparseLowRankLinear))]
    for step in range(1, 4):
        train_step(model, optimizer)
        before = [m.dense_weight() for m in layers]
        events = tricks.after_step(step)
        if step < 3:
            assert events == {}
    assert events == {"refactor": 14, "momentum_reset": 1}
    for m, w in zip(layers, before, strict=True):
        assert (m.dense_weight() - w).abs().max() < 1e-5
    for p in model.parameters():
        assert optimizer.state[p]["exp_avg"].count_nonzero() == 0
        assert optimizer.state[p]["step"] == 3
    assert tricks.cycle_start(4) == 3 and tricks.cycle_start(2) is None


@pytest.mark.parametrize("overrides, flag", [
    ({"method.name": "relora"}, "--reset-every"),
    ({"method.name": "full", "optimizer.refactor": True, "optimizer.reset_every": 5}, "--refactor"),
    ({"method.name": "relora", "optimizer.refactor": True, "optimizer.reset_every": 5}, "--refactor"),
    ({"method.name": "sltrain", "method.warm_start_steps": 10}, "--warm-start-steps"),
    ({"method.name": "lowrank", "optimizer.reset_momentum": True}, "--reset-every"),
])
def test_validate_refuses_impossible_combinations(overrides, flag):
    with pytest.raises(UserError, match=flag) as err:
        validate(load_config(overrides=overrides))
    assert "\n" not in str(err.value)


def test_sound_combinations_are_accepted_and_do_what_they_ask():
    # ReLoRA every 3 updates, the rate re-warming over 2: the merge after update 3 keeps every
    # layer's function and prunes the factors' moments to 0.1%; update 3 (0-based) runs at half
    # the cosine rate, update 4 at the full rate again.
    cfg, model, optimizer, tricks, layers = tiny_run({"schedule.restart_warmup": 2})
    validate(cfg)
    scheduler = build_scheduler(optimizer, "cosine", 10, 0, 0.1, cfg.schedule.restart_warmup,
                                tricks.cycle_start)
    rates = []
    for step in range(1, 6):
        rates.append(optimizer.param_groups[0]["lr"])
        train_step(model, optimizer)
        scheduler.step()
        before = [m.dense_weight() for m in layers]
        events = tricks.after_step(step)
        assert events == ({"relora_merge": 14} if step == 3 else {}), step
        for m, w in zip(layers, before, strict=True):
            torch.testing.assert_close(m.dense_weight(), w)
    cos = [0.1 + 0.45 * (1 + math.cos(math.pi * s / 10)) for s in range(5)]  # T=10, no warm-up
    want = [cos[0], cos[1], cos[2], 0.5 * cos[3], cos[4]]
    assert rates == pytest.approx([1e-2 * m for m in want], rel=1e-12)

    # SLTrain with refactorisation every 100 updates: nothing before, a refactor of all 14 layers
    # at 100 that keeps their weights, and the factors' moments reset.
    cfg, model, optimizer, tricks, _ = tiny_run({"method.name": "sltrain", "optimizer.refactor": True,
                                                 "optimizer.reset_every": 100})
    validate(cfg)
    layers = [m for m in model.modules() if isinstance(m, SparseLowRankLinear)]
    train_step(model, optimizer)
    assert all(tricks.after_step(s) == {} for s in range(1, 100))
    before = [m.dense_weight() for m in layers]
    assert tricks.after_step(100) == {"refactor": 14}
    for m, w in zip(layers, before, strict=True):
        assert (m.dense_weight() - w).abs().max() < 1e-5
        assert all(optimizer.state[p]["exp_avg"].count_nonzero() == 0 for p in (m.A, m.B))
    assert tricks.cycle_start(99) is None and tricks.cycle_start(150) == 100

    # Full training asks for no trick: none ever happens, and the rate never re-warms.
    cfg, model, optimizer, tricks, _ = tiny_run({"method.name": "full", "optimizer.reset_every": 0})
    validate(cfg)
    weights = [p.detach().clone() for p in model.parameters()]
    assert all(tricks.after_step(s) == {} for s in range(1, 50))
    assert all(tricks.cycle_start(s) is None for s in range(50))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
