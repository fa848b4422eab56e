"""Speed work that must not change results: host syncs counted per step, device-side skips of
non-finite gradients, TF32/fused kernels guarded by device, FLOP/s and MFU in the records."""

import contextlib
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import sltrain
from sltrain.cli import main
from sltrain.config import load_config
from sltrain.device import enable_tf32
from sltrain.measure.flops import model_flops, peak_for
from sltrain.model import build_model
from sltrain.optim.adamw import AdamW, kernel
from sltrain.optim.per_layer import PerLayerOptimizer
from sltrain.train.trainer import Trainer

SRC = str(Path(sltrain.__file__).parent)
DATA = str(Path(sltrain.__file__).parent / "data")


@contextlib.contextmanager
def counting_host_syncs():
    """Counts the calls that read a tensor's value on the host (`item`, `tolist`, `bool`,
    `float`, `int`) made from sltrain's own code: each is a device sync on a GPU. The data
    pipeline, which works on host tensors by design, and torch's internals are not counted."""
    calls: list[str] = []
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    real = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(name):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(SRC) and not caller.startswith(DATA):
                calls.append(f"{name} {caller}:{sys._getframe(1).f_lineno}")
            return real[name](self, *args, **kwargs)
        return counted

    for n in names:
        setattr(torch.Tensor, n, wrap(n))
    try:
        yield calls
    finally:
        for n, f in real.items():
            setattr(torch.Tensor, n, f)


def trainer(overrides, out):
    return Trainer(load_config(None, {**overrides, "train.out_dir": str(out)}))


@pytest.mark.parametrize("method", ["full", "sltrain"])
def test_a_step_of_four_micro_batches_syncs_once(tiny, tmp_path, method):
    t = trainer({**tiny, "method.name": method, "train.grad_accum": 4, "train.eval_every": 0,
                 "optimizer.grad_clip": 1.0}, tmp_path / "r")
    assert t.train_step() is not None  # lazy state and first-call work out of the way
    with counting_host_syncs() as calls:
        record = t.train_step()
    assert record is not None and record["grad_norm"] > 0
    # The loss sum and the gradient norm, read together: not one read per micro-batch.
    assert len(calls) <= 1, calls


def test_per_layer_updates_sync_per_micro_batch_not_per_parameter(tiny, tmp_path):
    t = trainer({**tiny, "method.name": "sltrain", "train.grad_accum": 4, "train.eval_every": 0,
                 "optimizer.per_layer_updates": True, "optimizer.per_layer_clip": "none"},
                tmp_path / "r")
    assert t.train_step() is not None
    n_params = sum(1 for p in t.raw_model.parameters() if p.requires_grad)
    with counting_host_syncs() as calls:
        assert t.train_step() is not None
    # Each loss before its backward (per-layer's rule), the step's read and the optimizer's
    # one read of the norms and finiteness of every gradient: none per parameter.
    assert len(calls) <= 4 + 2 < n_params, calls


