import copy
import gc
import json
import os
import signal
import threading

import pytest
import torch

from sltrain.config import load_config, resume_config
from sltrain.errors import UserError
from sltrain.measure import PeakMemory
from sltrain.train import train
from sltrain.train.trainer import Trainer


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


STATE_KEYS = {"step", "tokens_seen", "elapsed_s", "skipped_nonfinite", "model", "optimizer",
              "scheduler", "sampler", "rng", "prune", "tricks", "rounding"}
# training_state.pt as runs wrote it before the TrainState (and its "tricks" entry) existed.
OLD_STATE_KEYS = ("step", "tokens_seen", "sampler", "optimizer", "scheduler", "rng", "elapsed_s",
                  "skipped_nonfinite", "prune")
RELORA_WARM = {"method.name": "relora", "method.warm_start_steps": 2, "optimizer.reset_every": 3,
               "schedule.restart_warmup": 2, "train.eval_every": 0}


def assert_same(a, b, path="state"):
    """Nested state dicts hold equal values (tensors exactly equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_train_state_round_trip_restores_every_part(tiny, tmp_path):
    base = {**tiny, **RELORA_WARM, "train.steps": 8, "train.grad_accum": 2}
    a = Trainer(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))
    for _ in range(4):  # past the warm start (2) and the first merge (5 is next)
        assert a.train_step() is not None
    saved = a.state_dict()
    assert set(saved) == STATE_KEYS
    b = Trainer(load_config(None, {**base, "train.out_dir": str(tmp_path / "b")}))
    assert b.state.counters.step == 0 and b.sampler.position == 0
    assert all(layer.weight.requires_grad for layer in b.tricks.warm_layers)  # still warm
    b.load_state_dict(copy.deepcopy(saved))  # as from a file: no tensor shared with `a`
    restored, now = b.state_dict(), a.state_dict()
    assert restored["elapsed_s"] == pytest.approx(saved["elapsed_s"], abs=1.0)
    for state in (restored, now):
        state.pop("elapsed_s")
    assert_same(restored, now)
    assert (b.state.counters.step, b.state.counters.tokens_seen) == (4, 4 * 2 * 8 * 32)
    assert b.sampler.position == a.sampler.position > 0
    assert b.tricks.step == 4 and not any(layer.weight.requires_grad for layer in b.tricks.warm_layers)
    assert b.optimizer.state_dict()["state"] and b.scheduler.last_epoch == 4
    # The next update is the same in both: nothing the step depends on was left behind.
    ra, rb = a.train_step(), b.train_step()
    assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]
    assert_same(a.raw_model.state_dict(), b.raw_model.state_dict())


def test_a_checkpoint_in_the_old_format_still_resumes_exactly(tiny, tmp_path):
    base = {**tiny, **RELORA_WARM, "train.steps": 8}
    train(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))

    def interrupt(step, record):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    b = tmp_path / "b"
    train(load_config(None, {**base, "train.out_dir": str(b)}), on_step=interrupt)
    state_file = b / "checkpoints" / "step_0000004" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert set(state) == STATE_KEYS - {"model"}
    torch.save({k: state[k] for k in OLD_STATE_KEYS}, state_file)
    # Without its "tricks" entry the resumed run must still know the warm start has ended.
    resumed = train(resume_config(b, {}), run_dir=b, resume=b)
    assert resumed["status"] == "finished" and resumed["step"] == 8
    assert losses(b) == losses(tmp_path / "a")
    assert set(torch.load(b / "checkpoints" / "step_0000008" / "training_state.pt",
                          weights_only=True)) == STATE_KEYS - {"model"}


def test_a_checkpoint_missing_a_part_is_refused_in_one_line(tiny, tmp_path):
    cfg = load_config(None, {**tiny, "train.steps": 2, "train.eval_every": 0})
    train(cfg)
    run = tmp_path / "run"
    state_file = run / "checkpoints" / "step_0000002" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["sampler"]
    torch.save(state, state_file)
    with pytest.raises(UserError, match=r"step_0000002 lacks sampler; it is damaged"):
        train(resume_config(run, {}), run_dir=run, resume=run)


def test_no_memory_sampler_outlives_its_run(tiny, tmp_path):
    """The CPU peak's RSS sampler wakes every 2 ms: one left running by a failed, interrupted or
    dropped run takes the interpreter's lock from every later run in the process."""
    def new_samplers(wait=True):
        alive = [t for t in threading.enumerate()
                 if t.name == PeakMemory.THREAD_NAME and t.ident not in before]
        for t in alive if wait else ():
            t.join(timeout=5)
        return [t for t in alive if t.is_alive()]

    before = {t.ident for t in threading.enumerate()}
    cfg = load_config(None, {**tiny, "train.steps": 2, "train.eval_every": 0})
    train(cfg)
    assert not new_samplers()

    def fail(step, record):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):  # a run that fails mid-loop
        train(load_config(None, {**tiny, "train.out_dir": str(tmp_path / "b")}), on_step=fail)
    assert not new_samplers()
    run = tmp_path / "run"  # a resume that fails after the sampler started (a damaged checkpoint)
    (run / "checkpoints" / "step_0000002" / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        train(resume_config(run, {}), run_dir=run, resume=run)
    assert not new_samplers()
    trainer = Trainer(load_config(None, {**tiny, "train.out_dir": str(tmp_path / "c")}))
    assert trainer.train_step() is not None and len(new_samplers(wait=False)) == 1
    del trainer  # built and dropped without a summary
    gc.collect()
    assert not new_samplers()
