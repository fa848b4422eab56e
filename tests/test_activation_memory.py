"""Activation memory: the chunked losses equal the plain ones, activation checkpointing gives the
gradients of no checkpointing, and training with both is the run without them."""

import contextlib
import copy
import functools
import json
import os
import signal

import pytest
import torch
from conftest import assert_one_line_error

from sltrain.cli import main
from sltrain.config import load_config, resume_config
from sltrain.errors import UserError
from sltrain.measure.loss import evaluate, token_losses
from sltrain.model import build_model
from sltrain.registry import LOSSES
from sltrain.train import train
from sltrain.train.checkpointing import apply_activation_checkpointing, checkpointed_blocks
from sltrain.train.losses import IGNORE_INDEX, TrainingLoss, cross_entropy, head_loss
from sltrain.train.reweight import SampleReweighter

TOL = {"atol": 1e-6, "rtol": 1e-6}
LOSS_OPTIONS = {"cross_entropy": {}, "z_loss": {"a": 0.3, "b": 4.0}, "logit_z_reg": {"coef": 0.05}}
# Plain cross-entropy has a closed-form row gradient; this same function under another name
# takes the generic path (the loss again under autograd in the backward).
AUTOGRAD_CE = functools.partial(cross_entropy)


def head_batch(seed=0, vocab=50, dim=16):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    targets[0, 2] = targets[1, :4] = targets[2, 6] = IGNORE_INDEX
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def value_and_grads(loss, hidden, weight, seed=1):
    # A random upstream gradient, so that "none" and "sample" are checked per element.
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed))
    gh, gw = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample"])
@pytest.mark.parametrize("name", [*LOSS_OPTIONS, "autograd_ce"])
def test_chunked_loss_equals_the_loss_of_full_logits(name, reduction):
    if name == "autograd_ce":
        fn, options = AUTOGRAD_CE, {}
    else:
        fn, options = LOSSES[name].obj, LOSS_OPTIONS[name]
        assert LOSSES[name].info["per_token"]
    hidden, weight, targets = head_batch()
    plain = value_and_grads(fn(hidden @ weight.t(), targets, reduction, **options), hidden, weight)
    for chunk in (1, 5, 21, 4096):  # one row, a ragged split, exactly all, more than all
        chunked = value_and_grads(head_loss(fn, hidden, weight, targets, reduction, chunk, **options),
                                  hidden, weight)
        for got, want in zip(chunked, plain, strict=True):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("fn", [cross_entropy, AUTOGRAD_CE])
def test_ignored_targets_get_no_loss_and_no_gradient(fn):
    hidden, weight, targets = head_batch()
    loss = head_loss(fn, hidden, weight, targets, "none", chunk_tokens=4)
    (gh,) = torch.autograd.grad(loss.sum(), hidden)
    ignored = targets.flatten() == IGNORE_INDEX
    assert (loss[ignored] == 0).all() and (loss[~ignored] > 0).all()
    assert (gh.flatten(0, 1)[ignored] == 0).all() and (gh.flatten(0, 1)[~ignored] != 0).all()