@pytest.mark.parametrize("mode", ["previous_norm", "update_rms", "none"])
def test_fused_adamw_skips_a_nonfinite_gradient_on_the_device(mode):
    """The CUDA path (fused AdamW), run on CPU: in the hooks a NaN gradient is skipped by the
    kernel's found_inf, without a host sync, leaving that parameter and its state exactly."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 3, bias=False),
                                 "b": torch.nn.Linear(4, 3, bias=False)})
    wrapper = PerLayerOptimizer(AdamW(model.parameters(), lr=0.1, fused=True), grad_accum=1,
                                clip=0.5 if mode != "none" else 0.0, clip_mode=mode)
    x = torch.randn(2, 4)

    def step(poison):
        out = model["a"](x).sum() + model["b"](x).sum() * (float("nan") if poison else 1.0)
        wrapper.micro_batch(True)
        with counting_host_syncs() as calls:
            out.backward()
        wrapper.step()
        return calls

    assert step(False) == []
    a_sub, b_sub = (wrapper.optimizers_for(model[k].weight)[0] for k in "ab")
    before = {k: model[k].weight.detach().clone() for k in "ab"}
    b_state = {k: v.clone() for k, v in b_sub.state[model["b"].weight].items()}
    assert step(True) == []  # nothing read on the host during backward
    assert not torch.equal(model["a"].weight, before["a"])  # the finite gradient stepped
    assert torch.equal(model["b"].weight, before["b"])
    for k, v in b_sub.state[model["b"].weight].items():
        assert torch.equal(v, b_state[k]), k
    assert wrapper.skipped_nonfinite == 1 and not hasattr(b_sub, "found_inf")
    assert float(a_sub.state[model["a"].weight]["step"]) == 2.0


def test_tf32_and_the_fused_kernel_stay_off_the_cpu(tiny, tmp_path):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    t = trainer({**tiny, "train.precision": "fp32", "train.device": "cpu"}, tmp_path / "r")
    assert not t.tf32 and before == (torch.backends.cuda.matmul.allow_tf32,
                                     torch.backends.cudnn.allow_tf32)
    assert not enable_tf32(torch.device("cpu"), "bf16-mixed")
    group = t.optimizer.param_groups[0]
    assert group["foreach"] and not group["fused"]  # CPU keeps the foreach kernel
    assert kernel([torch.empty(1, device="meta")]) == {"foreach": True}


@pytest.mark.parametrize("saved,resumed", [({"fused": True}, {"foreach": True}),
                                           ({"foreach": True}, {"fused": True})])
def test_adamw_resumes_across_kernels(saved, resumed):
    """A GPU run's optimizer (fused) resumes on CPU (foreach) and the other way round: each
    keeps its own kernel and steps on from the saved moments (fused runs on CPU too)."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 3)

    def step(m, opt):
        m(torch.ones(2, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()

    a = model()
    opt_a = AdamW(a.parameters(), lr=0.1, **saved)
    for _ in range(2):
        step(a, opt_a)
    b = model()
    b.load_state_dict(a.state_dict())
    opt_b = AdamW(b.parameters(), lr=0.1, **resumed)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    group = opt_b.param_groups[0]
    assert bool(group.get("fused")) == ("fused" in resumed)
    assert bool(group.get("foreach")) == ("foreach" in resumed)
    step(a, opt_a)
    step(b, opt_b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        assert float(opt_b.state[q]["step"]) == 3.0


def test_records_and_summary_report_model_flops_per_second(tiny, tmp_path, capsys):
    run = tmp_path / "r"
    flags = {**tiny, "method.name": "sltrain", "train.steps": 2, "train.eval_every": 0,
             "train.out_dir": str(run)}
    assert main(["train", *[a for k, v in flags.items() for a in (f"--{k}", str(v))]]) == 0
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(None, flags)
    per_token = model_flops(build_model(cfg, device="meta"), 32, 8)["train"]
    # The factored layers count as they compute: SLTrain's composition of W is in it.
    assert summary["flops_per_token"] == per_token > model_flops(
        build_model(load_config(None, {**flags, "method.name": "full"}), device="meta"), 32, 8)["train"]
    assert summary["flops_per_s"] == pytest.approx(per_token * summary["tok_per_s"])
    assert summary["mfu"] is None and summary["mfu_note"] == "no MFU on cpu: FLOP/s only"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["flops_per_s"] == pytest.approx(per_token * r["tok_per_s"]) and "mfu" not in r
               for r in records)
    out = capsys.readouterr().out
    assert "FLOP/s" in out and "no MFU on cpu" in out, out


@pytest.mark.parametrize("name,precision,tf32,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", True, 989e12),
    ("NVIDIA H100 PCIe", "bf16", True, 756e12),
    ("NVIDIA H200", "fp32", True, 495e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156e12),
    ("NVIDIA A10", "bf16-mixed", True, 125e12),
    ("NVIDIA L40S", "bf16-mixed", True, 362e12),
    ("NVIDIA L4", "bf16-mixed", True, 121e12),
    ("NVIDIA GeForce RTX 4090", "bf16-mixed", True, 165e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, None),
    ("Tesla T4", "bf16-mixed", True, None),
])
def test_the_peak_table_matches_device_names(name, precision, tf32, peak):
    got, note = peak_for(name, precision, tf32)
    assert got == peak
    assert name in note and (peak is not None or note.startswith("no MFU"))
