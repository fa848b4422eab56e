"""APOLLO, APOLLO-Mini and Adam-mini against their reference packages (apollo-torch, adam-mini), with
every parameterisation, with per-layer updates, in `sltrain memory` and in a short training run."""

import copy
import json
import os
import signal

import adam_mini
import apollo_torch
import pytest
import torch
from conftest import LiveGradients

from sltrain.cli import main
from sltrain.config import load_config, resume_config
from sltrain.measure import estimate_memory, measure_memory
from sltrain.measure.loss import lm_loss
from sltrain.model import build_model
from sltrain.optim import build_optimizer, param_groups
from sltrain.optim.adam_mini import AdamMini
from sltrain.optim.apollo import Apollo, next_seed, seeded_groups
from sltrain.registry import METHODS
from sltrain.train import train

STEPS, GAP, LR = 20, 7, 3e-3  # the projections are redrawn at steps 0, 7 and 14
NEW = ("apollo", "apollo_mini", "adam_mini")
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 96,
        "model.vocab_size": 128, "method.rank": 16}


def tiny_model(method="full", **opt):
    cfg = load_config(None, {**TINY, "method.name": method, "optimizer.lr": LR,
                             **{f"optimizer.{k}": v for k, v in opt.items()}})
    torch.manual_seed(0)
    return build_model(cfg, torch.device("cpu")), cfg


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 17), generator=g) for _ in range(n)]


def run(model, opt, data, accum=1):
    for i in range(0, len(data), accum):
        for x in data[i:i + accum]:
            (lm_loss(model(x[:, :-1]), x[:, 1:]) / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def train_both(ours_opt, ref_opt, ours, ref, steps=STEPS):
    for x in batches(steps):
        for model, opt in ((ours, ours_opt), (ref, ref_opt)):
            run(model, opt, [x])


def max_rel_diff(a, b):
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(((p - q).norm() / q.norm()).item() for p, q in pairs)


# ---- APOLLO against apollo-torch ---------------------------------------------------------------

def reference_apollo(model, rank, scale_type, scale, weight_decay=0.0, eps=1e-8, scale_front=False):
    """apollo-torch over the same split: the block matrices first, so that its seeds (1-based
    positions across the groups) are the ones our builder gives them."""
    groups = param_groups(model, load_config().optimizer)
    matrices = [p for g in groups if g["kind"] == "matrix" for p in g["params"]]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return apollo_torch.APOLLOAdamW(
        [{"params": matrices, "rank": rank, "proj": "random", "scale_type": scale_type,
          "scale": scale, "update_proj_gap": GAP, "proj_type": "std"}, {"params": rest}],
        lr=LR, eps=eps, weight_decay=weight_decay, scale_front=scale_front)


@pytest.mark.parametrize("name,rank,scale_type,scale,front", [
    ("apollo", 8, "channel", 1.0, False), ("apollo", 8, "channel", 2.0, True),
    ("apollo_mini", 1, "tensor", 128.0, False)])
def test_apollo_matches_apollo_torch(name, rank, scale_type, scale, front):
    ours, cfg = tiny_model(name=name, proj_rank=rank, update_proj_gap=GAP,
                           apollo_scale=scale, apollo_scale_front=front)
    ref, start = copy.deepcopy(ours), copy.deepcopy(ours)
    opt = build_optimizer(ours, cfg.optimizer, cfg.rank)
    assert {g["scale_type"] for g in opt.param_groups if g["kind"] == "matrix"} == {scale_type}
    train_both(opt, reference_apollo(ref, rank, scale_type, scale, scale_front=front), ours, ref)
    assert max_rel_diff(ours, start) > 1e-2  # the runs did move
    assert max_rel_diff(ours, ref) < 1e-6  # in practice bit for bit
    q = ours.layers[0].mlp.gate_proj.weight  # 96 x 64: projected on the right, rank x 96 moments
    assert opt.state[q]["exp_avg"].shape == (96, rank) and "scaled_grad" in opt.state[q]


def test_apollo_weight_decay_differs_from_reference_as_documented():
    """Decoupled decay acts on the weight before the update: p' = p (1 - c) - u with c = lr wd;
    apollo-torch decays the updated weight, p' = (p - u)(1 - c), so ours - ref = -c u."""
    wd = 0.1
    ours = tiny_model()[0].double()  # float64, so that rounding stays far below c u
    ref, start = copy.deepcopy(ours), copy.deepcopy(ours)
    opt = Apollo(seeded_groups(param_groups(ours, load_config().optimizer)), lr=LR, eps=1e-8,
                 rank=8, update_proj_gap=GAP, weight_decay=wd)
    for group in opt.param_groups:  # every group decayed, as in the reference
        group["weight_decay"] = wd
    train_both(opt, reference_apollo(ref, 8, "channel", 1.0, weight_decay=wd), ours, ref, steps=1)
    c = LR * wd
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), start.parameters(), strict=True):
        expected = -c * (p0 * (1 - c) - p)
        assert expected.abs().max() > 1e-7
        torch.testing.assert_close(p - q, expected, atol=1e-12, rtol=1e-6)


