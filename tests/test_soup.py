"""Model soups: the soup is the mean of the ingredients' dense weights, and the greedy recipe
never ends worse than its best ingredient."""

import json

import pytest
import torch
from conftest import assert_one_line_error, sltrain

from sltrain.config import load_config
from sltrain.model import build_model
from sltrain.parametrize import merge
from sltrain.parametrize.sltrain import SparseLowRankLinear
from sltrain.run.checkpoint import list_checkpoints
from sltrain.run.folder import load_run_model
from sltrain.train import train


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    """Two tiny SLTrain runs of different seeds (so different sparse supports), checkpointed
    every 4 steps, and one run of another depth."""
    root = tmp_path_factory.mktemp("soup-runs")
    base = {
        "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 512, "method.rank": 16, "data.source": str(small_corpus),
        "data.seq_len": 32, "train.batch_size": 8, "train.steps": 12, "train.eval_every": 0,
        "train.eval_batches": 4, "train.progress": False, "optimizer.lr": 3e-3,
        "train.save_every": 4, "train.keep_checkpoints": 5, "train.device": "cpu",
    }
    out = {}
    for name, extra in {"seed0": {"train.seed": 0}, "seed1": {"train.seed": 1},
                        "shallow": {"model.n_layers": 1, "train.steps": 1}}.items():
        train(load_config(None, {**base, **extra, "train.out_dir": str(root / name)}))
        out[name] = root / name
    return out


def dense_weights(path):
    model, cfg, _ = load_run_model(path)
    return merge(model).state_dict(), cfg


def ids(cfg):
    return torch.randint(0, cfg.model_dims()["vocab_size"], (2, cfg.data.seq_len),
                         generator=torch.Generator().manual_seed(0))


def test_soup_of_one_checkpoint_twice_is_that_checkpoint(runs, tmp_path, capsys):
    out = tmp_path / "soup"
    assert sltrain("soup", runs["seed0"], runs["seed0"], "--out", out) == 0
    assert "uniform soup of 2 checkpoints" in capsys.readouterr().out
    ours, cfg, _ = load_run_model(runs["seed0"])
    soup, soup_cfg, _ = load_run_model(out)
    assert soup_cfg.method.name == "full"
    x = ids(cfg)
    with torch.no_grad():
        assert (ours(x) - soup(x)).abs().max() < 1e-6
    record = json.loads((out / "soup.json").read_text())
    ppls = [i["val_ppl"] for i in record["ingredients"]]
    assert ppls[0] == ppls[1] == pytest.approx(record["soup"]["val_ppl"], rel=1e-6)
    # `sltrain eval` reads the soup folder and agrees with soup.json
    assert sltrain("eval", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(record["soup"]["val_ppl"],
                                                                       rel=1e-6)


def test_uniform_soup_of_different_supports_is_the_mean_of_dense_weights(runs, tmp_path):
    a, b = runs["seed0"], runs["seed1"]
    supports = [m.support for m in load_run_model(a)[0].modules()
                if isinstance(m, SparseLowRankLinear)][:1]
    supports += [m.support for m in load_run_model(b)[0].modules()
                 if isinstance(m, SparseLowRankLinear)][:1]
    assert not torch.equal(*supports)  # different seeds: different sparse supports

    out = tmp_path / "soup"
    assert sltrain("soup", a, b, "--out", out) == 0
    (wa, cfg), (wb, _) = dense_weights(a), dense_weights(b)
    mean = {k: (wa[k] + wb[k]) / 2 for k in wa}
    soup, _, _ = load_run_model(out)
    for k, v in soup.state_dict().items():
        torch.testing.assert_close(v, mean[k], rtol=0, atol=1e-7, msg=k)

    # the soup computes what a dense LLaMA holding the averaged merged weights computes
    dense = build_model(load_config(None, {**_flat_model(cfg), "method.name": "full"}))
    dense.load_state_dict(mean)
    x = ids(cfg)
    with torch.no_grad():
        assert (soup(x) - dense.eval()(x)).abs().max() < 1e-6
        # ... which is neither ingredient
        assert (soup(x) - load_run_model(a)[0](x)).abs().max() > 1e-3


def _flat_model(cfg):
    return {f"model.{k}": v for k, v in cfg.to_dict()["model"].items()} | {
        "data.seq_len": cfg.data.seq_len}


def test_greedy_soup_starts_from_the_best_and_never_gets_worse(runs, tmp_path, capsys):
    # checkpoints along one run (steps 4, 8, 12) and the end of another seed
    ckpts = [*list_checkpoints(runs["seed0"]), runs["seed1"]]
    assert len(ckpts) == 4
    out = tmp_path / "greedy"
    assert sltrain("soup", *ckpts, "--recipe", "greedy", "--out", out) == 0
    record = json.loads((out / "soup.json").read_text())
    ppls = [i["val_ppl"] for i in record["ingredients"]]
    best = min(range(len(ppls)), key=ppls.__getitem__)
    assert record["kept"][0] == best
    assert record["soup"]["val_ppl"] <= ppls[best]
    assert [i["kept"] for i in record["ingredients"]] == [n in record["kept"] for n in range(4)]
    # the soup holds the mean of exactly the kept ingredients
    kept = [dense_weights(ckpts[n])[0] for n in record["kept"]]
    soup = load_run_model(out)[0].state_dict()
    for k, v in soup.items():
        torch.testing.assert_close(v, sum(w[k] for w in kept) / len(kept), rtol=0, atol=1e-6)
    assert len(record["greedy_trials"]) == 3  # each ingredient after the best was tried once
    assert [t["added"] for t in record["greedy_trials"] if t["kept"]] == record["kept"][1:]



def test_soup_refuses_mismatched_architectures_and_used_folders(runs, tmp_path, capsys):
    out = tmp_path / "soup"
    assert_one_line_error(capsys, sltrain("soup", runs["seed0"], runs["shallow"], "--out", out),
                          "n_layers 1", "one architecture")
    assert not out.exists()
    assert_one_line_error(capsys, sltrain("soup", runs["seed0"], "--out", runs["seed1"]),
                          "not an empty folder")
    assert_one_line_error(capsys, sltrain("soup", tmp_path / "nothing", "--out", out),
                          "no checkpoint")
