import json
import os
import signal

import pytest
import torch
from conftest import LiveGradients

from sltrain.cli import build_parser, main
from sltrain.config import load_config, resume_config
from sltrain.measure import measure_memory
from sltrain.measure.memory import estimate_for
from sltrain.model import build_model
from sltrain.optim import build_optimizer
from sltrain.optim.base import SltrainOptimizer, apply_update_
from sltrain.optim.rounding import ROUNDING, round_into_, update_state_
from sltrain.registry import OPTIMIZERS
from sltrain.train import train
from sltrain.train.trainer import Trainer

STEPS, STEP = 1000, 1e-4  # each step is 1/39 of bf16's half-ulp (2^-8) at 1.0
N = 4096  # elements per weight: the mean of N stochastic trajectories is tight


class SGD(SltrainOptimizer):
    """The smallest SltrainOptimizer: W <- W - lr G, written through the shared weight write."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=0.0))

    def update_(self, p, group):
        apply_update_(p, p.grad, -group["lr"], group)

    def state_bytes(self, p, group, element_size):
        return 0


def tiny_steps(optimizer, p, grad):
    for _ in range(STEPS):
        p.grad = grad.clone()
        optimizer.step()
    return p.detach().float()


def assert_moved_as_float32(w):
    """Every trajectory is a sum of unbiased roundings: mean 0.9 up to ~2e-4 (one sigma), and
    no single weight more than a few of its own sigmas (~0.013) away."""
    assert abs(w.mean().item() - (1.0 - STEPS * STEP)) < 1.5e-3, w.mean().item()
    assert (w - 0.9).abs().max().item() < 0.08


def test_round_into_is_unbiased_and_exact_on_representable_values():
    ROUNDING.seed(0)
    source = torch.full((N,), 1.0 + 2**-9)  # halfway between two bf16 values
    target = torch.empty(N, dtype=torch.bfloat16)
    round_into_(target, source)
    assert set(target.float().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(target.float().mean().item() - source[0].item()) < 3e-4
    exact = torch.randn(N).bfloat16().float()
    round_into_(target, exact)
    assert torch.equal(target.float(), exact)


def test_many_small_steps_move_a_bf16_weight_through_an_sltrain_optimizer():
    ROUNDING.seed(0)
    p = torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16))
    assert_moved_as_float32(tiny_steps(SGD([p], lr=STEP), p, torch.ones(N, dtype=torch.bfloat16)))
    # The same steps rounded to nearest (what bf16 arithmetic does) never leave 1.0.
    q = torch.ones(N, dtype=torch.bfloat16)
    for _ in range(100):
        q.add_(torch.ones_like(q), alpha=-STEP)
    assert torch.equal(q, torch.ones_like(q))


@pytest.mark.parametrize("name", ["adamw", "adam8bit"])
def test_many_small_adam_steps_move_a_bf16_weight(name):
    """A constant gradient makes Adam's step lr exactly; lr = 1e-4 is far below bf16's reach."""
    ROUNDING.seed(0)
    model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: bitsandbytes' 8-bit threshold
    torch.nn.init.ones_(model.weight)
    model.bfloat16()
    cfg = load_config(None, {"optimizer.name": name, "optimizer.lr": STEP,
                             "optimizer.weight_decay": 0.0}).optimizer
    opt = build_optimizer(model, cfg, rank=8)
    w = tiny_steps(opt, model.weight, torch.ones_like(model.weight))
    assert_moved_as_float32(w)
    # The moments are bf16 (AdamW) or 8-bit codes, as `sltrain memory --precision bf16` says.
    state = opt.state[model.weight]
    assert {v.dtype for k, v in state.items() if k in ("exp_avg", "exp_avg_sq", "state1",
                                                        "state2")} <= {torch.bfloat16, torch.uint8}
    if name == "adamw":  # torch's own bf16 AdamW rounds every step away
        ref = torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16))
        torch_opt = torch.optim.AdamW([ref], lr=STEP, weight_decay=0.0)
        for _ in range(50):
            ref.grad = torch.ones_like(ref)
            torch_opt.step()
        assert torch.equal(ref.detach(), torch.ones_like(ref))


def test_sliced_bf16_steps_equal_the_unsliced_float32_step():
    """bf16 updates run on float32 slices of CHUNK elements (bitsandbytes' 8-bit update too):
    on a weight of 2.5 slices, the states equal those of one float32 step on the same values
    (rounding does not enter them) and the weight is within two bf16 ulps of its weight."""
    from sltrain.optim.rounding import CHUNK

    torch.manual_seed(0)
    start, grad = torch.randn(5 * CHUNK // 2).bfloat16(), torch.randn(5 * CHUNK // 2).bfloat16()
    for name in ("adam8bit", "adamw"):
        results = []
        for dtype in (torch.bfloat16, torch.float32):
            model = torch.nn.Linear(start.numel() // 256, 256, bias=False)
            model.weight.data = start.view(256, -1).t().contiguous().to(dtype)
            cfg = load_config(None, {"optimizer.name": name, "optimizer.lr": 1e-2}).optimizer
            opt = build_optimizer(model, cfg, rank=8)
            for _ in range(2):
                model.weight.grad = grad.view(256, -1).t().contiguous().to(dtype)
                opt.step()
            results.append((model.weight.detach().float(), opt.state[model.weight]))
        (w16, s16), (w32, s32) = results
        for key, value in s32.items():
            if name == "adam8bit" and key in ("state1", "state2", "absmax1", "absmax2"):
                assert torch.equal(s16[key], value), key
        # Two roundings of at most one ulp (2^-7 relative) each; lr 1e-2 moved no weight further.
        assert ((w16 - w32).abs() <= (w32.abs() + 0.02) * 2**-6).all()
        assert (w16 != start.view(256, -1).t().float()).float().mean() > 0.9


def test_sliced_float32_8bit_step_is_bitsandbytes_own_bit_for_bit():
    """On CPU float32 weights take the sliced 8-bit step too (bitsandbytes would dequantise the
    whole tensor's moments at once); it must be bitsandbytes' unsliced step exactly."""
    import bitsandbytes as bnb

    from sltrain.optim.rounding import CHUNK

    torch.manual_seed(0)
    ours = torch.nn.Linear(5 * CHUNK // 512, 256, bias=False)
    ref = torch.nn.Linear(5 * CHUNK // 512, 256, bias=False)
    ref.load_state_dict(ours.state_dict())
    cfg = load_config(None, {"optimizer.name": "adam8bit", "optimizer.lr": 1e-2,
                             "optimizer.weight_decay": 0.1}).optimizer
    opt = build_optimizer(ours, cfg, rank=8)
    ref_opt = bnb.optim.AdamW8bit(ref.parameters(), lr=1e-2, weight_decay=0.1, min_8bit_size=4096)
    for _ in range(3):
        grad = torch.randn_like(ours.weight)
        ours.weight.grad, ref.weight.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(ours.weight, ref.weight)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(opt.state[ours.weight][key], ref_opt.state[ref.weight][key]), key


def _sum_of_steps(name, dtype, grads, steps=40):
    """Each parameter's displacement after `steps` updates with a fixed gradient from weights
    in [1, 1.5), where bf16's half-ulp is 2^-8: every single step is below it."""
    cfg = load_config(None, {"model.preset": "llama-9m", "model.dim": 64, "model.n_layers": 1,
                             "model.n_heads": 4, "model.ffn_dim": 128, "model.vocab_size": 64,
                             "method.name": "sltrain", "method.rank": 16, "optimizer.name": name,
                             "optimizer.lr": 1e-3, "optimizer.weight_decay": 0.0,
                             "optimizer.proj_rank": 8, "data.seq_len": 16})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.5 * torch.rand_like(p))
    model.to(dtype)
    ROUNDING.seed(0)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    start = [p.detach().float().clone() for p in model.parameters()]
    for _ in range(steps):
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.to(dtype)
        opt.step()
    return [(p.detach().float() - s) for p, s in zip(model.parameters(), start, strict=True)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_moves_bf16_weights_as_float32_in_expectation(name):
    torch.manual_seed(1)
    shapes = [p.shape for p in _model_shapes()]
    grads = [torch.randn(s).bfloat16().float() for s in shapes]
    fp32 = _sum_of_steps(name, torch.float32, grads)
    bf16 = _sum_of_steps(name, torch.bfloat16, grads)
    for d32, d16 in zip(fp32, bf16, strict=True):
        if d32.numel() < 1024 or d32.norm() == 0:
            continue  # a handful of elements: too few for a tight statistic
        ratio = (d16 * d32).sum() / (d32 * d32).sum()
        assert 0.85 < ratio.item() < 1.15, (name, tuple(d32.shape), ratio.item())


def test_a_bf16_moving_average_decays_as_float32_does():
    """In bf16 itself v * 0.999 rounds back to v: the average never decays. Updated in float32
    and rounded stochastically it follows 0.999^t in expectation."""
    ROUNDING.seed(0)
    plain, rounded = torch.ones(4096, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16)
    zero = torch.zeros_like(plain)
    for _ in range(1000):
        plain.mul_(0.999).add_(zero, alpha=0.001)
        update_state_(rounded, zero, lambda v, x: v.mul_(0.999).add_(x, alpha=0.001))
    assert torch.all(plain == 1.0)
    assert rounded.float().mean().item() == pytest.approx(0.999**1000, rel=0.02)


def _states_after(name, dtype, steps=150):
    """Each optimizer state tensor after `steps` updates whose gradient shrinks by 4% a step."""
    cfg = load_config(None, {"model.preset": "llama-9m", "model.dim": 64, "model.n_layers": 1,
                             "model.n_heads": 4, "model.ffn_dim": 128, "model.vocab_size": 64,
                             "method.name": "full", "optimizer.name": name, "optimizer.lr": 1e-4,
                             "optimizer.weight_decay": 0.0, "optimizer.proj_rank": 8})
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)
    grads = [torch.randn(p.shape) for p in model.parameters()]
    ROUNDING.seed(0)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    for t in range(steps):
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = (g * 0.96**t).to(dtype)
        opt.step()
    return [{k: v.float() for k, v in opt.state[p].items()
             if torch.is_tensor(v) and v.is_floating_point() and v.numel() >= 64}
            for p in model.parameters()]


@pytest.mark.parametrize("name", ["conda", "adam_mini", "normuon"])
def test_bf16_optimizer_states_track_float32_ones(name):
    """The second moments these optimizers keep themselves: with gradients shrinking over the
    run, a bf16 one that cannot decay ends 1.12x too large (measured before the fix). Muon's and
    AuON's momentum buffers (beta 0.95) go through the same rounding."""
    for s32, s16 in zip(_states_after(name, torch.float32), _states_after(name, torch.bfloat16),
                        strict=True):
        for key, ref in s32.items():
            if ref.norm() > 0:
                assert s16[key].norm() / ref.norm() == pytest.approx(1.0, abs=0.05), (name, key)


def _model_shapes():
    cfg = load_config(None, {"model.preset": "llama-9m", "model.dim": 64, "model.n_layers": 1,
                             "model.n_heads": 4, "model.ffn_dim": 128, "model.vocab_size": 64,
                             "method.name": "sltrain", "method.rank": 16})
    return list(build_model(cfg, device="meta").parameters())


MEMORY_SETUPS = {
    "full-adamw": {"method.name": "full"},
    "sltrain-adamw": {},
    "sltrain-adam8bit": {"optimizer.name": "adam8bit"},
    "sltrain-galore8bit-per-layer": {"optimizer.name": "galore8bit", "optimizer.proj_rank": 8,
                                     "optimizer.per_layer_updates": True, "optimizer.grad_clip": 0.0},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize("setup", list(MEMORY_SETUPS))
def test_memory_report_equals_the_live_tensors_of_a_trained_run(tiny, precision, setup):
    if setup.endswith("per-layer") and precision != "bf16":
        pytest.skip("per-layer accounting in float32 is held by test_memory.py")
    cfg = load_config(None, {**tiny, "model.vocab_size": 256, "data.seq_len": 16,
                             "train.batch_size": 2, "train.eval_every": 0, "train.precision": precision,
                             **MEMORY_SETUPS[setup]})
    trainer = Trainer(cfg)
    watch = None if cfg.optimizer.per_layer_updates else LiveGradients(trainer.raw_model)
    for _ in range(2):
        assert trainer.train_step() is not None
    report = estimate_for(cfg, precision)  # what `sltrain memory --precision` prints
    live = measure_memory(trainer.raw_model, trainer.optimizer)
    assert live == report
    if watch is not None:
        assert watch.peak_bytes == report.gradients  # the gradients a real backward left
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {p.dtype for p in trainer.raw_model.parameters()} == {dtype}
    supports = [b for name, b in trainer.raw_model.named_buffers() if name.endswith("support")]
    assert all(b.dtype == torch.int32 for b in supports) and (setup == "full-adamw") != bool(supports)
    per_bytes = report.weights / sum(p.numel() for p in trainer.raw_model.parameters())
    assert per_bytes == (2 if precision == "bf16" else 4)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bf16_training_lowers_the_loss_like_fp32_and_resumes_exactly(tiny, tmp_path):
    base = {**tiny, "method.name": "sltrain", "train.steps": 12, "train.eval_every": 0}
    fp32 = train(load_config(None, {**base, "train.precision": "fp32",
                                    "train.out_dir": str(tmp_path / "fp32")}))
    bf16 = train(load_config(None, {**base, "train.precision": "bf16",
                                    "train.out_dir": str(tmp_path / "a")}))
    assert bf16["estimated_state_bytes"] == bf16["training_state_bytes"]
    assert fp32["estimated_state_bytes"] == fp32["training_state_bytes"]
    assert 2 * bf16["training_state_bytes"]["weights"] == fp32["training_state_bytes"]["weights"]
    a, f = _losses(tmp_path / "a"), _losses(tmp_path / "fp32")
    assert a[-1] < a[0] - 0.3 and abs(a[-1] - f[-1]) < 0.1, (a, f)
    assert abs(bf16["val_loss"] - fp32["val_loss"]) < 0.1

    def interrupt(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    b = tmp_path / "b"
    train(load_config(None, {**base, "train.precision": "bf16", "train.out_dir": str(b)}),
          on_step=interrupt)
    state = torch.load(b / "checkpoints" / "step_0000005" / "training_state.pt", weights_only=True)
    assert state["rounding"]["generators"]  # the stochastic rounding stream was saved
    resumed = train(resume_config(b, {}), run_dir=b, resume=b)
    assert resumed["step"] == 12 and _losses(b) == a  # exact, step by step
    assert resumed["val_loss"] == bf16["val_loss"]


def test_configs_and_runs_with_the_old_dtype_key_still_load(tmp_path, capsys):
    path = tmp_path / "old.toml"
    for old, new in [("float32", "fp32"), ("bfloat16", "bf16-mixed"), ("auto", "auto")]:
        path.write_text(f'[train]\ndtype = "{old}"\n')
        assert load_config(path).train.precision == new
    run = tmp_path / "run"
    run.mkdir()
    saved = load_config(None).to_dict()
    saved["train"].pop("precision")
    saved["train"]["dtype"] = "bfloat16"
    (run / "config.json").write_text(json.dumps(saved))
    assert resume_config(run, {}).train.precision == "bf16-mixed"
    assert resume_config(run, {"train.precision": "bf16"}).train.precision == "bf16"
    args = build_parser().parse_args(["train", "--dtype", "float32"])
    assert load_config(None, {"train.precision": getattr(args, "train.precision")}).train.precision == "fp32"
    reports = {}
    for flags in (["--dtype", "float32"], ["--precision", "fp32"], ["--precision", "bf16"], []):
        assert main(["memory", "--model", "llama-9m", "--json", *flags]) == 0
        reports[" ".join(flags)] = json.loads(capsys.readouterr().out)
    assert reports["--dtype float32"] == reports["--precision fp32"]
    assert reports[""] == reports["--precision bf16"]  # the papers' setting by default
    fp32, bf16 = reports["--precision fp32"]["bytes"], reports["--precision bf16"]["bytes"]
    assert fp32["weights"] == 2 * bf16["weights"] and fp32["sparse_indices"] == bf16["sparse_indices"]
