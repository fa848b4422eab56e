import json
import math

import pytest
import torch
import torch.nn.functional as F

from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.measure.loss import lm_loss
from sltrain.registry import LOSSES
from sltrain.train import train
from sltrain.train.losses import (
    IGNORE_INDEX,
    TrainingLoss,
    build_loss,
    cross_entropy,
    logit_z_reg,
    z_loss,
)

VOCAB = 50


def batch(seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, VOCAB, generator=g) * scale
    targets = torch.randint(0, VOCAB, (3, 7), generator=g)
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_is_exactly_the_old_lm_loss(reduction):
    logits, targets = batch()
    ours = cross_entropy(logits, targets, reduction)
    assert torch.equal(ours, lm_loss(logits, targets, reduction))
    assert torch.equal(ours, F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             reduction=reduction))


def test_z_loss_is_shift_and_scale_invariant_per_row():
    logits, targets = batch()
    g = torch.Generator().manual_seed(1)
    shift = torch.randn(3, 7, 1, generator=g) * 100
    scale = torch.rand(3, 7, 1, generator=g) * 20 + 0.05
    moved = logits * scale + shift
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(z_loss(moved, targets, reduction),
                                   z_loss(logits, targets, reduction), rtol=1e-5, atol=1e-5)
    # cross-entropy is not scale invariant: the check above is not vacuous
    assert not torch.allclose(cross_entropy(moved, targets), cross_entropy(logits, targets))


def test_z_loss_matches_the_formula_by_hand():
    logits, targets = batch(seed=3)
    a, b = 0.5, 4.0
    o = logits.flatten(0, 1).double()
    t = targets.flatten()
    z = (o - o.mean(-1, keepdim=True)) / o.std(-1, unbiased=False, keepdim=True)
    by_hand = (torch.log1p(torch.exp(a * (b - z[torch.arange(len(t)), t]))) / a).mean()
    assert z_loss(logits, targets, a=a, b=b).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_z_loss_gradient_is_finite_and_descends():
    # a toy problem: a linear classifier on random features, trained by plain gradient descent
    g = torch.Generator().manual_seed(2)
    features = torch.randn(4, 16, 8, generator=g)
    targets = torch.randint(0, VOCAB, (4, 16), generator=g)
    head = torch.nn.Linear(8, VOCAB)
    opt = torch.optim.SGD(head.parameters(), lr=20.0)
    first = z_loss(head(features), targets).item()
    for _ in range(50):
        opt.zero_grad()
        loss = z_loss(head(features), targets)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in head.parameters())
        opt.step()
    assert z_loss(head(features), targets).item() < first - 1.0
    # a row whose logits are all equal (std 0) still gives a finite loss and gradient
    flat = torch.zeros(1, 1, VOCAB, requires_grad=True)
    loss = z_loss(flat, torch.tensor([[4]]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(flat.grad).all()


def test_logit_z_reg_is_cross_entropy_plus_the_squared_log_partition():
    logits, targets = batch(seed=4)
    coef = 1e-2
    o, t = logits.flatten(0, 1), targets.flatten()
    lse = torch.logsumexp(o, -1)
    per_token = (lse - o[torch.arange(len(t)), t]) + coef * lse**2
    got = logit_z_reg(logits, targets, "none", coef=coef)
    torch.testing.assert_close(got, per_token)
    torch.testing.assert_close(logit_z_reg(logits, targets, coef=coef), per_token.mean())
    torch.testing.assert_close(logit_z_reg(logits, targets, "sum", coef=coef), per_token.sum())


@pytest.mark.parametrize("name", list(LOSSES))
def test_ignored_targets_count_nowhere_and_get_no_gradient(name):
    logits, targets = batch(seed=5)
    masked = targets.clone()
    masked[0, :3] = IGNORE_INDEX
    masked[2, -1] = IGNORE_INDEX
    keep = masked != IGNORE_INDEX
    fn = LOSSES[name].obj

    leaf = logits.clone().requires_grad_(True)
    loss = fn(leaf, masked)
    loss.backward()
    # the mean is over the kept tokens only, as if the ignored ones were never there
    kept = fn(logits[keep].unsqueeze(0), targets[keep].unsqueeze(0))
    torch.testing.assert_close(loss.detach(), kept)
    assert torch.equal(leaf.grad[~keep], torch.zeros_like(leaf.grad[~keep]))
    assert leaf.grad[keep].abs().sum() > 0
    # sum / none: ignored tokens contribute exactly zero
    none = fn(logits, masked, "none")
    assert none.shape == (masked.numel(),)
    assert torch.equal(none[~keep.flatten()], torch.zeros(int((~keep).sum())))
    torch.testing.assert_close(fn(logits, masked, "sum"), none.sum())


def test_training_loss_keeps_the_step_cross_entropy():
    logits, targets = batch(seed=6)
    ce = cross_entropy(logits, targets).item()
    plain = TrainingLoss("cross_entropy")
    plain(logits, targets)
    assert plain.step_metrics() == {}
    z = TrainingLoss("z_loss", grad_accum=2, a=0.1, b=10.0)
    z(logits * 2, targets)  # a micro-batch of the previous step: pushed out by the next two
    z(logits, targets)
    z(logits, targets)
    assert z.step_metrics() == {"ce": pytest.approx(ce)}


@pytest.mark.parametrize("name", list(LOSSES))
def test_short_run_with_each_loss_lowers_validation_cross_entropy(tiny, tmp_path, name):
    cfg = load_config(None, {**tiny, "loss.name": name, "train.steps": 30,
                             "train.eval_every": 0})
    assert build_loss(cfg).name == name
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    first_ce = steps[0]["ce"] if name != "cross_entropy" else steps[0]["loss"]
    assert all(("ce" in r) == (name != "cross_entropy") for r in steps)
    # validation reports the model's cross-entropy whatever the objective
    assert summary["val_loss"] < first_ce - 0.3, (name, first_ce, summary["val_loss"])
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))


@pytest.mark.parametrize("key, value, fix", [
    ("loss.name", "focal", "--loss"),
    ("loss.z_loss_a", 0, "--z-loss-a"),
    ("loss.z_loss_a", -1.0, "--z-loss-a"),
    ("loss.z_loss_b", float("nan"), "--z-loss-b"),
    ("loss.logit_z_coef", -1e-4, "--logit-z-coef"),
])
def test_bad_loss_settings_are_refused_in_one_line(key, value, fix):
    with pytest.raises(UserError) as e:
        load_config(None, {key: value})
    message = str(e.value)
    assert "\n" not in message and key in message and fix in message
