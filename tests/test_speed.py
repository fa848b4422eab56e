"""Speed work that must not change results: host syncs counted per step, device-side skips of
non-finite gradients, TF32/fused kernels guarded by device, FLOP/s and MFU in the records."""

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch

import sltrain
from sltrain.config import load_config
from sltrain.device import enable_tf32
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
