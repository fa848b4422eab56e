"""torchrun data-parallel training on CPU (gloo): DDP and FSDP2 against one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.run.resume import plan
from sltrain.train import train
from sltrain.train.distributed import World, check

# Two processes reduce gradients in another order than one: losses agree to rounding.
RTOL = 1e-5


def metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in metrics(run_dir)]


def as_flags(overrides):
    return [a for k, v in overrides.items() for a in (f"--{k}", str(v))]


def torchrun(overrides, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "sltrain", "train", "--device", "cpu",
           *as_flags(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def base(tiny):
    return {**tiny, "train.steps": 8, "train.eval_every": 4, "train.grad_accum": 2}


# One launch per strategy covers what must agree across processes: the gradient reduction, the
# loss reweighting (weights from the global batch gathered across ranks, not a per-rank softmax),
# activation checkpointing and the chunked loss, evaluation, and FSDP's full-tensor checkpoint.
WHOLE = {"train.activation_checkpointing": "full", "loss.chunk_tokens": 48,
         "loss.reweight": "linupper", "loss.reweight_temperature": 0.3,
         "loss.reweight_warmup_steps": 1}


def test_ddp_and_fsdp_match_one_process_and_fsdp_resumes_in_one(base, tmp_path):
    base = {**base, **WHOLE}
    one = train(load_config(None, {**base, "train.out_dir": str(tmp_path / "one")}))
    expected = metrics(tmp_path / "one")
    assert expected[-1]["reweight_max_w"] > 1.0  # the reweighting is not uniform
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        torchrun({**base, "train.out_dir": out, "train.parallel": parallel, "train.save_every": 4})
        for a, b in zip(expected, metrics(out), strict=True):
            for key in ("loss", "ce", "reweight_max_w", "reweight_entropy"):
                assert b[key] == pytest.approx(a[key], rel=RTOL), (parallel, key, a["step"])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["parallel"] == parallel
        assert summary["val_loss"] == pytest.approx(one["val_loss"], rel=RTOL)
        assert summary["tokens_seen"] == one["tokens_seen"]
    # FSDP's checkpoint holds full (gathered) tensors, so one process can continue it.
    run = tmp_path / "fsdp"
    shutil.rmtree(run / "checkpoints" / "step_0000008")
    steps = []
    train(*plan(None, {}, str(run)), on_step=lambda step, record: steps.append(step))
    assert steps == [5, 6, 7, 8]  # continued from step 4, not started again
    assert losses(run) == pytest.approx(losses(tmp_path / "one"), rel=RTOL)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"train.batch_size": 7}, "multiple of 2"),
        ({"optimizer.per_layer_updates": True, "optimizer.grad_clip": 0.0}, "per-layer-updates"),
        ({"train.parallel": "fsdp", "optimizer.name": "galore"}, "--parallel ddp"),
        ({"train.parallel": "fsdp", "optimizer.name": "muon"}, "--parallel ddp"),
        ({"train.parallel": "fsdp", "method.name": "relora", "optimizer.reset_every": 5},
         "--parallel ddp"),
        ({"method.name": "relora", "method.warm_start_steps": 2, "optimizer.reset_every": 5},
         "--warm-start-steps 0"),
    ],
)
def test_what_cannot_run_data_parallel_is_refused(tiny, overrides, needle):
    cfg = load_config(None, {**tiny, **overrides})
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        check(cfg, World(0, 2, 0, cfg.train.parallel))
    check(cfg, World())  # one process: nothing to refuse


@pytest.mark.parametrize("setup", [
    {"method.name": "relora", "optimizer.reset_every": 3},  # merges and redraws on every rank
    {"method.name": "full", "optimizer.name": "galore", "optimizer.proj_rank": 8,
     "optimizer.update_proj_gap": 3},  # SVD projectors of the reduced gradients
])
def test_ddp_matches_one_process_for_stateful_methods(base, tmp_path, setup):
    train(load_config(None, {**base, **setup, "train.out_dir": str(tmp_path / "one")}))
    torchrun({**base, **setup, "train.out_dir": tmp_path / "ddp"})
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=RTOL)
