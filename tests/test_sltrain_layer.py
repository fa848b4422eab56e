import torch
from safetensors.torch import load_file, save_file

from sltrain.parametrize.lowrank import LowRankLinear
from sltrain.parametrize.sltrain import SparseLowRankLinear, _SparseLowRankMatmul


def make_layer(seed=0, dtype=torch.float64):
    layer = SparseLowRankLinear(24, 20, rank=4, lora_alpha=8, density=0.1, seed=seed).to(dtype)
    torch.nn.init.normal_(layer.B)  # B starts at zero; make the low-rank path matter
    return layer


def dense_reference(layer):
    sparse = torch.zeros(layer.out_features * layer.in_features, dtype=layer.values.dtype)
    sparse = sparse.index_put((layer.support.long(),), layer.values)
    return layer.scaling * layer.B @ layer.A + sparse.view(layer.out_features, layer.in_features)


def test_gradcheck_float64():
    layer = make_layer()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)

    def fn(x, A, B, values):
        return _SparseLowRankMatmul.apply(x, A, B, values, layer.support, layer.scaling, torch.float64)

    assert torch.autograd.gradcheck(fn, (x, layer.A, layer.B, layer.values))


def test_gradients_match_dense_reference():
    layer = make_layer()
    x = torch.randn(4, 7, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 7, 20, dtype=torch.float64)
    (layer(x) * target).sum().backward()
    ours = [x.grad.clone(), layer.A.grad.clone(), layer.B.grad.clone(), layer.values.grad.clone()]
    for t in (x, layer.A, layer.B, layer.values):
        t.grad = None
    (torch.nn.functional.linear(x, dense_reference(layer)) * target).sum().backward()
    ref = [x.grad, layer.A.grad, layer.B.grad, layer.values.grad]
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_init_follows_the_paper():
    layer = SparseLowRankLinear(300, 200, rank=16, lora_alpha=32, density=0.03, seed=1)
    assert layer.scaling == 2.0
    assert torch.all(layer.B == 0)  # so W starts equal to S
    bound = 1 / 300**0.5
    assert layer.A.abs().max() <= bound and layer.values.abs().max() <= bound
    assert layer.values.numel() == round(0.03 * 300 * 200)
    torch.testing.assert_close(layer.dense_weight(), dense_reference(layer))


def test_uniform_b_init_changes_only_b():
    kw = dict(in_features=300, out_features=200, rank=16, lora_alpha=32, density=0.03, seed=1)
    paper = SparseLowRankLinear(**kw)
    uniform = SparseLowRankLinear(**kw, b_init="uniform")
    for layer in (paper, uniform):
        layer.init_weights(0.0, torch.Generator().manual_seed(3))
    assert torch.all(paper.B == 0)
    assert 0.9 / 4 < uniform.B.abs().max() <= 1 / 4 and uniform.B.std() > 0.1
    for name in ("A", "values", "support"):
        assert torch.equal(getattr(paper, name), getattr(uniform, name)), name


def test_b_init_reaches_every_layer_from_the_config():
    from sltrain.config import load_config
    from sltrain.model import build_model

    cfg = load_config(None, {"method.name": "sltrain", "method.b_init": "uniform",
                             "model.n_layers": 1})
    layers = [m for m in build_model(cfg).modules() if isinstance(m, SparseLowRankLinear)]
    assert layers and all(m.b_init == "uniform" and m.B.abs().sum() > 0 for m in layers)


def test_support_sorted_unique_int32_and_seeded():
    a = SparseLowRankLinear(64, 48, 8, 16, 0.05, seed=7)
    b = SparseLowRankLinear(64, 48, 8, 16, 0.05, seed=7)
    c = SparseLowRankLinear(64, 48, 8, 16, 0.05, seed=8)
    assert a.support.dtype == torch.int32
    assert torch.equal(a.support, b.support) and not torch.equal(a.support, c.support)
    s = a.support.long()
    assert torch.all(s[1:] > s[:-1]) and s.min() >= 0 and s.max() < 64 * 48
    assert "support" in dict(a.named_buffers()) and "support" not in dict(a.named_parameters())


def test_index_dtype_widens_for_huge_matrices():
    layer = SparseLowRankLinear(2**16, 2**15 + 1, 8, 16, 0.01, device="meta")
    assert layer.support.dtype == torch.int64


