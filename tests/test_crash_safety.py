"""Crash safety: SIGKILL mid-checkpoint, SIGTERM, non-finite losses, --resume auto, wrong run dirs."""

import json
import math
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import sltrain.train.losses as losses_module
from sltrain.cli import main
from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.registry import LOSSES
from sltrain.run.checkpoint import list_checkpoints, load_checkpoint
from sltrain.train import train


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def as_flags(overrides):
    return [a for k, v in overrides.items() for a in (f"--{k}", str(v))]


@pytest.fixture
def base(tiny):
    return {**tiny, "train.steps": 8, "train.eval_every": 0, "train.save_every": 2}


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(base, tmp_path):
    uninterrupted = tmp_path / "a"
    train(load_config(None, {**base, "train.out_dir": str(uninterrupted)}))
    run = tmp_path / "b"
    # The second checkpoint (step 4) dies by SIGKILL after its weights are written, before the
    # training state and the rename: a real crash at the worst moment.
    script = textwrap.dedent(f"""
        import os, signal, sys
        import sltrain.run.checkpoint as ckpt
        from sltrain.cli import main
        real, calls = ckpt.save_file, []
        def save_then_die(*args, **kwargs):
            real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save_file = save_then_die
        sys.exit(main(["train", *{as_flags({**base, "train.out_dir": run})!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert (run / "checkpoints" / ".tmp_step_0000004").is_dir()  # the torn write, ignored
    state = load_checkpoint(list_checkpoints(run)[-1], lambda t: None)
    assert state["step"] == 2
    assert main(["train", "--resume", str(run)]) == 0
    assert losses(run) == losses(uninterrupted)
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000008"]


def test_sigterm_saves_a_resumable_checkpoint(base, tmp_path):
    run = tmp_path / "run"
    # 150 steps: seconds of work left after step 3, so the signal lands mid-run.
    flags = as_flags({**base, "train.steps": 150, "train.save_every": 0, "train.out_dir": run})
    proc = subprocess.Popen([sys.executable, "-m", "sltrain", "train", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: sltrain train --resume" in err
    (ckpt,) = list_checkpoints(run)
    stopped_at = int(ckpt.name.split("_")[1])
    assert 3 <= stopped_at < 150 and len(losses(run)) == stopped_at
    # The same command with --resume auto continues the run to its end.
    assert main(["train", *flags, "--resume", "auto"]) == 0
    assert [s for s, _ in losses(run)] == list(range(1, 151))


def assert_identical(a, b, where="state"):
    """`a` and `b` hold the same keys, and tensors equal bit for bit (same dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def poison(monkeypatch, bad):
    """Make the training loss NaN on the loss calls `bad(n)` picks (n counts from 1)."""
    real, calls = losses_module.cross_entropy, [0]

    def lm_loss(logits, targets, reduction="mean"):
        calls[0] += 1
        loss = real(logits, targets, reduction)
        return loss * float("nan") if bad(calls[0]) else loss

    monkeypatch.setattr(LOSSES["cross_entropy"], "obj", lm_loss)


def checkpoint_at(run, step):
    weights = {}
    state = load_checkpoint(run / "checkpoints" / f"step_{step:07d}", weights.update)
    return weights, state


def lrs(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["lr"] for r in map(json.loads, lines) if "lr" in r}


@pytest.mark.parametrize("per_layer", [False, True])
def test_nonfinite_losses_skip_their_step_and_stop_after_k_in_a_row(base, tmp_path, monkeypatch,
                                                                     per_layer):
    # Per-layer updates step inside backward: the Trainer must see the loss before it.
    # The poison counts calls of the loss function: one per micro-batch with full logits (the
    # chunked loss calls it per chunk, in the forward and again in the backward).
    base = {**base, "train.save_every": 1, "train.keep_checkpoints": 100, "loss.chunk_tokens": 0,
            **({"optimizer.per_layer_updates": True, "optimizer.grad_clip": 0.0} if per_layer else {})}
    clean = tmp_path / "clean"
    train(load_config(None, {**base, "train.out_dir": str(clean)}))

    # The 3rd and 4th update attempts are NaN: skipped, and the run goes on to its 8 updates.
    poison(monkeypatch, lambda n: n in (3, 4))
    run = tmp_path / "a"
    summary = train(load_config(None, {**base, "train.out_dir": str(run)}))
    assert summary["status"] == "finished" and summary["step"] == 8
    assert summary["skipped_nonfinite"] == 2 and math.isfinite(summary["val_loss"])
    assert summary["tokens_seen"] == 8 * 8 * 32  # skipped attempts are not counted as trained
    assert [s for s, _ in losses(run)] == list(range(1, 9))
    assert all(math.isfinite(v) for _, v in losses(run))
    # The schedule did not advance on the skipped attempts: update k runs at the clean run's rate.
    assert lrs(run) == lrs(clean) and len(set(lrs(clean).values())) > 4
    weights, state = checkpoint_at(run, 8)
    assert state["scheduler"]["last_epoch"] == 8
    optim_states = (state["optimizer"]["per_parameter"] if per_layer else [state["optimizer"]])
    steps = {float(s["step"]) for o in optim_states for s in o["state"].values()}
    assert steps == {8.0}  # every parameter's optimizer counted exactly the 8 real updates
    assert all(torch.isfinite(t).all() for t in weights.values())
    # After the skip the run kept training: the updates from step 2 on moved the weights.
    assert any(not torch.equal(t, checkpoint_at(run, 2)[0][k]) for k, t in weights.items())

    # From the 6th attempt on every loss is NaN: after 3 in a row the run stops with the state
    # the three skipped attempts left behind, saved as step 5. It must be, tensor by tensor, the
    # state the clean run (same seed, same first 5 batches) saved right after its 5th update:
    # weights, optimizer state (moments and step counts) and scheduler state (lr, last_epoch).
    poison(monkeypatch, lambda n: n > 5)
    run = tmp_path / "b"
    with pytest.raises(UserError, match="3 update steps in a row at step 6.*lower --lr"):
        train(load_config(None, {**base, "train.out_dir": str(run), "train.max_nonfinite_steps": 3}))
    assert list_checkpoints(run)[-1].name == "step_0000005"
    (weights, state), (want_weights, want_state) = checkpoint_at(run, 5), checkpoint_at(clean, 5)
    assert_identical(weights, want_weights, "weights")
    assert_identical(state["optimizer"], want_state["optimizer"], "optimizer")
    assert_identical(state["scheduler"], want_state["scheduler"], "scheduler")
    assert state["step"] == 5 and state["tokens_seen"] == want_state["tokens_seen"]
    assert state["skipped_nonfinite"] == 3
    # ... and the comparison can tell states apart: the clean run's step 4 is another state.
    with pytest.raises(AssertionError):
        assert_identical(weights, checkpoint_at(clean, 4)[0])

    # The stopped run continues from that state to its end once the losses are finite again.
    monkeypatch.undo()
    summary = train(load_config(None, {**base, "train.out_dir": str(run)}), resume=run)
    assert summary["status"] == "finished" and summary["step"] == 8
    assert [s for s, _ in losses(run)] == list(range(1, 9))


def test_resume_auto_and_run_folders_of_another_config(base, tmp_path, capsys):
    run = tmp_path / "run"
    flags = as_flags({**base, "train.out_dir": run, "train.steps": 4})
    assert main(["train", *flags, "--resume", "auto"]) == 0  # nothing there: starts
    assert main(["train", *flags, "--steps", "6", "--resume", "auto"]) == 0  # continues
    assert [s for s, _ in losses(run)] == list(range(1, 7))
    capsys.readouterr()
    assert main(["train", *flags, "--rank", "8", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "made by another config" in err and "method.rank (16 -> 8)" in err
    assert main(["train", *flags, "--seq-len", "16"]) == 2  # a new run into a used folder
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "data.seq_len (32 -> 16)" in err
    no_dir = as_flags({k: v for k, v in base.items() if k != "train.out_dir"})
    assert main(["train", *no_dir, "--resume", "auto"]) == 2
    assert "--resume auto needs --out-dir" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_refused_in_one_line(base, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *as_flags({**base, "train.out_dir": run, "train.steps": 2})]) == 0
    (list_checkpoints(run)[-1] / "model.safetensors").write_bytes(b"\x00garbage")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be loaded" in err[0] and "damaged" in err[0]
