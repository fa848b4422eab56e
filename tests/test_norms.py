"""Norm variants, and the exact Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm conversions."""

import pytest
import torch

from sltrain.config import load_config
from sltrain.errors import UserError
from sltrain.model import build_model
from sltrain.model.convert import to_pre_crmsnorm, to_pre_rmsnorm
from sltrain.model.llama import CRMSNorm
from sltrain.train import train

NORMS = ["pre_rmsnorm", "pre_ln", "pre_crmsnorm", "post_ln", "mix_ln", "layernorm_scaling",
         "single_scale_rmsnorm"]


def small(**over):
    return load_config(None, {"model.dim": 64, "model.n_layers": 3, "model.n_heads": 4,
                              "model.ffn_dim": 128, "model.vocab_size": 97, "method.rank": 8,
                              **over})


def trained_pre_ln(method="full"):
    """A Pre-LN model whose gains and weights are far from their initial values (in float64; the
    norms compute in float32, so agreement is to float32 rounding)."""
    torch.manual_seed(0)
    # B at zero (then perturbed below): the float32-rounding tolerances were set at this scale.
    init = {"method.b_init": "zero"} if method == "sltrain" else {}
    model = build_model(small(**{"model.norm": "pre_ln", "method.name": method, **init})).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    return model


@pytest.mark.parametrize("method", ["full", "sltrain"])
def test_three_forms_give_the_same_logits_and_gradients(method):
    ln = trained_pre_ln(method)
    rms, crms = to_pre_rmsnorm(ln), to_pre_crmsnorm(ln)
    assert crms.embed_tokens.weight.shape[1] == 63 and isinstance(crms.norm, CRMSNorm)
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    grads, logits = {}, {}
    for name, model in (("ln", ln), ("rms", rms), ("crms", crms)):
        seen = []
        hooks = [layer.register_full_backward_hook(lambda m, gi, go, seen=seen: seen.append(gi[0]))
                 for block in model.layers for layer in (block.self_attn.o_proj, block.mlp.down_proj)]
        out = model(idx)
        torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
        for h in hooks:
            h.remove()
        logits[name], grads[name] = out.detach(), seen
    for name in ("rms", "crms"):
        assert (logits[name] - logits["ln"]).abs().max() < 1e-5, name
        # The gradient reaching every block's inner activations (attention output, SwiGLU hidden)
        for a, b in zip(grads[name], grads["ln"], strict=True):
            assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item()), name
    # Pre-RMSNorm keeps the readers and gains: their parameter gradients are the same too.
    ln_p, rms_p = dict(ln.named_parameters()), dict(rms.named_parameters())
    for key in ("layers.1.self_attn.q_proj.weight", "layers.2.mlp.up_proj.weight",
                "layers.0.input_layernorm.weight", "norm.weight"):
        if key in ln_p:  # factored layers were merged: compare the dense ones
            torch.testing.assert_close(rms_p[key].grad, ln_p[key].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rms_p["norm.weight"].grad, ln_p["norm.weight"].grad, rtol=1e-5,
                               atol=1e-7)


def test_only_pre_ln_converts():
    model = build_model(small())
    with pytest.raises(UserError, match="only a pre_ln model converts"):
        to_pre_rmsnorm(model)
    with pytest.raises(UserError, match="embed-proj"):
        small(**{"model.norm": "pre_crmsnorm", "model.embed_proj": True})


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_trains(tiny, norm):
    cfg = load_config(None, {**tiny, "model.norm": norm, "train.steps": 12, "train.eval_every": 0,
                             "model.embed_proj": norm == "single_scale_rmsnorm"})
    summary = train(cfg)
    assert summary["val_loss"] < 6.15, (norm, summary["val_loss"])  # ln(512) = 6.24 untrained


def test_norm_shapes():
    scaling = build_model(small(**{"model.norm": "layernorm_scaling"}))
    assert [b.scale for b in scaling.layers] == pytest.approx([1, 2**-0.5, 3**-0.5])
    mix = build_model(small(**{"model.norm": "mix_ln", "model.mix_ln_ratio": 0.34}))
    assert [b.post_ln for b in mix.layers] == [True, False, False]
    single = build_model(small(**{"model.norm": "single_scale_rmsnorm"}))
    assert single.norm.weight.shape == (1,)


def test_convert_command_writes_equivalent_runs(tiny, tmp_path, capsys):
    """`sltrain convert` of a trained Pre-LN SLTrain run: both dense forms load like any run and
    give the run's logits (1e-5) and perplexity; non-pre_ln runs and used folders are refused;
    the model-only result cannot be resumed."""
    from sltrain.cli import main
    from sltrain.evaluate import perplexity
    from sltrain.run.folder import load_run_model

    cfg = load_config(None, {**tiny, "model.norm": "pre_ln", "train.steps": 6,
                             "train.eval_every": 0})
    run = tmp_path / "run"
    train(cfg)
    x = torch.randint(0, 512, (2, 16))
    ref = load_run_model(run)[0](x)
    for to in ("pre_rmsnorm", "pre_crmsnorm"):
        assert main(["convert", str(run), "--to", to, "--out", str(tmp_path / to)]) == 0
        model, out_cfg, _ = load_run_model(tmp_path / to)
        assert (out_cfg.model.norm, out_cfg.method.name) == (to, "full")
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        assert perplexity(tmp_path / to, {}, "val", 2)["ppl"] == pytest.approx(
            perplexity(run, {}, "val", 2)["ppl"], rel=1e-5)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "pre_rmsnorm"), "--to", "pre_crmsnorm",
                 "--out", str(tmp_path / "again")]) == 2
    assert "only a pre_ln run converts" in capsys.readouterr().err
    assert main(["convert", str(run), "--to", "pre_rmsnorm",
                 "--out", str(tmp_path / "pre_rmsnorm")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "pre_rmsnorm"), "--progress", "false"]) == 2
    assert "without a training state" in capsys.readouterr().err