def test_support_fixed_and_only_values_trained():
    torch.manual_seed(0)
    layer = make_layer(dtype=torch.float32)
    support0, values0 = layer.support.clone(), layer.values.detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(5):
        loss = layer(torch.randn(16, 24)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.support, support0)
    assert not torch.equal(layer.values, values0)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B", "values"}


def test_save_load_restores_support_and_outputs(tmp_path):
    layer = make_layer(seed=3, dtype=torch.float32)
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    other = SparseLowRankLinear(24, 20, rank=4, lora_alpha=8, density=0.1, seed=99)
    assert not torch.equal(other.support, layer.support)
    other.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(other.support, layer.support) and other.support.dtype == torch.int32
    x = torch.randn(2, 24)
    assert torch.equal(other(x), layer(x))


def test_merge_equals_forward():
    x = torch.randn(5, 24, dtype=torch.float64)
    for layer in (make_layer(), LowRankLinear(24, 20, rank=4).double()):
        merged = layer.merged()
        assert isinstance(merged, torch.nn.Linear) and merged.bias is None
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-12, atol=1e-12)


BF16_ROUNDING = 2**-8  # bf16 keeps 8 significant bits: rounding moves a value by <= 2^-8 of it


def test_bf16_autocast_matches_a_dense_layer_under_the_same_autocast():
    """Reference: F.linear with the merged float32 weight (composed outside autocast, as the
    layer composes it), run under the same bf16 autocast, so both sides round x and W to bf16."""
    torch.manual_seed(0)
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(8, 7, 24, requires_grad=True)
    target = torch.randn(8, 7, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float() * target).sum().backward()
    ours = [x.grad.clone(), layer.A.grad.clone(), layer.B.grad.clone(), layer.values.grad.clone()]
    assert all(g.dtype == torch.float32 for g in ours)
    for t in (x, layer.A, layer.B, layer.values):
        t.grad = None
    weight = dense_reference(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = torch.nn.functional.linear(x, weight)
    assert y_ref.dtype == torch.bfloat16
    (y_ref.float() * target).sum().backward()
    grad_x, grad_A, grad_B, grad_values = x.grad, layer.A.grad, layer.B.grad, layer.values.grad

    # y, dx and dvalues are the same bf16 products on both sides (y = x W^T, dx = g W, dvalues =
    # (g^T x) at the support): at most one bf16 rounding step (2^-7 of the value) apart, where a
    # kernel sums in another order before rounding (atol: float32 sums of values of order 1).
    one_step = dict(rtol=2 * BF16_ROUNDING, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), **one_step)
    torch.testing.assert_close(ours[0], grad_x, **one_step)
    torch.testing.assert_close(ours[3], grad_values, **one_step)

    # dB = s G A^T and dA = s B^T G from G = g^T x (bf16, shared): ours multiplies in bf16, with
    # A (or B) rounded to bf16 (<= 2^-8 of each term) and the product rounded to bf16 (<= 2^-8 of
    # it); the reference multiplies in float32. So each entry is off by at most 2^-8 of the sum of
    # the terms' magnitudes plus 2^-8 of itself, which bounds the cancellation too.
    G = target.bfloat16().reshape(-1, 20).t() @ x.detach().bfloat16().reshape(-1, 24)
    G, A, B, s = G.float().abs(), layer.A.detach().abs(), layer.B.detach().abs(), layer.scaling
    for got, want, terms in ((ours[2], grad_B, s * G @ A.t()), (ours[1], grad_A, s * B.t() @ G)):
        bound = BF16_ROUNDING * (terms + want.abs())
        assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()
        assert (got - want).norm() <= 2 * BF16_ROUNDING * want.norm()  # measured: about 0.0025


def test_dense_weight_is_not_kept_for_backward():
    """Only x, A, B, values and the support are saved; W (out x in) is recomputed in backward."""
    layer = SparseLowRankLinear(48, 40, rank=4, lora_alpha=8, density=0.1)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(torch.randn(6, 48, requires_grad=True))
    assert (40, 48) not in saved and (48, 40) not in saved
    assert sorted(saved) == sorted([(6, 48), (4, 48), (40, 4), (192,), (192,)])
    y.sum().backward()
    assert layer.values.grad.shape == (192,)
