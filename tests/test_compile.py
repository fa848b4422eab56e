"""train.compile: every block compiled whole (fullgraph: a graph break is an error), a compiled
step equals the eager one for every parameterisation, and checkpoints move between compiled and
eager runs, resuming exactly."""

import json
import os
import shutil
import signal

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sltrain.train.compile as compile_module
from sltrain.config import load_config, resume_config
from sltrain.model import build_model
from sltrain.registry import LOSSES
from sltrain.train import train
from sltrain.train.checkpointing import apply_activation_checkpointing
from sltrain.train.compile import compile_blocks
from sltrain.train.losses import IGNORE_INDEX, TrainingLoss, cross_entropy

METHODS = ["full", "sltrain", "lowrank", "lost", "relora", "sparse", "cola", "cola_m"]


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile with AOTAutograd's captured graphs run by eager kernels: the capture (where graph
    breaks would show) without Inductor's C++ build, which one test below runs for real."""
    monkeypatch.setattr(compile_module, "BACKEND", "aot_eager")


@pytest.fixture
def small(tiny):
    return {**tiny, "model.n_layers": 1, "train.eval_every": 0}


def step(model, x, autocast, loss_fn=cross_entropy):
    """One training step's forward and backward; returns the loss and the gradients."""
    with autocast:
        logits = model(x[:, :-1])
    loss = loss_fn(logits, x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,precision", [*((m, "fp32") for m in METHODS),
                                              ("sltrain", "bf16-mixed"), ("sparse", "bf16-mixed")])
def test_a_compiled_step_equals_the_eager_one(small, method, precision):
    cfg = load_config(None, {**small, "method.name": method, "model.n_layers": 2})
    eager = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(compiled, "every:2")  # the second block recomputes
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(compiled, backend="aot_eager") == 2
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no `_orig_mod.`
    compiled.load_state_dict(eager.state_dict(), strict=True)  # and back: either way
    eager.load_state_dict(compiled.state_dict(), strict=True)
    x = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    (want_loss, want), (got_loss, got) = step(eager, x, autocast), step(compiled, x, autocast)
    # fullgraph=True turns any graph break into an error; the blocks did run compiled, as one
    # graph for both (the checkpointed one recomputes the same compiled forward).
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got_loss, want_loss, **tol)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sample"])  # "sample": reweighting's input
@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_a_compiled_loss_equals_the_eager_one(aot_eager, name, reduction):
    """train.compile compiles the loss on the logits too: one graph, the same value and the same
    gradient of the logits, ignored targets included."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 16, 64, generator=g)).to(torch.bfloat16)  # cast inside the loss
    targets = torch.randint(0, 64, (2, 16), generator=g)
    targets[1, :5] = IGNORE_INDEX
    torch._dynamo.reset()
    counters.clear()
    results = []
    for compile in (False, True):
        loss_fn = TrainingLoss(name, compile=compile)
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, targets, reduction)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-2, atol=1e-4)  # bf16 gradients


def test_inductor_computes_what_eager_does(small):
    """Inductor's C++ kernels, the default backend (the costly test: one C++ build of a block's
    forward and backward, and of the loss's; cached by Inductor for later runs)."""
    cfg = load_config(None, {**small, "method.name": "sltrain"})
    eager = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compile_blocks(compiled)
    x = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    off = torch.autocast("cpu", enabled=False)
    (want_loss, want) = step(eager, x, off)
    (got_loss, got) = step(compiled, x, off, TrainingLoss("cross_entropy", compile=True))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines)]


def interrupted_at(cfg, run, step):
    """Train `cfg` into `run`, stopping (checkpoint saved) after update `step`."""
    def interrupt(at, record):
        if at == step:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the step, save, stop

    assert train(load_config(None, {**cfg, "train.out_dir": str(run)}), on_step=interrupt)["step"] == step
    return run


def test_resume_of_a_compiled_run_equals_the_uninterrupted_one(small, tmp_path, aot_eager):
    cfg = {**small, "method.name": "sltrain", "train.steps": 6, "train.grad_accum": 2,
           "train.compile": True}
    whole = tmp_path / "whole"
    train(load_config(None, {**cfg, "train.out_dir": str(whole)}))
    run = interrupted_at(cfg, tmp_path / "run", 3)
    eager = tmp_path / "resumed_eager"
    shutil.copytree(run, eager)
    assert train(resume_config(run, {}), run_dir=run, resume=run)["status"] == "finished"
    assert losses(run) == losses(whole)  # exact, step by step
    # The compiled run's checkpoint goes on uncompiled: the same weights under the same names.
    train(resume_config(eager, {"train.compile": False}), run_dir=eager, resume=eager)
    assert losses(eager) == pytest.approx(losses(whole), rel=1e-6)
