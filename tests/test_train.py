import json
import os
import signal

import pytest

from sltrain.config import load_config, resume_config
from sltrain.errors import UserError
from sltrain.train import train


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain"])
def test_short_run_lowers_loss_and_writes_the_run(tiny, tmp_path, method):
    cfg = load_config(None, {**tiny, "method.name": method, "train.steps": 30})
    summary = train(cfg)
    run = tmp_path / "run"
    history = losses(run)
    assert [s for s, _ in history] == list(range(1, 31))
    first, last = history[0][1], sum(v for _, v in history[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert summary["val_loss"] < first - 0.5
    assert summary["tokens_seen"] == 30 * 8 * 32
    assert summary["params"]["sparse"] > 0 if method == "sltrain" else summary["params"]["sparse"] == 0
    for name in ("config.json", "summary.json", "tokenizer.json", "metrics.jsonl"):
        assert (run / name).is_file()
    assert json.loads((run / "summary.json").read_text())["val_ppl"] == summary["val_ppl"]
    assert (run / "checkpoints" / "step_0000030" / "model.safetensors").is_file()


RESUMABLE = {
    "adamw": {},
    # 8-bit subspace states, per-layer hooks with accumulation, projector refreshes every 3 steps
    "galore8bit-per-layer": {"optimizer.name": "galore8bit", "optimizer.per_layer_updates": True,
                             "optimizer.grad_clip": 0.0, "optimizer.update_proj_gap": 3,
                             "method.name": "full", "optimizer.proj_rank": 8},
    # warm start to step 2, merges after steps 5, 8, 11, jagged re-warm-up
    "relora": {"method.name": "relora", "method.warm_start_steps": 2, "optimizer.reset_every": 3,
               "schedule.restart_warmup": 2},
    "sltrain-refactor-reset": {"optimizer.reset_every": 4, "optimizer.refactor": True,
                               "optimizer.reset_momentum": True, "optimizer.name": "fira",
                               "optimizer.proj_rank": 4},
}


@pytest.mark.parametrize("setup", list(RESUMABLE))
def test_resume_after_interrupt_reproduces_the_uninterrupted_run(tiny, tmp_path, setup):
    base = {**tiny, "train.steps": 12, "train.grad_accum": 2, "train.eval_every": 0,
            **RESUMABLE[setup]}
    train(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))

    def interrupt(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the step, save, stop

    b = tmp_path / "b"
    stopped = train(load_config(None, {**base, "train.out_dir": str(b)}), on_step=interrupt)
    assert stopped["status"] == "interrupted by SIGINT" and stopped["step"] == 5
    assert [s for s, _ in losses(b)] == [1, 2, 3, 4, 5]
    resumed = train(resume_config(b, {}), run_dir=b, resume=b)
    assert resumed["status"] == "finished" and resumed["tokens_seen"] == 12 * 2 * 8 * 32
    assert losses(b) == losses(tmp_path / "a")  # exact, step by step


def test_resume_refuses_a_different_model(tiny, tmp_path):
    cfg = load_config(None, {**tiny, "train.steps": 2, "train.eval_every": 0})
    train(cfg)
    with pytest.raises(UserError, match="method.rank"):
        resume_config(tmp_path / "run", {"method.rank": 8})
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(cfg)
