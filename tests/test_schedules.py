"""Learning-rate schedules: values against hand-computed closed forms and torch's schedulers,
continuity, the CLI, a training run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sltrain.cli import main
from sltrain.config import load_config
from sltrain.registry import SCHEDULES
from sltrain.train import train
from sltrain.train.schedule import build_scheduler, cosine, schedule_options

OPTIONS = {  # the keyword options of each schedule, as a run would pass them
    "cosine": {}, "wsd": {"decay_ratio": 0.2, "decay_shape": "1-sqrt"},
    "power": {"tokens_per_step": 1000, "peak_lr": 1e-3, "power_a": 0.1, "power_b": -0.5,
              "decay_ratio": 0.2, "power_decay": "exp"},
    "infinite": {"cooldown_ratio": 0.2, "const_lr_ratio": 0.5, "decay_ratio": 0.1},
    "rewarm": {"start_lr_ratio": 0.3}, "cosine_restarts": {"cycle_steps": 100, "cycle_mult": 2.0},
}


def test_every_schedule_is_registered_and_tested():
    assert set(SCHEDULES) == set(OPTIONS)


@pytest.mark.parametrize("total,warmup,min_lr,expected", [
    # T=1000, W=100, r=0.1: the warm-up climbs 1/100 a step; the decay is p = (s-100)/900.
    (1000, 100, 0.1, {0: 0.01, 49: 0.5, 99: 1.0, 100: 1.0,
                      325: 0.1 + 0.45 * (1 + 2**-0.5),  # p = 1/4: cos = 1/sqrt(2)
                      550: 0.55,  # p = 1/2: cos = 0
                      775: 0.1 + 0.45 * (1 - 2**-0.5),  # p = 3/4
                      1000: 0.1, 1001: 0.1, 5000: 0.1}),  # past the end it stays at r
    (10, 0, 0.5, {0: 1.0, 5: 0.75, 10: 0.5}),  # no warm-up: decay from step 0
    (250, 25, 0.0, {24: 1.0, 25 + 75: 0.75, 25 + 150: 0.25, 250: 0.0}),  # p = 1/3: cos = 1/2
])
def test_cosine_matches_hand_computed_values(total, warmup, min_lr, expected):
    for step, want in expected.items():
        assert cosine(step, total, warmup, min_lr) == pytest.approx(want, abs=1e-12), step


@pytest.mark.parametrize("total,warmup,min_lr", [(1000, 100, 0.1), (250, 25, 0.0), (10, 0, 0.5),
                                                  (7, 1, 0.2), (20, 3, 0.1)])
def test_cosine_equals_torchs_linear_warmup_then_cosine_annealing(total, warmup, min_lr):
    """torch's own schedulers, composed: LinearLR from 1/W to 1 over the W warm-up updates (so
    update s < W runs at (s+1)/W), then CosineAnnealingLR from the peak to r * peak over T - W."""
    peak = 2.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    anneal = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr * peak)
    reference = anneal
    if warmup:
        ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                                 total_iters=max(1, warmup - 1))
        reference = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, anneal], milestones=[warmup])
    for step in range(total + 1):  # past T torch's cosine climbs again; ours stays at r
        assert cosine(step, total, warmup, min_lr) == pytest.approx(
            opt.param_groups[0]["lr"] / peak, rel=1e-12, abs=1e-14), step
        opt.step()
        reference.step()


@pytest.mark.parametrize("shape,expected", [
    # T=1000, W=100, decay over the last 200 steps from step 800, to 0.1; at step 900 p = 0.5
    ("1-sqrt", {99: 1.0, 500: 1.0, 800: 1.0, 900: 0.1 + 0.9 * (1 - 0.5**0.5),
                999: 0.1 + 0.9 * (1 - 0.995**0.5), 1000: 0.1}),
    ("linear", {99: 1.0, 500: 1.0, 900: 0.55, 999: 0.1045, 1000: 0.1}),
    ("cosine", {99: 1.0, 500: 1.0, 850: 0.1 + 0.45 * (1 + 2**-0.5), 900: 0.55, 1000: 0.1}),
])
def test_wsd_matches_its_formula(shape, expected):
    for step, want in expected.items():
        got = SCHEDULES["wsd"].obj(step, 1000, 100, 0.1, decay_ratio=0.2, decay_shape=shape)
        assert got == pytest.approx(want, abs=1e-12), step
    assert SCHEDULES["wsd"].obj(0, 1000, 100, 0.1) == pytest.approx(0.01)


def test_power_matches_its_formula():
    # 1000 tokens per step, peak 1e-3, lr = 0.1 n^-0.5 = 1e-3 * 100 / sqrt(1000 s): capped to 1
    # up to step 10; T=100, decay over the last 20 steps from step 80.
    opts = {**OPTIONS["power"]}
    f = SCHEDULES["power"].obj
    assert f(9, 100, 10, 0.1, **opts) == pytest.approx(1.0)  # end of warm-up: P(10) = 1
    assert f(40, 100, 10, 0.1, **opts) == pytest.approx(0.5)
    assert f(50, 100, 10, 0.1, **opts) == pytest.approx(0.4472135955)  # middle
    assert f(80, 100, 10, 0.1, **opts) == pytest.approx(0.3535533906)  # start of decay
    assert f(90, 100, 10, 0.1, **opts) == pytest.approx(0.3535533906 * 0.1**0.5)  # exp, p = 0.5
    assert f(100, 100, 10, 0.1, **opts) == pytest.approx(0.03535533906)
    assert f(90, 100, 10, 0.1, **{**opts, "power_decay": "linear"}) == pytest.approx(0.3535533906 * 0.55)
    # a longer warm-up climbs to the power-law rate at its end: P(20) = 1/sqrt(2)
    assert f(9, 100, 20, 0.1, **opts) == pytest.approx(0.5 * 2**-0.5)
    assert f(19, 100, 20, 0.1, **opts) == pytest.approx(2**-0.5)


def test_infinite_matches_its_formula():
    # T=1000, W=100, cosine cooldown to 0.5 over 200 steps, constant, exp anneal over the last 100
    f = lambda s: SCHEDULES["infinite"].obj(s, 1000, 100, 0.1, **OPTIONS["infinite"])  # noqa: E731
    assert f(99) == pytest.approx(1.0)
    assert f(200) == pytest.approx(0.75)
    assert f(300) == pytest.approx(0.5)
    assert f(500) == pytest.approx(0.5)
    assert f(899) == pytest.approx(0.5)
    assert f(950) == pytest.approx(0.5 * 0.2**0.5)
    assert f(1000) == pytest.approx(0.1)


def test_rewarm_starts_from_its_ratio_and_then_follows_cosine():
    f = lambda s: SCHEDULES["rewarm"].obj(s, 1000, 100, 0.1, start_lr_ratio=0.3)  # noqa: E731
    assert f(0) == pytest.approx(0.3)
    assert f(50) == pytest.approx(0.65)
    assert f(100) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.55)
    assert f(1000) == pytest.approx(0.1)


def test_cosine_restarts_matches_its_formula():
    # W=10, cycles of 100, 200, 400 ... steps from step 10, down to 0
    f = lambda s: SCHEDULES["cosine_restarts"].obj(s, 1000, 10, 0.0, cycle_steps=100, cycle_mult=2.0)  # noqa: E731
    assert f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(109) == pytest.approx(0.5 * (1 + math.cos(0.99 * math.pi)))
    assert f(110) == pytest.approx(1.0)  # restart
    assert f(210) == pytest.approx(0.5)
    assert f(310) == pytest.approx(1.0)
    assert f(510) == pytest.approx(0.5)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_are_continuous_except_at_restarts(name):
    total, warmup = 100_000, 10_000
    opts = {**OPTIONS[name], "cycle_steps": 20_000} if name == "cosine_restarts" else OPTIONS[name]
    if name == "power":
        opts = {**opts, "power_a": 4.0, "power_b": -0.51, "peak_lr": 3e-3, "tokens_per_step": 100}
    values = [SCHEDULES[name].obj(s, total, warmup, 0.1, **opts) for s in range(total + 1)]
    jumps = [s for s in range(1, total + 1) if abs(values[s] - values[s - 1]) > 0.01]
    assert jumps == ([30_000, 70_000] if name == "cosine_restarts" else [])
    assert min(values) > 0 and max(values) <= 1.0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_restart_ramp_works_with_every_schedule(name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, name, 1000, 100, 0.1, 10, lambda s: 500 if s >= 500 else None,
                            **OPTIONS[name])
    for _ in range(505):
        opt.step()
        sched.step()
    plain = SCHEDULES[name].obj(505, 1000, 100, 0.1, **OPTIONS[name])
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * plain * 0.6)


def test_schedule_options_come_from_the_config(tiny):
    cfg = load_config(None, {**tiny, "schedule.name": "power", "schedule.power_a": 2.0})
    assert schedule_options(cfg) == {
        "tokens_per_step": 8 * 32, "peak_lr": 3e-3, "power_a": 2.0, "power_b": -0.51,
        "decay_ratio": 0.2, "power_decay": "exp"}
    assert schedule_options(load_config(None, tiny)) == {}


@pytest.mark.parametrize("flags,words", [
    (["--schedule", "wsd", "--steps", "100", "--warmup-steps", "90"], "exceed the 100 steps"),
    (["--schedule", "infinite", "--min-lr-ratio", "0"], "cannot reach zero"),
    (["--schedule", "power", "--min-lr-ratio", "0"], "cannot reach zero"),
    (["--schedule", "infinite", "--min-lr-ratio", "0.6"], "set min <= const"),
    (["--schedule", "infinite", "--cooldown-ratio", "0.8"], "exceed the"),
    (["--cycle-mult", "0.5"], "--cycle-mult"),
    (["--power-b", "0.5"], "--power-b"),
    (["--decay-shape", "sqrt"], "--decay-shape"),
    (["--decay-ratio", "1.5"], "--decay-ratio"),
    (["--start-lr-ratio", "-1"], "--start-lr-ratio"),
    (["--schedule", "step"], "--schedule"),
    (["--compare"], "--plot"),
])
def test_bad_hyperparameters_are_refused_in_one_line(capsys, flags, words):
    assert main(["schedule", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sltrain: error:") and words in err


def test_power_with_linear_decay_may_reach_zero():
    cfg = load_config(None, {"schedule.name": "power", "schedule.power_decay": "linear",
                             "schedule.min_lr_ratio": 0.0})
    assert cfg.schedule.min_lr_ratio == 0.0
    opts = {**OPTIONS["power"], "power_decay": "linear"}  # decays linearly to 0 at the last step
    start = SCHEDULES["power"].obj(80, 100, 10, 0.0, **opts)
    assert SCHEDULES["power"].obj(90, 100, 10, 0.0, **opts) == pytest.approx(0.5 * start)
    assert SCHEDULES["power"].obj(100, 100, 10, 0.0, **opts) == 0.0


def test_cli_prints_key_steps_and_writes_a_plot(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["schedule", "--schedule", "wsd", "--steps", "1000", "--lr", "0.01",
                 "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "start of decay" in text and "800" in text and "end of warm-up" in text
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    both = tmp_path / "all.png"
    assert main(["schedule", "--compare", "--plot", str(both), "--print", "--steps", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-52] == "step\tmultiplier\tlr" and lines[-51].startswith("0\t")
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and both.stat().st_size > 10_000


def test_a_wsd_run_logs_the_rates_of_its_formula(tiny, tmp_path):
    cfg = load_config(None, {**tiny, "train.steps": 10, "train.eval_every": 0,
                             "schedule.name": "wsd", "schedule.warmup_steps": 2,
                             "schedule.decay_ratio": 0.5, "schedule.decay_shape": "linear"})
    summary = train(cfg)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert summary["status"] == "finished" and sorted(lrs) == list(range(1, 11))
    for step, lr in lrs.items():
        u = step - 1  # the 0-based update this record logs
        want = (u + 1) / 2 if u < 2 else 1.0 if u < 5 else 0.1 + 0.9 * (1 - (u - 5) / 5)
        assert lr == pytest.approx(3e-3 * want, rel=1e-9), step
