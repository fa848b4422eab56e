import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sltrain.config import load_config
from sltrain.model import build_model
from sltrain.optim import auon, conda, muon, normuon
from sltrain.optim.auon import AuON, auon_direction
from sltrain.optim.muon import Muon, newton_schulz
from sltrain.optim.normuon import NorMuon

BUILDERS = {
    "muon": muon.build,
    "normuon": normuon.build,
    "conda": conda.build,
    "auon": auon.build,
    "auon_hybrid": auon.build_hybrid,
}
VOCAB, SEQ = 512, 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These problems are too small to gain from threads, and on a busy 2-core machine a second
    intra-op thread that waits on a descheduled one made this file 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(method: str = "full", name: str = "muon", **optimizer):
    overrides = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
                 "model.vocab_size": VOCAB, "method.rank": 16, "method.name": method,
                 "data.seq_len": SEQ, "optimizer.name": name}
    overrides.update({f"optimizer.{k}": v for k, v in optimizer.items()})
    return load_config(None, overrides)


def tiny_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, torch.device("cpu"))


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


def train_step(model, opt, tokens: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model, tokens)
    loss.backward()
    opt.step()
    return loss.item()


def state_tensor_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state_dict()["state"].values()
               for v in s.values() if torch.is_tensor(v))


# ---- Newton-Schulz ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (96, 128)])
def test_newton_schulz_singular_values_near_one(shape):
    # The quintic trades exactness for speed: five steps leave well-conditioned matrices' singular
    # values in about [0.68, 1.21]; the band [0.6, 1.3] holds that with margin.
    torch.manual_seed(0)
    for _ in range(5):
        G = torch.randn(shape) * 10.0
        X = newton_schulz(G, 5)
        assert X.shape == G.shape and X.dtype == G.dtype
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.6 and s.max() < 1.3, (shape, s.min().item(), s.max().item())
    # Same singular vectors as G: the result is U f(S) V^T with f(S) > 0.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.diagonal(U.T @ X @ Vh.T).min() > 0.6


def test_newton_schulz_computes_in_float32_on_cpu():
    G = torch.randn(32, 64)
    assert torch.allclose(newton_schulz(G.bfloat16(), 5).float(), newton_schulz(G.bfloat16().float(), 5),
                          atol=1e-2)
    assert newton_schulz(G.bfloat16(), 5).dtype == torch.bfloat16


# ---- every optimizer trains and keeps its contract ---------------------------------------------

@pytest.mark.parametrize("matrices_only", [False, True])
@pytest.mark.parametrize("name", BUILDERS)
def test_optimizer_reduces_loss_of_tiny_model(name, matrices_only):
    cfg = tiny_config(name=name, lr=3e-3, update_proj_gap=10)
    model = tiny_model(cfg)
    if matrices_only:
        # AdamW on the embeddings and head alone memorises the batch; freeze them so that only
        # this optimizer's own matrix rule can lower the loss.
        for n, p in model.named_parameters():
            p.requires_grad_(p.ndim == 2 and "embed" not in n and "lm_head" not in n)
    opt = BUILDERS[name](model, cfg.optimizer, cfg.rank)
    assert {g["kind"] for g in opt.param_groups} == ({"matrix"} if matrices_only else {"matrix", "other"})
    tokens = batch()
    losses = [train_step(model, opt, tokens) for _ in range(30)]
    assert all(math.isfinite(x) for x in losses)
    # Measured: 6.23 -> about 0.7 with everything trained, -> about 5.2 with matrices only.
    assert losses[-1] < losses[0] - (3.0 if not matrices_only else 0.6), losses


