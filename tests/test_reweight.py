import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.train import train
from sltrain.train.losses import IGNORE_INDEX, TrainingLoss, cross_entropy, logit_z_reg, z_loss
from sltrain.train.reweight import SampleReweighter, normalise, sample_weights

LOSSES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # min 1, max 5, mid-point 3


def softmax(xs, r=1.0):
    e = [math.exp(x / r) for x in xs]
    return [v / sum(e) for v in e]


def test_normalise_maps_min_and_max_onto_minus_and_plus_delta():
    z = normalise(LOSSES, 0.5)
    torch.testing.assert_close(z, torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5]))
    assert torch.equal(normalise(torch.full((4,), 2.5), 1.0), torch.zeros(4))  # max == min


@pytest.mark.parametrize("strategy,f", [
    # l~ = -1, -0.5, 0, 0.5, 1 with delta 1
    ("linupper", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("quadratic", [0.0, 0.75, 1.0, 0.75, 0.0]),
    ("extremes", [1.0, 0.5, 0.0, 0.5, 1.0]),
    ("uniform", [0.0] * 5),
])
@pytest.mark.parametrize("r", [1.0, 0.3])
def test_each_strategy_is_its_formula(strategy, f, r):
    w = sample_weights(LOSSES, strategy, temperature=r, delta=1.0)
    torch.testing.assert_close(w, torch.tensor(softmax(f, r)))
    assert w.sum().item() == pytest.approx(1.0)


def test_strategies_order_the_samples_as_the_paper_says():
    lin = sample_weights(LOSSES, "linupper")
    assert lin[0] == lin.min() and lin[0] < lin[1] < lin[2]
    assert lin[2] == lin[3] == lin[4]  # every sample at or above the mid-point: the top weight
    quad = sample_weights(LOSSES, "quadratic")
    assert quad.argmax() == 2 and quad[0] == quad[4] == quad.min()
    ext = sample_weights(LOSSES, "extremes")
    assert ext.argmin() == 2 and ext[0] == ext[4] == ext.max()
    # delta scales the spread: linupper with delta 2 on the same losses is softmax(2 * f)
    torch.testing.assert_close(sample_weights(LOSSES, "linupper", delta=2.0),
                               torch.tensor(softmax([0.0, 1.0, 2.0, 2.0, 2.0])))


def test_temperature_large_is_uniform_small_is_peaked():
    for strategy in ("linupper", "quadratic", "extremes"):
        w = sample_weights(LOSSES, strategy, temperature=1e6)
        torch.testing.assert_close(w, torch.full((5,), 0.2))
    assert sample_weights(LOSSES, "quadratic", temperature=1e-3)[2].item() == pytest.approx(1.0)


def test_warmup_gives_uniform_weights_then_the_strategy():
    rw = SampleReweighter("extremes", warmup_steps=3)
    for step in range(3):
        assert torch.equal(rw.weights(LOSSES, step), torch.full((5,), 0.2))
    torch.testing.assert_close(rw.weights(LOSSES, 3), sample_weights(LOSSES, "extremes"))
    rw(LOSSES, 0)
    assert rw.step_metrics() == {"reweight_max_w": pytest.approx(1.0),
                                 "reweight_entropy": pytest.approx(1.0)}
    rw(LOSSES, 3)
    stats = rw.step_metrics()
    assert stats["reweight_max_w"] > 1.0 and stats["reweight_entropy"] < 1.0


@pytest.mark.parametrize("fn", [cross_entropy, z_loss, logit_z_reg])
def test_per_sample_reduction_is_each_rows_mean_over_kept_tokens(fn):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 20, generator=g)
    targets = torch.randint(0, 20, (3, 6), generator=g)
    targets[1, :4] = IGNORE_INDEX
    per_sample = fn(logits, targets, "sample")
    for i in range(3):
        assert per_sample[i].item() == pytest.approx(fn(logits[i:i + 1], targets[i:i + 1]).item(),
                                                     rel=1e-6)


def test_reweighted_gradient_is_the_weighted_sum_of_per_sample_gradients():
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(30, 8)
    head = torch.nn.Linear(8, 30)
    x = torch.randint(0, 30, (4, 5), generator=g)
    y = torch.randint(0, 30, (4, 5), generator=g)
    params = [*emb.parameters(), *head.parameters()]
    for strategy in ("linupper", "quadratic", "extremes"):
        loss_fn = TrainingLoss("cross_entropy", reweighter=SampleReweighter(strategy, 0.5))
        objective = loss_fn(head(emb(x)), y)
        grads = torch.autograd.grad(objective, params)
        per_sample = torch.stack([cross_entropy(head(emb(x[i:i + 1])), y[i:i + 1])
                                  for i in range(4)])
        w = sample_weights(per_sample, strategy, 0.5)
        assert objective.item() == pytest.approx((w * per_sample).sum().item(), rel=1e-6)
        manual = [torch.zeros_like(p) for p in params]
        for i in range(4):
            for m, gi in zip(manual, torch.autograd.grad(per_sample[i], params, retain_graph=True),
                             strict=True):
                m += w[i] * gi
        for a, b in zip(grads, manual, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(w, torch.full_like(w, 0.25))  # the check above is not vacuous


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_uniform_reweighting_trains_exactly_as_plain_training(tiny, tmp_path):
    base = {**tiny, "train.steps": 4, "train.eval_every": 0, "train.grad_accum": 2}
    train(load_config(None, {**base, "train.out_dir": str(tmp_path / "plain")}))
    train(load_config(None, {**base, "train.out_dir": str(tmp_path / "uni"),
                             "loss.reweight": "uniform"}))
    plain, uni = _metrics(tmp_path / "plain"), _metrics(tmp_path / "uni")
    for a, b in zip(plain, uni, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["ce"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["reweight_max_w"] == pytest.approx(1.0)
    wa = load_file(tmp_path / "plain" / "checkpoints" / "step_0000004" / "model.safetensors")
    wb = load_file(tmp_path / "uni" / "checkpoints" / "step_0000004" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_linupper_run_logs_its_weights_and_moves_away_from_plain(tiny, tmp_path):
    base = {**tiny, "train.steps": 4, "train.eval_every": 0}
    train(load_config(None, {**base, "loss.reweight": "linupper", "loss.reweight_warmup_steps": 2,
                             "loss.reweight_temperature": 0.5}))
    m = _metrics(tmp_path / "run")
    assert [r["reweight_max_w"] == pytest.approx(1.0) for r in m] == [True, True, False, False]
    assert all(r["reweight_max_w"] > 1.0 for r in m[2:])


@pytest.mark.parametrize("key,value,match", [
    ("loss.reweight", "hardest", "loss.reweight"),
    ("loss.reweight_temperature", 0, "loss.reweight_temperature"),
    ("loss.reweight_delta", -1.0, "loss.reweight_delta"),
    ("loss.reweight_warmup_steps", -2, "loss.reweight_warmup_steps"),
])
def test_bad_values_are_one_line(key, value, match):
    with pytest.raises(UserError, match=match) as e:
        load_config(None, {key: value})
    assert "\n" not in str(e.value)


# Under DDP and FSDP2 the weights are those of the global batch: tests/test_distributed.py.
