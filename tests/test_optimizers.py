"""Every optimizer: it trains, its state bytes are known from shapes, per-layer updates equal the
plain optimizer under gradient accumulation, and projector failures are loud."""

import copy
import warnings

import pytest
import torch
from conftest import LiveGradients

from sltrain.config import OptimizerConfig, load_config
from sltrain.errors import UserError
from sltrain.measure import estimate_memory, measure_memory
from sltrain.measure.loss import lm_loss
from sltrain.model import build_model
from sltrain.optim import build_optimizer, projector
from sltrain.optim.galore import GaLore
from sltrain.registry import OPTIMIZERS

TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 256, "method.rank": 16}


def setup(method="full", **opt):
    cfg = load_config(None, {**TINY, "method.name": method,
                             **{f"optimizer.{k}": v for k, v in opt.items()}})
    torch.manual_seed(0)
    return build_model(cfg, torch.device("cpu")), cfg


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 17), generator=g) for _ in range(n)]


def loss_of(model, x):
    return lm_loss(model(x[:, :-1]), x[:, 1:])


def run(model, optimizer, data, accum=1):
    for i in range(0, len(data), accum):
        for x in data[i:i + accum]:
            (loss_of(model, x) / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_trains_the_model(name):
    model, cfg = setup("sltrain", name=name, proj_rank=8, update_proj_gap=10)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    x = batches(1)[0]
    before = loss_of(model, x).item()
    run(model, opt, [x] * 25)
    assert loss_of(model, x).item() < before - 0.5


def test_galore_with_the_dct_projector_trains_and_stores_only_indices():
    model, cfg = setup("full", name="galore", projector="dct", proj_rank=8)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    x = batches(1)[0]
    before = loss_of(model, x).item()
    run(model, opt, [x] * 25)
    assert loss_of(model, x).item() < before - 0.5
    q = model.layers[0].mlp.gate_proj.weight  # 128 x 64: projected on the right, r x 64
    state = opt.state[q]
    assert "ortho" not in state and state["dct_idx"].shape == (8,)
    P = projector.basis(state, q.shape, torch.float64)
    torch.testing.assert_close(P @ P.t(), torch.eye(8, dtype=torch.float64))


CASES = [(name, method, False) for name in OPTIMIZERS for method in ("full", "sltrain")] + [
    (name, "sltrain", True) for name in ("adamw", "adam8bit", "galore8bit", "muon")]


@pytest.mark.parametrize("name,method,per_layer", CASES)
def test_state_bytes_from_shapes_equal_the_state_dict(name, method, per_layer):
    extra = {"per_layer_updates": True, "grad_clip": 0.0} if per_layer else {}
    model, cfg = setup(method, name=name, proj_rank=8, **extra)
    watch = LiveGradients(model)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    run(model, opt, batches(2))
    live = measure_memory(model, opt)
    meta = build_model(cfg, torch.device("meta"))
    estimate = estimate_memory(meta, torch.float32, cfg.optimizer, cfg.rank)
    assert estimate == live
    assert estimate.gradients == watch.peak_bytes  # the most a real backward held at once
    assert live.optimizer_states > 0


def test_eight_bit_states_are_about_a_quarter_of_adamw():
    model, cfg = setup("full")
    meta = build_model(cfg, torch.device("meta"))
    full = estimate_memory(meta, torch.float32, cfg.optimizer).optimizer_states
    cfg8 = OptimizerConfig(name="adam8bit")
    eight = estimate_memory(meta, torch.float32, cfg8).optimizer_states
    assert 0.25 < eight / full < 0.27  # 1 byte + 4/256 of absmax per 4-byte moment


@pytest.mark.parametrize("method", ["full", "sltrain"])
@pytest.mark.parametrize("accum", [1, 4])
def test_per_layer_gradients_are_one_tensor_at_a_time_without_accumulation(method, accum):
    """The gradient bytes the estimate states are the most a real backward holds at once: with
    per-layer updates and no accumulation, one gradient (the largest); with accumulation, all."""
    model, cfg = setup(method, per_layer_updates=True, grad_clip=0.0)
    watch = LiveGradients(model)  # before the optimizer: it sees each gradient before it is freed
    opt = build_optimizer(model, cfg.optimizer, cfg.rank, grad_accum=accum)
    sizes = {}
    for x in batches(accum):
        loss_of(model, x).backward()
        sizes |= {id(p): p.grad.numel() * p.grad.element_size()
                  for p in watch.params if p.grad is not None}
    meta = build_model(cfg, torch.device("meta"))
    estimate = estimate_memory(meta, torch.float32, cfg.optimizer, grad_accum=accum).gradients
    assert watch.peak_bytes == estimate
    # Without accumulation the hooks stepped and freed each gradient during backward; with it,
    # the step comes after the last backward (once the Trainer has clipped) and frees them.
    assert bool(watch.alive()) == (accum > 1)
    opt.step()
    assert not watch.alive()
    if accum == 1:  # each freed before the next one completes
        assert watch.peak_count == 1
        assert watch.peak_bytes == max(p.numel() for p in model.parameters()) * 4
    else:  # kept between micro-batches: all of them at once
        assert watch.peak_count == len(watch.params) == len(sizes)
        assert watch.peak_bytes == sum(sizes.values())
    assert opt.grad_accum == accum


@pytest.mark.parametrize("name", ["adamw", "galore", "muon"])
def test_per_layer_updates_with_accumulation_equal_the_plain_optimizer(name):
    plain, cfg = setup("sltrain", name=name, proj_rank=8, update_proj_gap=2, grad_clip=0.0)
    hooked = copy.deepcopy(plain)
    data = batches(12)  # 3 optimizer steps of 4 micro-batches
    run(plain, build_optimizer(plain, cfg.optimizer, cfg.rank), data, accum=4)
    per_layer_cfg = cfg.optimizer.model_copy(update={"per_layer_updates": True})
    opt = build_optimizer(hooked, per_layer_cfg, cfg.rank, grad_accum=4)
    run(hooked, opt, data, accum=4)
    moved = False
    for p, q, p0 in zip(plain.parameters(), hooked.parameters(), setup("sltrain")[0].parameters(),
                        strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        moved |= not torch.equal(p, p0)
    assert moved
    # With accumulation the gradients are all kept between micro-batches; after the step, none.
    assert all(p.grad is None for p in hooked.parameters())


def test_per_layer_learning_rate_follows_the_scheduler():
    model, cfg = setup("full", per_layer_updates=True, grad_clip=0.0)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    run(model, opt, batches(1))
    sched.step()
    inner = opt.optimizers_for(model.lm_head.weight)[0]
    assert inner.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr * 0.5)
    restored = build_optimizer(copy.deepcopy(model), cfg.optimizer, cfg.rank)
    restored.load_state_dict(opt.state_dict())
    assert all(g["lr"] == pytest.approx(cfg.optimizer.lr * 0.5) for g in restored.param_groups)


def test_per_layer_updates_refuse_gradient_clipping_they_cannot_do():
    model, cfg = setup("full", per_layer_updates=True, per_layer_clip="none")
    with pytest.raises(UserError, match="--grad-clip 0"):
        build_optimizer(model, cfg.optimizer, cfg.rank)
    build_optimizer(model, cfg.optimizer, cfg.rank, grad_accum=2).remove_hooks()  # clips exactly


def test_a_failed_svd_raises_first_then_keeps_the_last_projector():
    w = torch.nn.Parameter(torch.randn(32, 16))
    opt = GaLore([{"params": [w], "kind": "matrix"}], rank=4, update_proj_gap=1)
    w.grad = torch.full_like(w, float("nan"))
    with pytest.raises(projector.ProjectorError, match="non-finite"):
        opt.step()
    w.grad = torch.randn_like(w)
    opt.step()
    ortho = opt.state[w]["ortho"].clone()
    w.grad = torch.full_like(w, float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("keeping the previous projector" in str(c.message) for c in caught)
    assert opt.state[w]["projector_failures"] == 1
    assert torch.equal(opt.state[w]["ortho"], ortho)


# The GaLore paper's memory column (bf16 weights + optimizer states, REFERENCE.md §1), in GiB.
PUBLISHED = {"llama-60m": (0.36, 0.24, 0.26), "llama-130m": (0.76, 0.52, 0.54),
             "llama-350m": (2.06, 1.22, 1.08), "llama-1b": (7.80, 4.38, 3.57)}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_galore_paper_memory_estimates(preset):
    """Ours count exactly (moments r x max(m, n) and an r x min(m, n) projector per matrix);
    the paper's column is not reproducible to 5% at every size in any one unit
    (see docs/results/optimizers.md),
    so this holds every entry to 10% and records the gap."""
    for (method, name), published in zip((("full", "adamw"), ("full", "galore"), ("lowrank", "adamw")),
                                         PUBLISHED[preset], strict=True):
        cfg = load_config(None, {"model.preset": preset, "method.name": method,
                                 "optimizer.name": name})
        meta = build_model(cfg, torch.device("meta"))
        mem = estimate_memory(meta, torch.bfloat16, cfg.optimizer, cfg.rank)
        gib = (mem.weights + mem.optimizer_states) / 2**30
        assert abs(gib / published - 1) < 0.10, (preset, method, name, gib, published)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_declares_the_moments_it_creates(name):
    """Every state tensor of a parameter's shape is a moment the optimizer names in its
    `moment_keys`, so the cycle tricks reset it: a new optimizer that forgets one fails here."""
    from sltrain.optim.per_layer import PerLayerOptimizer
    from sltrain.optim.tricks import prune_state_

    model, cfg = setup("sltrain", name=name, proj_rank=8, update_proj_gap=10)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    run(model, opt, batches(2))
    declared = getattr(type(opt), "moment_keys", None)
    assert declared, f"{type(opt).__name__} declares no moment_keys"
    params = [p for p in model.parameters() if p.requires_grad]
    moments = [(opt.state[p], key) for p in params for key, v in opt.state[p].items()
               if isinstance(v, torch.Tensor) and v.shape == p.shape
               and (v.is_floating_point() or v.dtype == torch.uint8)]
    assert moments
    for _, key in moments:
        assert key.endswith(tuple(declared)), f"{name} keeps an undeclared moment '{key}'"
    assert prune_state_(opt, params, 1.0) > 0
    for state, key in moments:
        v = state[key]
        if v.dtype == torch.uint8:  # 8-bit codes: every one now the code of zero
            assert torch.all(state["qmap" + key[-1]][v.long()] == 0), key
        else:
            assert v.count_nonzero() == 0, key
    wrapper = PerLayerOptimizer(opt)
    wrapper.remove_hooks()
    assert wrapper.moment_keys == tuple(declared)  # the per-layer wrapper delegates


def whole_tensor_direction_8bit(grad, state, beta1, beta2, eps, step):
    """The 8-bit Adam direction over the whole tensor at once (before slicing): the reference."""
    from sltrain.optim.adam8bit import BLOCKSIZE, bitsandbytes
    from sltrain.optim.base import adam_moments_

    F = bitsandbytes().functional
    m, v = (F.dequantize_blockwise(state["state" + i], absmax=state["absmax" + i],
                                   code=state["qmap" + i], blocksize=BLOCKSIZE) for i in "12")
    direction, correction = adam_moments_(m, v, grad.float(), beta1, beta2, eps, step)
    for i, moment in (("1", m), ("2", v)):
        F.quantize_blockwise(moment, code=state["qmap" + i], absmax=state["absmax" + i],
                             out=state["state" + i], blocksize=BLOCKSIZE)
    return direction, correction


def test_the_8bit_direction_is_sliced_and_equals_the_whole_tensor_one():
    from sltrain.measure.tensor_bytes import LiveTensorBytes
    from sltrain.optim.adam8bit import adam_direction_8bit
    from sltrain.optim.rounding import CHUNK

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, CHUNK // 2 + 77, generator=g).bfloat16() for _ in range(3)]
    sliced, whole = {}, {}
    for step, grad in enumerate(grads, 1):
        got, c1 = adam_direction_8bit(grad, sliced, 0.9, 0.999, 1e-8, step, dtype=torch.bfloat16)
        if step == 1:
            whole = copy.deepcopy(sliced) | {"state1": torch.zeros_like(sliced["state1"]),
                                             "state2": torch.zeros_like(sliced["state2"]),
                                             "absmax1": torch.zeros_like(sliced["absmax1"]),
                                             "absmax2": torch.zeros_like(sliced["absmax2"])}
        want, c2 = whole_tensor_direction_8bit(grad, whole, 0.9, 0.999, 1e-8, step)
        assert c1 == c2 and torch.equal(got, want.bfloat16())
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(sliced[key], whole[key]), key
    big = torch.randn(8 * CHUNK, generator=g).bfloat16()
    adam_direction_8bit(big, state := {}, 0.9, 0.999, 1e-8, 1)
    with LiveTensorBytes() as sliced_peak:
        adam_direction_8bit(big, state, 0.9, 0.999, 1e-8, 2, dtype=torch.bfloat16)
    with LiveTensorBytes() as whole_peak:
        whole_tensor_direction_8bit(big, state, 0.9, 0.999, 1e-8, 3)
    # The bf16 direction plus one slice's float32 temporaries, not float32 copies of the whole.
    assert sliced_peak.peak < 2 * big.numel() + 40 * CHUNK < whole_peak.peak / 2
