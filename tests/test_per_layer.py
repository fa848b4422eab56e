"""Per-layer updates: exact clipping with accumulation, the hooks' own clipping without it, no
step on a non-finite loss, no per-parameter step drift, grad_norm logged, exact resume."""

import copy
import json
import math
import os
import signal

import pytest
import torch
from test_crash_safety import assert_identical

import sltrain.train.losses as losses_module
from sltrain.config import load_config, resume_config
from sltrain.measure.tensor_bytes import LiveTensorBytes
from sltrain.optim.per_layer import PerLayerOptimizer, all_finite
from sltrain.optim.rounding import CHUNK
from sltrain.registry import LOSSES
from sltrain.train import train
from sltrain.train.trainer import Trainer


@pytest.fixture
def base(tiny):
    return {**tiny, "method.name": "sltrain", "train.steps": 12, "train.eval_every": 0,
            "optimizer.per_layer_updates": True}


def trainer(overrides, out):
    return Trainer(load_config(None, {**overrides, "train.out_dir": str(out)}))


def params(t):
    return [p.detach().clone() for p in t.raw_model.parameters()]


@pytest.mark.parametrize("accum", [4, 1])
@pytest.mark.parametrize("name", ["adamw", "adam8bit"])
def test_exact_clipping_equals_the_plain_optimizer(base, tmp_path, name, accum):
    """With --grad-accum 4 the Trainer clips by the exact global norm and then steps each
    parameter; with --grad-accum 1 `exact` takes two backward passes. Either way: the same
    weights as the plain optimizer with the same clipping."""
    cfg = {**base, "optimizer.name": name, "train.grad_accum": accum, "optimizer.grad_clip": 0.05,
           "optimizer.per_layer_clip": "exact"}
    plain = trainer({**cfg, "optimizer.per_layer_updates": False}, tmp_path / "plain")
    hooked = trainer(cfg, tmp_path / "hooked")
    start = params(plain)
    for _ in range(4):
        want, got = plain.train_step(), hooked.train_step()
        assert want["grad_norm"] > 0.05  # the clipping acts
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6)
    for p, q in zip(plain.raw_model.parameters(), hooked.raw_model.parameters(), strict=True):
        if name == "adam8bit" and accum == 1:
            # The two-pass norm sums the per-tensor norms in another order than clip_grad_norm_:
            # a last-bit difference in the scale can move one 8-bit moment code, no more.
            off = (q - p).abs() > 1e-6
            assert off.float().mean() < 1e-3 and (q - p).abs().max() < 1e-4
        else:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(p, p0) for p, p0 in zip(plain.raw_model.parameters(), start,
                                                       strict=True))
    assert all(p.grad is None for p in hooked.raw_model.parameters())  # freed after each step
    # ... and without the clipping the weights come out elsewhere: the test can tell.
    unclipped = trainer({**cfg, "optimizer.grad_clip": 0.0, "optimizer.per_layer_clip": "none"},
                        tmp_path / "unclipped")
    for _ in range(4):
        unclipped.train_step()
    assert any(not torch.allclose(p, q, rtol=1e-6, atol=1e-6) for p, q in
               zip(plain.raw_model.parameters(), unclipped.raw_model.parameters(), strict=True))


def poison_call(monkeypatch, bad):
    """The training loss is NaN on loss call number `bad`; returns the call counter."""
    real, calls = losses_module.cross_entropy, [0]

    def lm_loss(logits, targets, reduction="mean"):
        calls[0] += 1
        loss = real(logits, targets, reduction)
        return loss * float("nan") if calls[0] == bad else loss

    monkeypatch.setattr(LOSSES["cross_entropy"], "obj", lm_loss)
    return calls


@pytest.mark.parametrize("accum,mode", [(1, "exact"), (1, "previous_norm"), (1, "running_norm"),
                                        (1, "update_rms"), (4, "none")])
