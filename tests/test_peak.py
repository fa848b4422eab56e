"""The peak prediction of `sltrain memory`: its activation term equals the bytes a real forward
saves for backward, its peak the live tensors of real training steps, and `--budget` lists and
ranks the setups that fit."""

import json

import pytest
import torch
from conftest import assert_one_line_error

from sltrain.cli import main
from sltrain.config import load_config
from sltrain.device import autocast_for, cast_weights_
from sltrain.measure.budget import fits, parse_size, rank_key
from sltrain.measure.loss import plain_head
from sltrain.measure.peak import StepModel, precision_of, predict_peak, saved_bytes
from sltrain.measure.tensor_bytes import LiveTensorBytes
from sltrain.model import build_model
from sltrain.train.checkpointing import apply_activation_checkpointing
from sltrain.train.losses import build_loss
from sltrain.train.trainer import Trainer

TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 512, "method.rank": 16, "data.seq_len": 32}


def saved_during_forward(cfg, batch: int = 8) -> int:
    """Bytes of the tensors one forward and loss of a real model keep for backward (each storage
    once; parameters and buffers left out), plus the logits the step holds on to."""
    model = cast_weights_(build_model(cfg), cfg, torch.device("cpu"))
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    loss_fn = build_loss(cfg)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 512, (batch, 32), generator=g) for _ in range(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast_for(cfg, torch.device("cpu")):
            if loss_fn.chunked:
                hidden = model(x, return_hidden=True)
                loss_fn.from_hidden(hidden, plain_head(model).weight, y)
            else:
                logits = model(x)
        if not loss_fn.chunked:
            loss_fn(logits, y)
            saved[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(saved.values())


def predicted_saved(cfg, batch: int = 8) -> int:
    model = build_model(cfg, device="meta")
    head, blocks = saved_bytes(model, cfg, precision_of(model, cfg.train.precision),
                               batch * cfg.data.seq_len)
    return head + sum(blocks)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize("method", ["full", "sltrain", "lowrank"])
def test_activation_term_equals_the_bytes_a_forward_saves(method, precision, checkpointing):
    cfg = load_config(None, {**TINY, "method.name": method, "train.precision": precision,
                             "train.activation_checkpointing": checkpointing})
    live = saved_during_forward(cfg)
    assert abs(predicted_saved(cfg) - live) <= 0.01 * live


@pytest.mark.parametrize("overrides", [
    {"method.name": "sparse"}, {"method.name": "relora"}, {"method.name": "lost"},
    {"method.name": "cola"}, {"method.name": "cola_m"}, {"loss.chunk_tokens": 0},
    {"model.norm": "pre_ln"}, {"model.norm": "post_ln"}, {"model.norm": "pre_crmsnorm"},
    {"model.embed_proj": True},
    {"train.activation_checkpointing": "every:2"}])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_activation_term_of_other_layers_norms_and_losses(overrides, precision):
    cfg = load_config(None, {**TINY, "train.precision": precision, **overrides})
    live = saved_during_forward(cfg)
    assert abs(predicted_saved(cfg) - live) <= 0.01 * live


def held_before(trainer) -> int:
    """Bytes of the tensors a step starts with: parameters, buffers, optimizer states."""
    tensors = [*trainer.raw_model.parameters(), *trainer.raw_model.buffers()]
    for sub in getattr(trainer.optimizer, "_by_param", {}).values() or [trainer.optimizer]:
        tensors += [v for s in sub.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors}.values())


@pytest.mark.parametrize("overrides", [
    {"method.name": "full", "train.precision": "fp32"},
    {"method.name": "sltrain", "train.precision": "bf16-mixed", "loss.chunk_tokens": 64},
    {"method.name": "sltrain", "train.precision": "bf16", "optimizer.per_layer_updates": True,
     "train.activation_checkpointing": "full"},
    {"method.name": "lowrank", "train.precision": "fp32", "train.grad_accum": 2,
     "loss.chunk_tokens": 0}])
def test_predicted_peak_matches_the_live_tensors_of_real_steps(tiny, overrides):
    cfg = load_config(None, {**tiny, **TINY, "train.device": "cpu", **overrides})
    trainer = Trainer(cfg)
    trainer.train_step()  # the optimizer states exist from here on
    before = held_before(trainer)
    with LiveTensorBytes() as m:
        trainer.train_step()
    live = before + m.peak
    predicted = predict_peak(cfg, cfg.train.precision).total
    assert abs(predicted - live) <= 0.02 * live, (predicted, live)


def test_memory_command_prints_and_reports_the_peak(capsys):
    args = ["memory", "--model", "llama-60m", "--batch-size", "4", "--seq-len", "256",
            "--activation-checkpointing", "full", "--precision", "bf16-mixed", "--grad-accum", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "predicted peak of an update step (micro-batch 4 x 256 tokens, grad-accum 2, " \
           "checkpointing full" in text
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    peak = report["peak"]
    assert peak["total"] == peak["states"] + peak["activations"] + peak["transient"]
    assert (peak["batch_size"], peak["seq_len"], peak["activation_checkpointing"]) == (4, 256, "full")
    cfg = load_config(None, {"model.preset": "llama-60m", "train.batch_size": 4, "data.seq_len": 256,
                             "train.activation_checkpointing": "full", "train.grad_accum": 2})
    assert peak["total"] == predict_peak(cfg, "bf16-mixed").total
    # With accumulation every gradient is held through the micro-batches: at least the state.
    assert peak["states"] >= report["bytes"]["total"]


def test_peak_grows_with_the_batch_and_shrinks_with_checkpointing():
    cfg = load_config(None, {"model.preset": "llama-60m", "data.seq_len": 256})
    model = StepModel(cfg)
    try:
        peaks = [model.predict("bf16", b).total for b in (1, 2, 4, 8)]
        assert peaks == sorted(peaks) and len(set(peaks)) == 4
        assert model.predict("bf16", 8, "full").total < peaks[-1]
    finally:
        model.close()


@pytest.mark.parametrize("text, value", [("24GiB", 24 * 2**30), ("24 GB", 24 * 10**9),
                                         ("500MiB", 500 * 2**20), ("1.5mb", 1_500_000)])
def test_budget_sizes_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["24", "24XB", "GiB", "-3GB", "0GB"])
def test_bad_budget_is_one_line_and_exit_2(capsys, bad):
    code = main(["memory", "--model", "llama-cpu", f"--budget={bad}"])
    assert_one_line_error(capsys, code, "--budget", "24GiB")


def test_budget_lists_ranks_and_each_fit_is_the_largest_batch(capsys):
    budget = parse_size("400MiB")
    cfg = load_config(None, {"model.preset": "llama-cpu", "data.seq_len": 256})
    found, skipped = fits(cfg, budget)
    assert found and found == sorted(found, key=rank_key) and not skipped
    assert {f.method for f in found} == {"full", "sltrain", "lowrank"}
    for f in found[:4]:
        assert f.peak.total <= budget
        variant = load_config(None, {"model.preset": "llama-cpu", "data.seq_len": 256,
                                     "method.name": f.method, "optimizer.name": f.optimizer,
                                     "optimizer.per_layer_updates": f.per_layer,
                                     "train.activation_checkpointing": f.checkpointing,
                                     "train.batch_size": 2 * f.micro_batch})
        assert predict_peak(variant, f.precision).total > budget
    assert main(["memory", "--model", "llama-cpu", "--seq-len", "256", "--budget", "400MiB",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budget_bytes"] == budget and len(report["fits"]) == len(found)
    assert main(["memory", "--model", "llama-cpu", "--seq-len", "256", "--budget", "400MiB"]) == 0
    text = capsys.readouterr().out
    assert "ranked by micro-batch (largest first)" in text and "predicted peak" in text
    assert main(["memory", "--model", "llama-cpu", "--budget", "1MB"]) == 0
    assert "none fits" in capsys.readouterr().out


def test_budget_skips_setups_that_cannot_be_built_here(monkeypatch, capsys):
    import sltrain.optim.adam8bit as adam8bit
    from sltrain.errors import UserError

    def missing():
        raise UserError("8-bit optimizer states need bitsandbytes; pip install bitsandbytes")

    monkeypatch.setattr(adam8bit, "bitsandbytes", missing)
    cfg = load_config(None, {"model.preset": "llama-cpu", "data.seq_len": 256})
    found, skipped = fits(cfg, parse_size("400MiB"))
    assert set(skipped) == {"full + adam8bit", "sltrain + adam8bit"}
    assert found and all(f.optimizer != "adam8bit" for f in found)
    assert main(["memory", "--model", "llama-cpu", "--seq-len", "256", "--budget", "400MiB"]) == 0
    assert "skipped sltrain + adam8bit: 8-bit optimizer states need bitsandbytes" in capsys.readouterr().out
