import json

import numpy as np
import pytest
import torch

from sltrain.cli import main
from sltrain.config import load_config
from sltrain.data import Blocks, prepare
from sltrain.data import tokens as token_files
from sltrain.data.scoring import el2n, grand, score_and_prune, score_runs, select
from sltrain.errors import UserError
from sltrain.run.folder import load_run_model
from sltrain.train import train
from sltrain.train.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    """Two tiny runs on the same data from different seeds."""
    root = tmp_path_factory.mktemp("runs")
    base = {"model.dim": 32, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_dim": 64,
            "model.vocab_size": 512, "method.rank": 8, "data.source": str(small_corpus),
            "data.seq_len": 32, "train.batch_size": 8, "train.steps": 6, "train.eval_every": 0,
            "train.eval_batches": 2, "train.progress": False, "optimizer.lr": 3e-3}
    for seed in (0, 1):
        train(load_config(None, {**base, "train.seed": seed, "train.out_dir": str(root / f"s{seed}")}))
    return root / "s0", root / "s1"


def run_blocks(run):
    model, cfg, ckpt = load_run_model(run)
    data = prepare(cfg.data, cfg.model_dims()["vocab_size"], ckpt.parent.parent)
    return model, cfg, data, Blocks(data.train, cfg.data.seq_len)


def test_el2n_is_the_mean_l2_error_of_the_softmax_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g) * 2
    targets = torch.randint(0, 7, (3, 4), generator=g)
    targets[2, 1:] = IGNORE_INDEX
    by_hand = []
    for i in range(3):
        errs = [torch.linalg.vector_norm(torch.softmax(logits[i, t], -1)
                                         - torch.nn.functional.one_hot(targets[i, t], 7))
                for t in range(4) if targets[i, t] != IGNORE_INDEX]
        by_hand.append(sum(errs) / len(errs))
    torch.testing.assert_close(el2n(logits, targets), torch.stack(by_hand))


def test_el2n_and_grand_of_a_run_match_separate_computations(runs):
    model, cfg, data, blocks = run_blocks(runs[0])
    x, y = blocks.batch([0, 5, 9])
    with torch.no_grad():
        expected_el2n = el2n(model(x), y)
    scores = score_runs([runs[0]], "el2n", max_blocks=10, batch_size=4, device="cpu")[0]
    np.testing.assert_allclose(scores[[0, 5, 9]], expected_el2n.double().numpy(), rtol=1e-5)
    assert np.all((scores > 0) & (scores < np.sqrt(2)))  # ||p - e_y|| lies in [0, sqrt 2]

    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 1]).flatten(0, 1), y[i])
        g = torch.autograd.grad(loss, params)
        expected = torch.sqrt(sum(t.square().sum() for t in g))
        assert grand(model, x, y)[i].item() == pytest.approx(expected.item(), rel=1e-5)
    g_scores = score_runs([runs[0]], "grand", max_blocks=10, batch_size=4, device="cpu")[0]
    np.testing.assert_allclose(g_scores[[0, 5, 9]], grand(model, x, y).double().numpy(), rtol=1e-5)


def test_scores_of_two_runs_are_the_mean_of_each(runs):
    a = score_runs([runs[0]], "el2n", max_blocks=40, device="cpu")[0]
    b = score_runs([runs[1]], "el2n", max_blocks=40, device="cpu")[0]
    both = score_runs(list(runs), "el2n", max_blocks=40, device="cpu")[0]
    assert not np.allclose(a, b)
    np.testing.assert_allclose(both, (a + b) / 2, rtol=1e-12)


def test_select_keeps_the_hard_or_easy_or_a_random_fraction():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    assert select(scores, 0.5, "easy").tolist() == [0, 2, 4]  # the three highest, in order
    assert select(scores, 0.5, "hard").tolist() == [1, 3, 5]
    rand = select(scores, 0.5, "random", seed=3)
    assert len(rand) == 3 and len(set(rand)) == 3 and list(rand) == sorted(rand)
    assert select(scores, 1.0, "easy").tolist() == list(range(6))
    assert len(select(scores, 0.01, "easy")) == 1