def test_a_nan_micro_batch_leaves_every_weight_moment_and_counter(base, tmp_path, monkeypatch,
                                                                  accum, mode):
    # Two good steps (moments and the previous norm exist), then a NaN in micro-batch 2 of the
    # third step (its only one without accumulation).
    bad = 2 * accum + min(2, accum)
    calls = poison_call(monkeypatch, bad)
    # The poison counts loss calls: one per micro-batch with full logits (not per chunk).
    t = trainer({**base, "train.grad_accum": accum, "optimizer.name": "adam8bit",
                 "optimizer.per_layer_clip": mode, "optimizer.grad_clip": 0.1,
                 "loss.chunk_tokens": 0}, tmp_path / "r")
    for _ in range(2):
        assert t.train_step() is not None
    before = copy.deepcopy(t.state_dict())
    assert t.train_step() is None
    after = t.state_dict()
    assert calls[0] == bad  # the rest of the step was not computed
    for part in ("model", "optimizer", "scheduler", "tricks", "prune"):
        assert_identical(after[part], before[part], part)
    assert (after["step"], after["tokens_seen"]) == (before["step"], before["tokens_seen"]) == (
        2, 2 * t.cfg.tokens_per_step)
    assert after["skipped_nonfinite"] == 1 and t.optimizer.skipped_nonfinite == 0
    assert all(p.grad is None for p in t.raw_model.parameters())
    # The next step trains again, and every parameter has counted 3 real updates.
    assert t.train_step() is not None
    steps = {float(s["step"]) for o in t.optimizer.state_dict()["per_parameter"]
             for s in o["state"].values()}
    assert steps == {3.0}


def two_layers():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(4, 3)})


def step_counts(wrapper, model):
    return {name: int(wrapper.optimizers_for(p)[0].state[p]["step"]) if
            wrapper.optimizers_for(p)[0].state else 0 for name, p in model.named_parameters()}


@pytest.mark.parametrize("accum", [1, 2])
def test_a_parameter_without_gradient_does_not_step(accum):
    """Layer b gets a gradient in only some micro-batches: it steps once in each update where
    it got one (as the plain optimizer), and its step count never runs ahead or behind."""
    model, plain_model = two_layers(), two_layers()
    wrapper = PerLayerOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), accum)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    # Which layers each micro-batch's loss uses, update by update (without accumulation, the
    # first only): b gets a gradient in updates 1 and 3.
    plan = [[("a", "b"), ("a",)], [("a",), ("a",)], [("a", "b"), ("a", "b")]]
    for update, micros in enumerate(plan):
        micros = micros[:accum]
        for net, opt in ((model, wrapper), (plain_model, plain)):
            for i, used in enumerate(micros):
                if opt is wrapper:
                    wrapper.micro_batch(i == len(micros) - 1)
                sum(net[k](x).square().sum() for k in used).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        counts = step_counts(wrapper, model)
        assert counts["a.weight"] == update + 1 and counts["b.weight"] == [1, 1, 2][update], counts
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_the_finite_check_is_exact_and_sliced():
    """A non-finite entry anywhere (first, a middle slice, the last) is found; the check's
    temporaries are one slice's, not the whole gradient's."""
    g = torch.zeros(8, CHUNK + 3, dtype=torch.bfloat16)
    assert all_finite(g) and all_finite(g.t())  # the transposed view: not contiguous
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in (0, 4 * CHUNK + 1, g.numel() - 1):
            h = g.clone()
            h.view(-1)[i] = bad
            assert not all_finite(h)
    with LiveTensorBytes() as sliced:
        all_finite(g)
    with LiveTensorBytes() as one_slice:
        torch.isfinite(g.view(-1)[:CHUNK]).all()
    with LiveTensorBytes() as whole:
        torch.isfinite(g).all()
    assert sliced.peak <= one_slice.peak + 64 < whole.peak / 6  # + the running flag