@pytest.mark.parametrize("name", BUILDERS)
def test_optimizer_fits_a_two_layer_mlp(name):
    torch.manual_seed(0)
    X = torch.randn(256, 16)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 4, bias=False))
    with torch.no_grad():
        Y = teacher(X)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(64, 4, bias=False))
    cfg = tiny_config(name=name, lr=1e-2, update_proj_gap=10)
    opt = BUILDERS[name](net, cfg.optimizer, 4)  # Conda at rank 4 < min(m, n) for the first layer
    assert [g["kind"] for g in opt.param_groups] == ["matrix"]
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(net(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Measured: 0.18 -> 0.004-0.018 after 30 steps.
    assert losses[-1] < 0.25 * losses[0], losses


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_round_trip_continues_bitwise(name):
    # Conda refreshes its projector every 2 steps here, so the copy must refresh it identically.
    cfg = tiny_config(method="sltrain", name=name, lr=1e-2, weight_decay=0.1, update_proj_gap=2)
    model = tiny_model(cfg)
    opt = BUILDERS[name](model, cfg.optimizer, cfg.rank)
    for i in range(3):
        train_step(model, opt, batch(i))
    twin = copy.deepcopy(model)
    twin_opt = BUILDERS[name](twin, cfg.optimizer, cfg.rank)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(3, 6):
        train_step(model, opt, batch(i))
        train_step(twin, twin_opt, batch(i))
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("method", ["full", "sltrain"])
@pytest.mark.parametrize("name", BUILDERS)
def test_state_bytes_equal_state_dict_tensors(name, method):
    cfg = tiny_config(method=method, name=name, update_proj_gap=1)
    model = tiny_model(cfg)
    opt = BUILDERS[name](model, cfg.optimizer, cfg.rank)
    for i in range(2):
        train_step(model, opt, batch(i))
    live = state_tensor_bytes(opt)
    predicted = sum(opt.state_bytes(p, g, p.element_size()) for g in opt.param_groups for p in g["params"])
    assert predicted + opt.shared_state_bytes() == live
    # From shapes alone: the same sum over a model on the meta device.
    meta = build_model(cfg, torch.device("meta"))
    meta_opt = BUILDERS[name](meta, cfg.optimizer, cfg.rank)
    assert sum(meta_opt.state_bytes(p, g, 4) for g in meta_opt.param_groups for p in g["params"]) == live


@pytest.mark.parametrize("name", BUILDERS)
def test_state_bytes_follow_parameter_dtype(name):
    cfg = tiny_config(name=name)
    model = tiny_model(cfg).to(torch.bfloat16)
    opt = BUILDERS[name](model, cfg.optimizer, cfg.rank)
    train_step(model, opt, batch())
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(v.dtype == torch.bfloat16 for v in states)
    predicted = sum(opt.state_bytes(p, g, 2) for g in opt.param_groups for p in g["params"])
    assert predicted == state_tensor_bytes(opt)


@pytest.mark.parametrize("name", BUILDERS)
def test_parameters_without_grad_are_skipped(name):
    cfg = tiny_config(name=name)
    model = tiny_model(cfg)
    opt = BUILDERS[name](model, cfg.optimizer, cfg.rank)
    loss_of(model, batch()).backward()
    frozen = model.layers[0].self_attn.q_proj.weight
    before = frozen.detach().clone()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state


def test_closure_is_evaluated_with_grad():
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = Muon([{"params": [w], "kind": "matrix"}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    first = opt.step(closure).item()
    assert opt.step(closure).item() < first


# ---- the properties each paper claims ----------------------------------------------------------

def one_step_update(opt_cls, grad: torch.Tensor, lr: float = 0.1, **kwargs) -> torch.Tensor:
    w = torch.nn.Parameter(torch.zeros_like(grad))
    opt = opt_cls([{"params": [w], "kind": "matrix"}], lr=lr, **kwargs)
    w.grad = grad.clone()
    opt.step()
    return w.detach().clone()


def test_normuon_balances_output_rows_where_muon_does_not():
    torch.manual_seed(0)
    # A tall gradient whose rows differ in scale by 100x: Muon's orthogonal update leaves the
    # output neurons' update norms unequal; NorMuon's per-row second moment equalises them.
    grad = torch.logspace(-1, 1, 64).unsqueeze(1) * torch.randn(64, 16)
    muon_rows = one_step_update(Muon, grad).norm(dim=1)
    assert muon_rows.max() / muon_rows.min() > 3
    lr = 0.1
    delta = one_step_update(NorMuon, grad, lr=lr)
    rows = delta.norm(dim=1)
    assert torch.allclose(rows, rows.mean().expand_as(rows), rtol=1e-4)
    # And the overall update RMS is AdamW's, 0.2 * lr.
    assert math.isclose(delta.square().mean().sqrt().item(), 0.2 * lr, rel_tol=1e-4)


def test_normuon_state_is_one_second_moment_per_output_row():
    w = torch.nn.Parameter(torch.randn(24, 10))
    opt = NorMuon([{"params": [w], "kind": "matrix"}])
    w.grad = torch.randn(24, 10)
    opt.step()
    assert opt.state[w]["exp_avg_sq"].shape == (24,)
    assert opt.state[w]["momentum_buffer"].shape == (24, 10)


@pytest.mark.parametrize("hybrid", [False, True])
def test_auon_direction_stays_inside_the_spectral_trust_region(hybrid):
    torch.manual_seed(0)
    spike = torch.zeros(4, 4)
    spike[1, 2] = 5.0
    rank_one = torch.outer(torch.randn(64), torch.randn(32))
    heavy_tailed = torch.distributions.StudentT(1.5).sample((48, 80))
    for M in (spike, rank_one, heavy_tailed, torch.randn(80, 48), torch.randn(64, 64) * 1e3):
        U = auon_direction(M, hybrid)
        G = M / M.norm() if not hybrid else newton_schulz(M, 1) / newton_schulz(M, 1).norm()
        brake = torch.cosh(G).square().mean().sqrt()
        spectral = torch.linalg.matrix_norm(U, ord=2)
        # The bound the paper states: ||U||_2 <= ||U||_F = ||G||_F / rms(cosh G) < 1.
        assert spectral <= U.norm() * (1 + 1e-5)
        assert math.isclose(U.norm().item(), 1.0 / brake.item(), rel_tol=1e-5)
        assert spectral < 1.0
    # For a spike the brake is strong: cosh(1)^2 in one of 16 entries.
    assert torch.linalg.matrix_norm(auon_direction(spike), ord=2) < 0.97


@pytest.mark.parametrize("hybrid", [False, True])
def test_auon_step_is_bounded(hybrid):
    torch.manual_seed(0)
    lr, (m, n) = 0.1, (40, 24)
    delta = one_step_update(AuON, torch.randn(m, n) * 100, lr=lr, hybrid=hybrid)
    assert delta.square().mean().sqrt() <= 0.2 * lr * (1 + 1e-5)
    assert torch.linalg.matrix_norm(delta, ord=2) < 0.2 * lr * math.sqrt(m * n)


def test_conda_projector_is_orthonormal_with_clamped_rank():
    torch.manual_seed(0)
    wide, tall = torch.nn.Parameter(torch.randn(8, 20)), torch.nn.Parameter(torch.randn(30, 6))
    opt = conda.Conda([{"params": [wide, tall], "kind": "matrix"}], rank=7, update_proj_gap=3)
    for _ in range(4):
        wide.grad, tall.grad = torch.randn(8, 20), torch.randn(30, 6)
        opt.step()
    P_wide, P_tall = opt.state[wide]["ortho"], opt.state[tall]["ortho"]
    assert P_wide.shape == (8, 7) and P_tall.shape == (6, 6)  # 7 clamped to min(30, 6)
    assert opt.state[wide]["exp_avg_sq"].shape == (7, 20) and opt.state[tall]["exp_avg_sq"].shape == (30, 6)
    for P in (P_wide, P_tall):
        assert torch.allclose(P.T @ P, torch.eye(P.shape[1]), atol=1e-5)


def test_conda_at_full_rank_is_adam_in_a_rotated_basis():
    # Step 1, full rank: the update is P sign(P^T G) (Adam's first step is a sign in its basis).
    torch.manual_seed(0)
    grad, lr = torch.randn(6, 10), 0.1
    delta = one_step_update(conda.Conda, grad, lr=lr, rank=6)
    U = torch.linalg.svd(grad, full_matrices=False)[0]
    expected = -lr * U @ torch.sign(U.T @ grad)
    assert torch.allclose(delta, expected, atol=1e-5)
