import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sltrain.config import load_config
from sltrain.data import Blocks, BlockSampler, prepare, prepare_options
from sltrain.densify import densify
from sltrain.errors import UserError
from sltrain.measure import count_parameters, estimate_memory, measure_memory
from sltrain.model import build_model
from sltrain.optim import build_optimizer
from sltrain.parametrize.sparse import SparseLinear
from sltrain.run.folder import load_run_model
from sltrain.train import train


def sparse_cfg(tiny, **extra):
    return load_config(None, {**tiny, "method.name": "sparse", "method.density": 0.25, **extra})


def sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def test_layer_forward_and_gradients_match_a_dense_masked_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 20, bias=False)
    layer = SparseLinear.from_linear(linear, density=0.25, seed=7)
    keep = torch.zeros(480, dtype=torch.bool)
    keep[layer.support.long()] = True
    dense = (linear.weight.detach() * keep.view(20, 24)).requires_grad_(True)
    x = torch.randn(3, 5, 24)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(x1).square().sum().backward()
    F.linear(x2, dense).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(layer.values.grad, dense.grad.flatten()[keep], atol=1e-5)
    assert torch.equal(layer.dense_weight(), dense.detach())
    assert layer.support.dtype == torch.int32 and torch.all(layer.support.diff() > 0)


def test_magnitude_mask_keeps_the_largest_entries_of_the_dense_init():
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 16, bias=False)
    layer = SparseLinear.from_linear(linear, density=0.25, seed=0, mask="magnitude")
    w = linear.weight.detach().flatten()
    top = torch.topk(w.abs(), 128).indices.sort().values
    assert torch.equal(layer.support.long(), top)
    assert torch.equal(layer.values.detach(), w[top])
    kept = torch.zeros_like(w, dtype=torch.bool)
    kept[top] = True
    assert w[kept].abs().min() >= w[~kept].abs().max()


def test_parameter_count_and_memory_follow_the_density_formula(tiny):
    cfg = sparse_cfg(tiny)
    full = build_model(load_config(None, {**tiny, "method.name": "full"}), device="meta")
    model = build_model(cfg, device="meta")
    layers = sparse_layers(model)
    assert len(layers) == 2 * 7
    nnz = sum(round(0.25 * m.in_features * m.out_features) for m in layers.values())
    dense_targets = sum(m.in_features * m.out_features for m in layers.values())
    counts = count_parameters(model)
    assert counts["sparse"] == counts["sparse_indices"] == nnz
    assert counts["total"] == count_parameters(full)["total"] - dense_targets + nnz
    est = estimate_memory(model)
    assert est.sparse_indices == 4 * nnz  # int32 indices
    # the live model and its AdamW state hold exactly what the estimate says
    torch.manual_seed(0)
    live = build_model(cfg)
    opt = build_optimizer(live, cfg.optimizer, cfg.rank)
    x = torch.randint(0, 512, (2, 16))
    F.cross_entropy(live(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    assert measure_memory(live, opt).to_dict() == est.to_dict()


def test_training_keeps_the_support_and_the_zeros_and_states_hold_nnz_only(tiny):
    for mask in ("random", "magnitude"):
        cfg = sparse_cfg(tiny, **{"method.mask": mask, "train.steps": 8, "train.eval_every": 0,
                                  "train.out_dir": tiny["train.out_dir"] + mask})
        torch.manual_seed(cfg.train.seed)  # the loop seeds the same before building the model
        before = sparse_layers(build_model(cfg))
        train(cfg)
        model, _, ckpt = load_run_model(Path(cfg.train.out_dir))
        state = torch.load(ckpt / "training_state.pt", weights_only=True)["optimizer"]
        after = sparse_layers(model)
        opt = build_optimizer(model, cfg.optimizer, cfg.rank)
        opt.load_state_dict(state)
        for name, layer in after.items():
            assert torch.equal(layer.support, before[name].support)  # never moved
            assert not torch.equal(layer.values, before[name].values)  # but trained
            outside = torch.ones(layer.in_features * layer.out_features, dtype=torch.bool)
            outside[layer.support.long()] = False
            assert torch.all(layer.dense_weight().flatten()[outside] == 0)
            moments = opt.state[layer.values]
            assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == (layer.values.numel(),)


def test_densify_gives_the_same_logits_and_init_from_continues_where_it_ended(tiny, tmp_path):
    sp = tmp_path / "sp"
    cfg = sparse_cfg(tiny, **{"train.steps": 15, "train.eval_every": 0, "train.out_dir": str(sp)})
    train(cfg)
    info = densify(sp, tmp_path / "dense")
    assert info["step"] == 15 and info["method"] == "sparse"
    sparse_model, _, _ = load_run_model(sp)
    dense_model, dense_cfg, _ = load_run_model(tmp_path / "dense")
    assert dense_cfg.method.name == "full" and not sparse_layers(dense_model)
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert torch.allclose(sparse_model(x), dense_model(x), atol=1e-5)
    with pytest.raises(UserError, match="without a training state"):
        train(dense_cfg, run_dir=tmp_path / "dense", resume=tmp_path / "dense")
    with pytest.raises(UserError, match="not an empty folder"):
        densify(sp, tmp_path / "dense")

    # The fine-tuning run's first loss is the sparse model's loss on the same first batch.
    ft = tmp_path / "ft"
    ft_cfg = load_config(None, {**tiny, "method.name": "full", "train.steps": 6,
                                "train.eval_every": 0, "train.out_dir": str(ft),
                                "train.init_from": str(tmp_path / "dense")})
    ft_summary = train(ft_cfg)
    records = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    data = prepare(ft_cfg.data, 512, ft / "tokenizer.json", **prepare_options(ft_cfg))
    xb, yb = BlockSampler(Blocks(data.train, 32), 8, ft_cfg.train.seed).next_batch(0, 1)
    with torch.no_grad():
        expected = F.cross_entropy(sparse_model(xb).flatten(0, 1), yb.flatten()).item()
    assert records[0]["loss"] == pytest.approx(expected, abs=1e-4)
    # ... and then trains every weight: the pruned entries are free again
    ft_model, _, _ = load_run_model(ft)
    q_dense = ft_model.get_submodule("layers.0.self_attn.q_proj").weight
    q_sparse = sparse_layers(sparse_model)["layers.0.self_attn.q_proj"]
    assert int((q_dense != 0).sum()) > 2 * q_sparse.values.numel()
    assert abs(ft_summary["val_loss"] - expected) < 0.5
    assert (ft / "tokenizer.json").read_text() == (sp / "tokenizer.json").read_text()


def test_init_from_refuses_a_model_it_does_not_fit(tiny, tmp_path):
    cfg = sparse_cfg(tiny, **{"train.steps": 2, "train.eval_every": 0})
    train(cfg)
    bad = load_config(None, {**tiny, "method.name": "sltrain", "train.steps": 2,
                             "train.out_dir": str(tmp_path / "x"),
                             "train.init_from": tiny["train.out_dir"]})
    with pytest.raises(UserError, match="do not fit this model"):
        train(bad)
    with pytest.raises(UserError, match="does not exist"):
        train(load_config(None, {**tiny, "train.out_dir": str(tmp_path / "y"),
                                 "train.init_from": str(tmp_path / "nope")}))


def test_mask_is_only_for_sparse():
    with pytest.raises(UserError, match="--mask magnitude"):
        load_config(None, {"method.name": "sltrain", "method.mask": "magnitude"})