def test_reweighted_training_loss_from_hidden_equals_it_from_logits():
    hidden, weight, targets = head_batch()
    results = []
    for chunked in (False, True):
        loss_fn = TrainingLoss("logit_z_reg", reweighter=SampleReweighter("linupper"),
                               chunk_tokens=4, coef=0.05)
        assert loss_fn.chunked
        loss = (loss_fn.from_hidden(hidden, weight, targets) if chunked
                else loss_fn(hidden @ weight.t(), targets))
        results.append((*value_and_grads(loss, hidden, weight), loss_fn.step_metrics()))
    for got, want in zip(results[1][:3], results[0][:3], strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert results[1][3]["ce"] == pytest.approx(results[0][3]["ce"], rel=1e-6)


def test_a_loss_without_a_per_token_form_is_not_chunked():
    LOSSES.register("whole_batch", lambda logits, targets, reduction="mean": logits.mean())
    try:
        assert not TrainingLoss("whole_batch", chunk_tokens=1024).chunked
        assert not TrainingLoss("cross_entropy", chunk_tokens=0).chunked
    finally:
        LOSSES.unregister("whole_batch")


def model_cfg(tiny, method, **extra):
    return load_config(None, {**tiny, "method.name": method, "model.n_layers": 4, **extra})


def test_checkpointed_blocks():
    assert checkpointed_blocks("none", 4) == []
    assert checkpointed_blocks("full", 4) == [0, 1, 2, 3]
    assert checkpointed_blocks("every:2", 5) == [1, 3]
    assert checkpointed_blocks("every:7", 5) == []


def saved_bytes_and_grads(model, x):
    """Bytes autograd keeps for the backward outside checkpointed regions, and the gradients."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    return sum(saved), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "sltrain", "lowrank", "sparse", "relora", "lost"])
def test_checkpointing_gives_the_gradients_of_none_and_keeps_less(tiny, method):
    torch.manual_seed(0)
    base = build_model(model_cfg(tiny, method))
    x = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(3))
    keys = list(base.state_dict())
    saved_none, want = saved_bytes_and_grads(copy.deepcopy(base), x)
    saved = {}
    for mode in ("full", "every:2"):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        calls = [0] * 4  # counted on entry: a recompute stops once the backward has its tensors
        for i, block in enumerate(model.layers):
            block.register_forward_pre_hook(lambda *_, i=i, c=calls: c.__setitem__(i, c[i] + 1))
        saved[mode], got = saved_bytes_and_grads(model, x)
        assert calls == ([2] * 4 if mode == "full" else [1, 2, 1, 2])  # recomputed in backward
        assert list(model.state_dict()) == keys  # nothing renamed: checkpoints load unchanged
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-7, rtol=1e-6, msg=name)
    assert saved["full"] < saved["every:2"] < saved_none


def test_checkpointing_mode_is_validated(tiny, capsys):
    for bad in ("every:0", "some", "every:x"):
        with pytest.raises(UserError, match="none, full or every:K"):
            load_config(None, {**tiny, "train.activation_checkpointing": bad})
    code = main(["train", "--activation-checkpointing", "every:-1", "--steps", "1"])
    assert_one_line_error(capsys, code, "every:-1", "every:K")


def losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


LEAN = {"train.activation_checkpointing": "full", "loss.chunk_tokens": 48}
PLAIN = {"train.activation_checkpointing": "none", "loss.chunk_tokens": 0}


SETUPS = {
    "cross_entropy": {},
    "z_loss": {"loss.name": "z_loss"},
    # Per-layer updates step each parameter inside the backward, between recomputed blocks.
    "per_layer": {"optimizer.per_layer_updates": True, "optimizer.grad_clip": 0.0,
                  "train.grad_accum": 2},
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_with_both_on_equals_training_with_both_off(tiny, tmp_path, setup):
    base = {**tiny, "train.steps": 8, "train.eval_every": 4, **SETUPS[setup]}
    runs = {}
    for name, extra in (("plain", PLAIN), ("lean", LEAN)):
        runs[name] = train(load_config(None, {**base, **extra, "train.out_dir": str(tmp_path / name)}))
    assert losses(tmp_path / "lean") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert runs["lean"]["val_loss"] == pytest.approx(runs["plain"]["val_loss"], rel=1e-5)


def test_chunked_evaluation_equals_plain(tiny):
    from sltrain.data import Blocks, prepare, prepare_options

    cfg = load_config(None, tiny)
    blocks = Blocks(prepare(cfg.data, 512, None, **prepare_options(cfg)).val, cfg.data.seq_len)
    model = build_model(cfg)
    x, y = blocks.batch(range(3))
    with torch.no_grad():
        got = token_losses(model, x, y, contextlib.nullcontext(), chunk_tokens=10)
        want = token_losses(model, x, y, contextlib.nullcontext(), chunk_tokens=0)
    torch.testing.assert_close(got, want, **TOL)
    args = (model, blocks, 4, 2, torch.device("cpu"), contextlib.nullcontext())
    assert evaluate(*args, chunk_tokens=10)["val_loss"] == pytest.approx(
        evaluate(*args, chunk_tokens=0)["val_loss"], rel=1e-6)


def test_resume_with_checkpointing_equals_the_uninterrupted_run(tiny, tmp_path):
    base = {**tiny, "train.steps": 8, "train.grad_accum": 2, "train.eval_every": 0, **LEAN,
            "train.activation_checkpointing": "every:2", "method.name": "sltrain"}
    train(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the step, save, stop

    b = tmp_path / "b"
    assert train(load_config(None, {**base, "train.out_dir": str(b)}), on_step=interrupt)["step"] == 3
    resumed = train(resume_config(b, {}), run_dir=b, resume=b)
    assert resumed["status"] == "finished"
    assert losses(b) == losses(tmp_path / "a")  # exact, step by step


# Under DDP and FSDP2, with checkpointing and the chunked loss: tests/test_distributed.py.
