"""Metrics sinks: JSON lines always; TensorBoard and W&B (offline) when asked."""

import json

import pytest

from sltrain.config import load_config
from sltrain.train import train


def test_tensorboard_and_offline_wandb_get_every_step(tiny, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, {**tiny, "train.steps": 6, "train.eval_every": 3,
                             "train.log_to": "tensorboard,wandb"})
    train(cfg)
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 7))
    assert [e.step for e in events.Scalars("val_loss")] == [3, 6]
    jsonl = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in jsonl])
    run_id = (run / "wandb_id").read_text()
    (offline,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0


def test_unknown_sink_is_refused(tiny):
    from sltrain.errors import UserError

    with pytest.raises(UserError, match="train.log_to"):
        load_config(None, {**tiny, "train.log_to": "mlflow"})
