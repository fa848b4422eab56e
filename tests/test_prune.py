import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from sltrain.config import load_config, resume_config
from sltrain.errors import UserError
from sltrain.model import build_model
from sltrain.optim import build_optimizer
from sltrain.run.folder import load_run_model
from sltrain.train import train
from sltrain.train.prune import Pruner, prunable, prune_window, sparsity_at


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cubic(s_f, t, t0, t1):
    return s_f * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)


def test_schedule_follows_the_cubic_ramp_at_its_events():
    cfg = load_config(None, {"train.steps": 100, "prune.target_sparsity": 0.75,
                             "prune.prune_every": 10})
    assert prune_window(cfg) == (25, 75)
    assert sparsity_at(cfg, 24) == 0 and sparsity_at(cfg, 25) == 0
    assert sparsity_at(cfg, 55) == pytest.approx(cubic(0.75, 55, 25, 75))  # events 25, 35, ...
    assert sparsity_at(cfg, 50) == pytest.approx(cubic(0.75, 45, 25, 75))  # held between them
    assert sparsity_at(cfg, 75) == sparsity_at(cfg, 100) == 0.75
    lin = load_config(None, {"train.steps": 100, "prune.target_sparsity": 0.5,
                             "prune.prune_schedule": "linear", "prune.prune_every": 5})
    assert sparsity_at(lin, 50) == pytest.approx(0.25)


@pytest.mark.parametrize("method", ["full", "sparse", "sltrain"])
def test_pruning_hits_its_targets_and_pruned_entries_stay_zero(tiny, method):
    cfg = load_config(None, {**tiny, "method.name": method, "train.steps": 20,
                             "prune.target_sparsity": 0.75, "prune.prune_every": 2,
                             "method.density": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.rank)
    pruner = Pruner(model, cfg)
    names = {n for n, _ in prunable(model, cfg)}
    assert names == ({f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
                     if method == "full" else {n for n, _ in model.named_parameters()
                                               if n.endswith(".values")})
    t0, t1 = prune_window(cfg)
    checks = {t0: 0.0, 9: cubic(0.75, 9, t0, t1), t1: 0.75, 20: 0.75}
    for step in range(1, 21):
        x = torch.randint(0, 512, (4, 16))
        F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        pruner.before_step()
        optimizer.step()
        optimizer.zero_grad()
        record = pruner.after_step(step, optimizer)
        expected_pruned = 0
        for name, p in pruner.params:
            k = round(sparsity_at(cfg, step) * p.numel())
            expected_pruned += k
            if step in checks:
                assert k == round(checks[step] * p.numel())
                assert int((p == 0).sum()) == k, (name, step)  # exactly the target, no more
            mask = pruner.masks.get(name)
            if mask is not None:
                assert torch.all(p[~mask] == 0)
                for state in ("exp_avg", "exp_avg_sq"):
                    assert torch.all(optimizer.state[p][state][~mask] == 0)
        assert record["params_nonzero"] == pruner.total - expected_pruned
    # a pruned entry never comes back: the final masks contain every earlier one
    assert all(int((~m).sum()) == round(0.75 * m.numel()) for m in pruner.masks.values())


def test_run_records_params_avg_and_prunes_the_saved_weights(tiny, tmp_path):
    cfg = load_config(None, {**tiny, "method.name": "full", "train.steps": 16,
                             "train.eval_every": 0, "prune.target_sparsity": 0.5,
                             "prune.prune_every": 3})
    summary = train(cfg)
    run = tmp_path / "run"
    counts = [r["params_nonzero"] for r in metrics(run)]
    assert summary["params_avg"] == pytest.approx(sum(counts) / len(counts))
    assert summary["params_final"] == counts[-1] < counts[0] == summary["params"]["total"]
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["params_avg"] == summary["params_avg"] and on_disk["tokens_seen"] > 0
    model, _, _ = load_run_model(run)
    for name, p in prunable(model, cfg):
        assert int((p == 0).sum()) == round(0.5 * p.numel()), name
    # unpruned runs report the same keys, equal to the model's size
    plain = train(load_config(None, {**tiny, "method.name": "sparse", "train.steps": 3,
                                     "train.eval_every": 0, "train.out_dir": str(tmp_path / "p")}))
    assert plain["params_avg"] == plain["params_final"] == plain["params"]["total"]


def test_resume_with_pruning_equals_the_uninterrupted_run(tiny, tmp_path):
    base = {**tiny, "method.name": "full", "train.steps": 12, "train.eval_every": 0,
            "prune.target_sparsity": 0.6, "prune.prune_every": 2}  # events at 3, 5, 7, 9
    train(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))

    def interrupt(step, record):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    b = tmp_path / "b"
    stopped = train(load_config(None, {**base, "train.out_dir": str(b)}), on_step=interrupt)
    assert stopped["step"] == 6
    resumed = train(resume_config(b, {}), run_dir=b, resume=b)
    keys = ("step", "loss", "params_nonzero", "prune_sparsity")
    assert ([[r[k] for k in keys] for r in metrics(b)]
            == [[r[k] for k in keys] for r in metrics(tmp_path / "a")])
    uninterrupted = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert resumed["params_avg"] == uninterrupted["params_avg"]
    with pytest.raises(UserError, match="prune.target_sparsity"):
        resume_config(b, {"prune.target_sparsity": 0.3})


def test_bad_pruning_settings_are_refused(tiny):
    with pytest.raises(UserError, match="lowrank"):
        train(load_config(None, {**tiny, "method.name": "lowrank", "prune.target_sparsity": 0.5}))
    with pytest.raises(UserError, match="prune-start"):
        load_config(None, {"prune.prune_start": 0.8, "prune.prune_end": 0.5})
    with pytest.raises(UserError, match="target_sparsity"):
        load_config(None, {"prune.target_sparsity": 1.0})
