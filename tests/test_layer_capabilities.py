"""What each registered layer says it can do (sltrain.parametrize.base.FactoredLinear) holds for it:
merged() is its forward (or, for a layer that is not `mergeable`, every merge refuses in one line),
refactor_ keeps its weight, its prunable tensors, index buffers and sparse counts are its own and add
up to what the model-level counts report, and its FLOP counts are the matmuls it runs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.measure import count_parameters, estimate_memory
from sltrain.measure.health import weight_spectra
from sltrain.model import build_model
from sltrain.optim import tricks
from sltrain.parametrize import DENSE_CAPABILITIES, can, merge, methods_that
from sltrain.parametrize.base import FactoredLinear
from sltrain.parametrize.lost import LOSTLinear
from sltrain.parametrize.sltrain import SparseLowRankLinear
from sltrain.parametrize.sparse import SparseLinear
from sltrain.registry import METHODS
from sltrain.train import prune

FACTORED = [e.name for e in METHODS.entries()
            if isinstance(e.obj, type) and issubclass(e.obj, FactoredLinear)]
CAPABILITIES = ("refactorable", "prunable", "has_cycles", "mergeable")
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 256, "method.rank": 8, "method.density": 0.2, "optimizer.reset_every": 5}


def layer_of(method: str) -> FactoredLinear:
    """A float64 layer of `method` built from a dense 40 -> 24 linear, every parameter random (so
    that no part of the weight is trivially zero)."""
    torch.manual_seed(0)
    entry = METHODS[method]
    options = {**entry.options().model_dump(), "rank": 4, "lora_alpha": 8.0, "density": 0.25}
    layer = entry.obj.from_linear(nn.Linear(40, 24, bias=False, dtype=torch.float64), seed=3, **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def test_the_built_in_layers_are_all_checked():
    assert set(FACTORED) >= {"lowrank", "sltrain", "relora", "sparse", "lost", "cola", "cola_m"}


@pytest.mark.parametrize("method", FACTORED)
def test_merged_equals_forward_and_dense_weight(method):
    layer = layer_of(method)
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    if not layer.mergeable:  # no dense form: every way to one refuses with the layer's reason
        model = nn.Sequential(layer)
        for attempt in (layer.merged, layer.dense_weight, layer.spectra_parts, lambda: merge(model)):
            with pytest.raises(UserError, match="no dense form") as err:
                attempt()
            assert str(err.value) == layer.no_dense_form() and "\n" not in str(err.value)
        assert model[0] is layer  # refused before anything was replaced
        return
    merged = layer.merged()
    assert isinstance(merged, nn.Linear) and merged.bias is None
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.linear(x, layer.dense_weight()), layer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", FACTORED)
def test_refactor_keeps_the_weight_where_the_class_says_it_can(method):
    layer = layer_of(method)
    params = {id(p) for p in layer.parameters()}
    if not layer.refactorable:
        with pytest.raises(TypeError):
            layer.refactor_()
        with pytest.raises(TypeError):
            tricks.refactor_(layer)
        return
    before = layer.dense_weight().clone()
    A, B = layer.factors()
    assert {id(A), id(B)} <= params and A.shape == (4, 40) and B.shape == (24, 4)
    tricks.refactor_(layer)
    assert layer.factors() == (A, B)  # the same Parameters, written in place
    assert (layer.dense_weight() - before).abs().max() < 1e-5  # float32 SVD of the core
    with torch.no_grad():
        torch.testing.assert_close(B.t() @ B, A @ A.t(), rtol=1e-4, atol=1e-5)  # balanced


@pytest.mark.parametrize("method", FACTORED)
def test_prunable_tensors_and_index_buffers_are_the_layers_own(method):
    layer = layer_of(method)
    params = dict(layer.named_parameters())
    buffers = {id(b) for b in layer.buffers()}
    pruned = layer.prunable_tensors()
    assert bool(pruned) == layer.prunable
    for suffix, p in pruned:
        assert params[suffix] is p  # the suffix names the parameter in the layer
    assert all(id(b) in buffers and not b.is_floating_point() for b in layer.index_buffers())
    counts = layer.sparse_counts()
    assert counts["sparse_indices"] == sum(b.numel() for b in layer.index_buffers())
    assert 0 <= counts["sparse"] <= sum(p.numel() for p in layer.parameters())


# The sparse part of each layer that has one, and how many index entries it keeps.
SPARSE_PARTS = {SparseLowRankLinear: ("values", "support"), SparseLinear: ("values", "support"),
                LOSTLinear: ("C", "channels")}


@pytest.mark.parametrize("method", FACTORED)
def test_sparse_counts_are_the_sparse_part(method):
    layer = layer_of(method)
    values, index = SPARSE_PARTS.get(type(layer), (None, None))
    expected = {"sparse": getattr(layer, values).numel() if values else 0,
                "sparse_indices": getattr(layer, index).numel() if index else 0}
    assert layer.sparse_counts() == expected
    if layer.mergeable and "sparse" in layer.spectra_parts():  # the sparse matrix holds exactly those entries
        assert int(layer.spectra_parts()["sparse"].count_nonzero()) == expected["sparse"]


@pytest.mark.parametrize("method", FACTORED + ["full"])
def test_model_counts_and_index_bytes_sum_the_layers(method):
    cfg = load_config(None, {**TINY, "method.name": method})
    model = build_model(cfg, device="meta")
    layers = [m for m in model.modules() if isinstance(m, FactoredLinear)]
    counts = count_parameters(model)
    assert counts["sparse"] == sum(m.sparse_counts()["sparse"] for m in layers)
    assert counts["sparse_indices"] == sum(b.numel() for m in layers for b in m.index_buffers())
    index_bytes = sum(b.numel() * b.element_size() for m in layers for b in m.index_buffers())
    assert estimate_memory(model).sparse_indices == index_bytes
    names = {n for n, _ in prune.prunable(model, cfg)}
    assert names == {f"{n}.{s}" for n, m in model.named_modules() if isinstance(m, FactoredLinear)
                     for s, _ in m.prunable_tensors()} | {
        f"{n}.weight" for n, m in model.named_modules()
        if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in cfg.method.targets}
    assert bool(names) == can(method, "prunable")


def test_spectra_parts_are_the_layers_own_composition():
    layer = layer_of("sltrain")
    parts = layer.spectra_parts()
    assert set(parts) == {"weight", "low_rank", "sparse"}
    torch.testing.assert_close(parts["weight"], layer.dense_weight(), rtol=0, atol=0)
    torch.testing.assert_close(parts["low_rank"] + parts["sparse"], parts["weight"])
    torch.testing.assert_close(parts["low_rank"], layer.scaling * layer.B.detach() @ layer.A.detach())
    mask = torch.zeros(24 * 40, dtype=torch.bool)
    mask[layer.support.long()] = True
    assert torch.equal(parts["sparse"].flatten() != 0, mask)
    for method in FACTORED:  # every layer with a dense form reports at least its weight
        if can(method, "mergeable"):
            assert "weight" in layer_of(method).spectra_parts()


def test_health_reports_the_singular_values_of_the_layers_parts():
    cfg = load_config(None, {**TINY, "model.n_layers": 1})
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, SparseLowRankLinear):
            nn.init.normal_(m.B)  # B starts at zero: give the low-rank part some weight
    spectra = weight_spectra(model)
    layer = model.layers[0].mlp.down_proj
    parts, s = layer.spectra_parts(), spectra["layers.0.mlp.down_proj"]
    for key, w in parts.items():
        svd = torch.linalg.svdvals(w.double())
        expected = svd[: layer.rank] if key == "low_rank" else svd
        assert s[key] == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)
    energy = parts["weight"].double().pow(2).sum()
    for key in ("low_rank", "sparse"):
        assert s[f"{key}_share"] == pytest.approx((parts[key].double().pow(2).sum() / energy).item())


@pytest.mark.parametrize("method", FACTORED + ["full"])
def test_config_time_capabilities_are_the_layer_classes(method):
    cls = METHODS[method].obj
    for capability in CAPABILITIES:
        expected = (getattr(cls, capability) if issubclass(cls, FactoredLinear)
                    else DENSE_CAPABILITIES.get(capability, False))
        assert can(method, capability) == expected
        assert (method in methods_that(capability)) == expected


def test_refusals_name_the_methods_that_qualify():
    assert {"lowrank", "sltrain", "lost"} <= set(methods_that("refactorable"))
    assert {"full", "sparse", "sltrain"} <= set(methods_that("prunable"))
    with pytest.raises(UserError) as err:
        tricks.validate(load_config(None, {**TINY, "method.name": "sparse", "optimizer.refactor": True}))
    assert all(name in str(err.value) for name in methods_that("refactorable"))
    with pytest.raises(UserError) as err:
        prune.validate(load_config(None, {**TINY, "method.name": "lost", "prune.target_sparsity": 0.5}))
    assert all(name in str(err.value) for name in methods_that("prunable"))
    assert "lost" in str(err.value).split("not ")[-1]
    with pytest.raises(UserError, match="--reset-every"):
        tricks.validate(load_config(None, {**TINY, "method.name": "relora", "optimizer.reset_every": 0}))


def test_layers_without_a_capability_refuse_it():
    layer = layer_of("lowrank")
    assert layer.trainable_for_warm_start() == [] and layer.index_buffers() == []
    with pytest.raises(TypeError):
        layer.end_cycle_()
    with pytest.raises(TypeError):
        layer.set_warm_start(True)


def test_end_cycle_keeps_the_function_and_names_the_restarted_parameters():
    layer = layer_of("relora")
    assert layer.has_cycles
    before = layer.dense_weight()
    restarted = layer.end_cycle_(torch.Generator().manual_seed(0))
    assert {id(p) for p in restarted} == {id(p) for p in layer.factors()}
    torch.testing.assert_close(layer.dense_weight(), before)
    assert set(map(id, layer.trainable_for_warm_start())) == set(map(id, layer.parameters()))


@pytest.mark.parametrize("method", FACTORED)
@pytest.mark.parametrize("frozen", [False, True])
def test_flop_counts_are_the_matmuls_the_layer_runs(method, frozen):
    """flops_per_token and backward_flops_per_token against torch's FlopCounterMode (matmuls
    only) on a real forward and backward; a layer may add its own element-wise work (CoLA's σ),
    at most a few percent here."""
    layer = layer_of(method)
    if frozen and method == "relora":
        layer.set_warm_start(True)  # W trains, the factors are frozen
    elif frozen:
        return
    tokens = 15
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        y = layer(x)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    for counted, claimed in ((fwd.get_total_flops() / tokens, layer.flops_per_token(tokens)),
                             (bwd.get_total_flops() / tokens, layer.backward_flops_per_token(tokens))):
        assert counted <= claimed <= 1.05 * counted, (counted, claimed)