def test_apollo_gives_plain_adam_to_a_matrix_not_larger_than_its_rank():
    """Deliberate difference: a 6 x 4 matrix at rank 8 gets Adam (the reference projects it up
    to 8 dimensions and scales; as Adam it equals the reference's own unprojected group)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    ref_w, up_w = (torch.nn.Parameter(w.detach().clone()) for _ in range(2))
    ours = Apollo([{"params": [w], "kind": "matrix"}], lr=LR, eps=1e-8, rank=8)
    adam = apollo_torch.APOLLOAdamW([ref_w], lr=LR, eps=1e-8)
    projected = apollo_torch.APOLLOAdamW([{"params": [up_w], "rank": 8, "proj": "random",
                                            "scale_type": "channel", "scale": 1.0,
                                            "update_proj_gap": GAP, "proj_type": "std"}],
                                          lr=LR, eps=1e-8)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        grad = torch.randn(6, 4, generator=g)
        for p, opt in ((w, ours), (ref_w, adam), (up_w, projected)):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(w, ref_w)
    assert ours.state[w]["exp_avg"].shape == (6, 4)
    assert not torch.allclose(w, up_w)


def test_apollo_seeds_are_per_parameter_and_follow_the_reference_refresh():
    model, cfg = tiny_model("sltrain", name="apollo", proj_rank=8, update_proj_gap=3)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    run(model, opt, batches(4))  # refreshes at updates 0 and 3
    matrices = [g["params"][0] for g in opt.param_groups if g["kind"] == "matrix"]
    assert all(len(g["params"]) == 1 for g in opt.param_groups if g["kind"] == "matrix")
    seeds = [opt.state[p]["seed"] for p in matrices]
    assert seeds == [next_seed(i + 1) for i in range(len(matrices))]  # 1, 2, ... then advanced
    assert len(set(seeds)) == len(seeds)


# ---- Adam-mini against adam-mini -----------------------------------------------------------------

@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_mini_matches_the_adam_mini_package(wd):
    ours, cfg = tiny_model(name="adam_mini", weight_decay=wd)
    ref, start = copy.deepcopy(ours), copy.deepcopy(ours)
    opt = build_optimizer(ours, cfg.optimizer, cfg.rank)
    ref_opt = adam_mini.Adam_mini(ref.named_parameters(), lr=LR, weight_decay=wd, dim=64,
                                  n_heads=4, verbose=False)
    train_both(opt, ref_opt, ours, ref)
    assert max_rel_diff(ours, start) > 1e-2
    assert max_rel_diff(ours, ref) < 1e-6  # in practice bit for bit
    attn = ours.layers[0].self_attn
    assert opt.state[attn.q_proj.weight]["vmean"].shape == (4, 1)  # one per head
    assert opt.state[attn.v_proj.weight]["vmean"].shape == (64, 1)  # one per output neuron
    assert opt.state[ours.embed_tokens.weight]["vmean"].shape == (128, 1)  # one per token
    assert opt.state[ours.norm.weight]["vmean"].shape == ()  # one for the whole tensor


def test_adam_mini_partitions_factored_layers_where_the_reference_cannot():
    """The reference's name rule views every q/k tensor as dim x dim/n_heads blocks, which the
    factors of a 64 x 64 q_proj at rank 8 (512 entries) and its sparse values cannot form; ours
    gives B one block per head, A one per rank component and the values one in all."""
    cfg = load_config(None, {**TINY, "method.name": "sltrain", "method.rank": 8,
                             "optimizer.name": "adam_mini", "optimizer.lr": LR})
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    ref_model = copy.deepcopy(model)
    ref = adam_mini.Adam_mini(ref_model.named_parameters(), lr=LR, dim=64, n_heads=4, verbose=False)
    x = batches(1)[0]
    lm_loss(ref_model(x[:, :-1]), x[:, 1:]).backward()
    with pytest.raises(RuntimeError, match="invalid"):
        ref.step()
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    run(model, opt, [x])
    q = model.layers[0].self_attn.q_proj
    assert opt.state[q.B]["vmean"].shape == (4, 1)
    assert opt.state[q.A]["vmean"].shape == (8, 1)
    assert opt.state[q.values]["vmean"].shape == ()
    assert opt.state[model.layers[0].mlp.up_proj.B]["vmean"].shape == (96, 1)


def test_adam_mini_refuses_blocks_that_do_not_tile():
    w = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="do not tile"):
        AdamMini([{"params": [w], "block_rows": 4}])


# ---- every parameterisation, per-layer updates, memory ------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", NEW)
def test_every_method_trains_with_exact_state_bytes(name, method):
    model, cfg = tiny_model(method, name=name, proj_rank=4, update_proj_gap=10)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    x = batches(1)[0]
    before = lm_loss(model(x[:, :-1]), x[:, 1:]).item()
    run(model, opt, [x] * 20)
    assert lm_loss(model(x[:, :-1]), x[:, 1:]).item() < before - 0.3
    estimate = estimate_memory(build_model(cfg, torch.device("meta")), torch.float32,
                               cfg.optimizer, cfg.rank)
    assert estimate == measure_memory(model, opt)


@pytest.mark.parametrize("method", ["full", "sltrain"])
@pytest.mark.parametrize("name", NEW)
def test_per_layer_updates_equal_the_plain_optimizer(name, method):
    """One copy per parameter (seeded, partitioned as the plain optimizer), under accumulation;
    and its state bytes from shapes equal the live state."""
    plain, cfg = tiny_model(method, name=name, proj_rank=4, update_proj_gap=2, grad_clip=0.0)
    hooked, start = copy.deepcopy(plain), copy.deepcopy(plain)
    data = batches(8)  # 4 optimizer steps of 2 micro-batches: projections redrawn at 0 and 2
    run(plain, build_optimizer(plain, cfg.optimizer, cfg.rank), data, accum=2)
    per_layer_cfg = cfg.optimizer.model_copy(update={"per_layer_updates": True})
    opt = build_optimizer(hooked, per_layer_cfg, cfg.rank, grad_accum=2)
    run(hooked, opt, data, accum=2)
    assert max_rel_diff(plain, start) > 1e-2
    for p, q in zip(plain.parameters(), hooked.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    meta = build_model(cfg, torch.device("meta"))
    assert estimate_memory(meta, torch.float32, per_layer_cfg, cfg.rank, grad_accum=2) == \
        measure_memory(hooked, opt)


@pytest.mark.parametrize("name", NEW)
def test_per_layer_state_bytes_without_accumulation(name):
    model, cfg = tiny_model("sltrain", name=name, proj_rank=4, per_layer_updates=True,
                            grad_clip=0.0)
    watch = LiveGradients(model)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    run(model, opt, batches(2))
    estimate = estimate_memory(build_model(cfg, torch.device("meta")), torch.float32,
                               cfg.optimizer, cfg.rank)
    assert estimate == measure_memory(model, opt)
    assert estimate.gradients == watch.peak_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NEW)
def test_memory_estimate_equals_live_state_after_a_step(name, dtype):
    cfg = load_config(None, {"model.preset": "llama-9m", "model.vocab_size": 200,
                             "method.name": "sltrain", "data.seq_len": 16,
                             "optimizer.name": name, "optimizer.proj_rank": 8})
    model = build_model(cfg).to(dtype)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    model(torch.randint(0, 200, (2, 16))).float().sum().backward()
    opt.step()
    live = measure_memory(model, opt)
    assert estimate_memory(build_model(cfg, device="meta"), dtype, cfg.optimizer, cfg.rank) == live


def memory_report(capsys, *args):
    capsys.readouterr()
    assert main(["memory", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["bytes"]["optimizer_states"]


def test_memory_command_states_the_sizes_the_papers_describe(capsys):
    """llama-60m, dense, float32 estimate: APOLLO keeps rank x max(m, n) moments per matrix
    (plus a 4-byte norm), APOLLO-Mini rank 1, Adam-mini one full moment plus one value per block."""
    preset = ["--model", "llama-60m", "--method", "full", "--dtype", "float32"]
    cfg = load_config(None, {"model.preset": "llama-60m", "method.name": "full"})
    model = build_model(cfg, torch.device("meta"))
    groups = param_groups(model, cfg.optimizer)
    matrices = [p for g in groups if g["kind"] == "matrix" for p in g["params"]]
    others = [p for g in groups if g["kind"] != "matrix" for p in g["params"]]
    adam_other = sum(2 * p.numel() * 4 for p in others)
    for name, rank in (("apollo", 128), ("apollo_mini", 1)):
        moments = sum(2 * rank * max(p.shape) * 4 + 4 for p in matrices)
        assert memory_report(capsys, *preset, "--optimizer", name) == adam_other + moments
    every = [p for p in model.parameters()]
    blocks = sum(8 if "q_proj" in n or "k_proj" in n else (p.shape[0] if p.ndim == 2 else 1)
                 for n, p in model.named_parameters())
    assert memory_report(capsys, *preset, "--optimizer", "adam_mini") == \
        4 * (sum(p.numel() for p in every) + blocks)


@pytest.mark.parametrize("method", ["full", "sltrain"])
@pytest.mark.parametrize("name", NEW)
def test_a_30_step_training_run_lowers_the_loss(tiny, tmp_path, name, method):
    cfg = load_config(None, {**tiny, "method.name": method, "train.steps": 30,
                             "train.eval_every": 0, "optimizer.name": name,
                             "optimizer.proj_rank": 4})
    summary = train(cfg)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line)["loss"] for line in lines]
    assert len(history) == 30
    assert sum(history[-5:]) / 5 < history[0] - 0.5, history
    assert summary["val_loss"] < history[0] - 0.5


@pytest.mark.parametrize("setup", [
    {"optimizer.name": "apollo", "optimizer.per_layer_updates": True, "optimizer.grad_clip": 0.0,
     "optimizer.update_proj_gap": 3, "optimizer.proj_rank": 4},
    {"optimizer.name": "adam_mini"}], ids=["apollo-per-layer", "adam_mini"])
def test_resume_after_interrupt_reproduces_the_uninterrupted_run(tiny, tmp_path, setup):
    """Seeds, limiter norms and block moments round-trip through the checkpoint."""
    base = {**tiny, "train.steps": 8, "train.grad_accum": 2, "train.eval_every": 0, **setup}
    train(load_config(None, {**base, "train.out_dir": str(tmp_path / "a")}))

    def interrupt(step, record):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the step, save, stop

    b = tmp_path / "b"
    assert train(load_config(None, {**base, "train.out_dir": str(b)}), on_step=interrupt)["step"] == 4
    train(resume_config(b, {}), run_dir=b, resume=b)

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(b)) == 8 and losses(b) == losses(tmp_path / "a")  # exact, step by step