@pytest.mark.parametrize("mode", ["previous_norm", "running_norm"])
def test_norm_clipping_in_the_hooks_follows_its_rule(mode):
    """The hooks' rule, against a plain AdamW fed the clipped gradients by hand: each gradient
    times min(1, clip / estimated global norm, clip / its own norm), where the estimate is the
    previous step's norm, or (running_norm) that with the norms of the gradients already seen
    in this backward replaced by this step's."""
    model, plain_model = two_layers(), two_layers()
    order = []  # the order in which the hooks see the parameters (registered first: runs first)
    for i, p in enumerate(model.parameters()):
        p.register_post_accumulate_grad_hook(lambda _, i=i: order.append(i))
    clip = 0.5
    wrapper = PerLayerOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), 1, clip, mode)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.1)
    previous = [0.0] * 4
    for seed in range(4):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)) * (seed % 2 * 3 + 1)
        order.clear()
        wrapper.micro_batch(True)
        sum(model[k](x).square().sum() for k in "ab").backward()
        wrapper.step()
        sum(plain_model[k](x).square().sum() for k in "ab").backward()
        grads = [p.grad for p in plain_model.parameters()]
        norms = [g.norm().item() for g in grads]
        assert wrapper.grad_norm == pytest.approx(math.hypot(*norms), rel=1e-6)
        seen = list(previous)
        for i in order:
            seen[i] = norms[i]
            estimate = math.hypot(*(seen if mode == "running_norm" else previous))
            scale = 1.0 if estimate == 0 else min(1.0, clip / (estimate + 1e-6))
            grads[i].mul_(min(scale, clip / (norms[i] + 1e-6)))
        plain.step()
        plain.zero_grad(set_to_none=True)
        previous = norms
        for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert sorted(order) == [0, 1, 2, 3] and math.hypot(*previous) > clip  # the clipping acted


def test_update_rms_clipping_bounds_each_update():
    model, free_model = two_layers(), two_layers()
    clip, lr = 0.3, 0.1
    wrapper = PerLayerOptimizer(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0), 1, clip,
                                "update_rms")
    free = PerLayerOptimizer(torch.optim.AdamW(free_model.parameters(), lr=lr, weight_decay=0), 1)
    for net, opt in ((model, wrapper), (free_model, free)):
        before = [p.detach().clone() for p in net.parameters()]
        net["a"](torch.randn(5, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
        opt.step()
        rms = [((p - p0).square().mean().sqrt() / lr).item() for p, p0 in
               zip(net.parameters(), before, strict=True)]
        if opt is wrapper:
            clipped = rms
        else:
            unclipped = rms
    # Adam's first update is lr * sign(g) (RMS 1): each is cut to `clip`; b had no gradient.
    assert unclipped[:2] == pytest.approx([1.0, 1.0], rel=1e-4)
    assert clipped[:2] == pytest.approx([clip, clip], rel=1e-4) and clipped[2:] == [0.0, 0.0]


@pytest.mark.parametrize("accum", [1, 4])
def test_grad_norm_is_the_global_norm_of_the_step(base, tmp_path, accum):
    cfg = {**base, "train.grad_accum": accum, "optimizer.grad_clip": 0.0 if accum > 1 else 1.0}
    hand = trainer({**cfg, "optimizer.per_layer_updates": False, "optimizer.grad_clip": 0.0},
                   tmp_path / "hand")
    for _ in range(accum):
        hand.forward_backward_step(*hand.sampler.next_batch(0, 1))
    want = math.sqrt(sum(p.grad.double().square().sum().item()
                         for p in hand.raw_model.parameters() if p.grad is not None))
    summary = train(load_config(None, {**cfg, "train.steps": 1,
                                       "train.out_dir": str(tmp_path / "run")}))
    assert summary["step"] == 1
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["grad_norm"] == pytest.approx(want, rel=1e-5)


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines)]


@pytest.mark.parametrize("accum,mode", [(1, "exact"), (1, "previous_norm"), (1, "running_norm"),
                                        (1, "update_rms"), (2, "none")])
def test_resume_with_clipping_equals_uninterrupted(base, tmp_path, accum, mode):
    # A small threshold keeps the clipping acting at every step: a lost previous norm would show.
    cfg = {**base, "train.steps": 8, "train.grad_accum": accum, "optimizer.per_layer_clip": mode,
           "optimizer.grad_clip": 0.05, "optimizer.name": "adam8bit"}
    train(load_config(None, {**cfg, "train.out_dir": str(tmp_path / "a")}))

    def interrupt(step, record):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the step, save, stop

    b = tmp_path / "b"
    stopped = train(load_config(None, {**cfg, "train.out_dir": str(b)}), on_step=interrupt)
    assert stopped["step"] == 4
    resumed = train(resume_config(b, {}), run_dir=b, resume=b)
    assert resumed["status"] == "finished"
    assert losses(b) == losses(tmp_path / "a")  # exact, step by step
