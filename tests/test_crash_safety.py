"""Crash safety: SIGKILL mid-checkpoint, SIGTERM, non-finite losses, --resume auto, wrong run dirs."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

import sltrain.train.losses as losses_module
from sltrain.cli import main
from sltrain.config import load_config
from sltrain.errors import UserError
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
    flags = as_flags({**base, "train.steps": 400, "train.save_every": 0, "train.out_dir": run})
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
    assert 3 <= stopped_at < 400 and len(losses(run)) == stopped_at
    # The same command with --resume auto continues the run to its end.
    assert main(["train", *flags, "--resume", "auto"]) == 0
    assert [s for s, _ in losses(run)] == list(range(1, 401))


def test_nonfinite_losses_skip_their_step_and_stop_after_k_in_a_row(base, tmp_path, monkeypatch):
    real, calls = losses_module.cross_entropy, [0]

    def poisoned(bad):
        def lm_loss(logits, targets, reduction="mean"):
            calls[0] += 1
            loss = real(logits, targets, reduction)
            return loss * float("nan") if bad(calls[0]) else loss
        return lm_loss

    monkeypatch.setitem(losses_module.LOSSES, "cross_entropy", poisoned(lambda n: n in (3, 4)))
    summary = train(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))
    assert summary["status"] == "finished" and summary["step"] == 8
    assert summary["skipped_nonfinite"] == 2 and summary["val_loss"] < 10
    assert [s for s, _ in losses(tmp_path / "a")] == list(range(1, 9))

    calls[0] = 0
    monkeypatch.setitem(losses_module.LOSSES, "cross_entropy", poisoned(lambda n: n > 5))
    run = tmp_path / "b"
    with pytest.raises(UserError, match="3 update steps in a row at step 6.*lower --lr"):
        train(load_config(None, {**base, "train.out_dir": str(run), "train.max_nonfinite_steps": 3}))
    last = list_checkpoints(run)[-1]
    assert last.name == "step_0000005"
    # The saved weights are the last good ones: all finite.
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())


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