@pytest.mark.parametrize("drop", ["easy", "hard"])
def test_pruned_folder_holds_exactly_the_kept_blocks_and_trains(runs, tmp_path, drop):
    out = tmp_path / f"pruned-{drop}"
    report = score_and_prune(list(runs), "el2n", 0.3, out, drop, max_blocks=200, device="cpu")
    scores = np.load(out / "scores.npy")
    assert scores.shape == (200,) and report["count"] == 200
    kept = select(scores, 0.3, drop)
    assert len(kept) == report["kept_blocks"] == 60
    dropped = np.setdiff1d(np.arange(200), kept)
    if drop == "easy":
        assert scores[kept].min() >= scores[dropped].max()
    else:
        assert scores[kept].max() <= scores[dropped].min()

    _, cfg, data, blocks = run_blocks(runs[0])
    meta, streams = token_files.open_streams(out, "re-run", verify=True)
    pruned = Blocks(streams["train"], cfg.data.seq_len)
    assert len(pruned) == 60
    x_new, y_new = pruned.batch(range(60))
    x_old, y_old = blocks.batch(kept.tolist())
    assert torch.equal(x_new, x_old)  # every input token of every kept block, in order
    assert torch.equal(y_new[:, :-1], y_old[:, :-1]) and torch.equal(y_new[-1], y_old[-1])
    assert np.array_equal(streams["val"], data.val)
    assert meta["pruned"]["method"] == "el2n" and meta["pruned"]["kept_blocks"] == 60
    summary = json.loads((out / "scores.json").read_text())
    assert summary["mean"] == pytest.approx(scores.mean()) and summary["drop"] == drop

    cfg2 = load_config(None, {"model.dim": 32, "model.n_layers": 1, "model.n_heads": 2,
                              "model.ffn_dim": 64, "model.vocab_size": 512, "method.rank": 8,
                              "data.source": str(out), "data.seq_len": 32, "train.batch_size": 8,
                              "train.steps": 2, "train.eval_every": 0, "train.eval_batches": 2,
                              "train.progress": False, "train.out_dir": str(tmp_path / "run")})
    summary = train(cfg2)
    assert summary["status"] == "finished" and np.isfinite(summary["val_loss"])


def test_cli_scores_and_prunes(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "score", str(runs[0]), "--keep", "0.5", "--drop", "random",
                 "--max-blocks", "50", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "kept 25 blocks" in printed and f"--data {out}" in printed
    assert np.load(out / "scores.npy").shape == (50,)


@pytest.mark.parametrize("argv,needle", [
    (["--method", "loss"], "invalid choice"),
    (["--keep", "0"], "--keep 0.0 must be a fraction in (0, 1]"),
    (["--keep", "1.5"], "--keep 1.5 must be a fraction in (0, 1]"),
    (["--max-blocks", "0"], "--max-blocks 0 must be at least 1"),
])
def test_bad_input_is_one_line(runs, tmp_path, capsys, argv, needle):
    base = {"--keep": "0.5", "--out": str(tmp_path / "o")}
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    args = [a for kv in {**base, **flags}.items() for a in kv]
    assert main(["data", "score", str(runs[0]), *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_missing_run_and_mismatched_runs_are_refused(runs, small_corpus, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        score_runs([tmp_path / "nope"], "el2n")
    with pytest.raises(UserError, match="no checkpoint"):
        score_runs([tmp_path], "el2n")
    other = tmp_path / "other"
    train(load_config(None, {"model.dim": 32, "model.n_layers": 1, "model.n_heads": 2,
                             "model.ffn_dim": 64, "model.vocab_size": 512, "method.rank": 8,
                             "data.source": str(small_corpus), "data.seq_len": 16,
                             "train.batch_size": 8, "train.steps": 1, "train.eval_every": 0,
                             "train.eval_batches": 2, "train.progress": False,
                             "train.out_dir": str(other)}))
    with pytest.raises(UserError, match="same --data, --seq-len and tokenizer"):
        score_runs([runs[0], other], "el2n")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a prepared data folder"):
        score_and_prune([runs[0]], "el2n", 0.5, tmp_path / "file")
