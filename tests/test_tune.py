"""The held-out validation slices and `sltrain bench`'s learning-rate tuning stage."""

import csv
import json

import numpy as np
import pytest
from conftest import assert_one_line_error
from scipy.stats import t as student_t

from sltrain.bench import load_suite
from sltrain.bench.report import Variant
from sltrain.bench.suite import Tune, lr_grid
from sltrain.bench.tune import choose
from sltrain.cli import main
from sltrain.config import DataConfig, load_config
from sltrain.data import Blocks, prepare
from sltrain.data.packing import held_out_slice
from sltrain.errors import UserError
from sltrain.train import train


# ---- the held-out slices ----------------------------------------------------------------------
@pytest.mark.parametrize("length", [2, 33, 64, 65, 97, 1000, 1001])
def test_tune_and_report_slices_share_no_token(length):
    stream = np.arange(length)  # each token is its position
    T = 32
    tune, report = (held_out_slice(stream, T, s) for s in ("tune", "report"))
    assert held_out_slice(stream, T, "all") is stream
    assert np.array_equal(np.concatenate([tune, report]), stream)  # a cut, nothing lost
    half = len(Blocks(stream, T)) // 2
    assert len(Blocks(tune, T)) == half and len(Blocks(report, T)) >= half - 1
    # Every token of every block evaluation reads, inputs and targets: no position in both.
    seen = []
    for part in (tune, report):
        blocks = Blocks(part, T)
        x, y = blocks.batch(range(len(blocks))) if len(blocks) else (np.empty(0), np.empty(0))
        seen.append(set(x.ravel().tolist()) | set(y.ravel().tolist()))
    assert not seen[0] & seen[1]


def test_prepare_halves_the_validation_stream_and_all_is_the_whole(small_corpus):
    cfg = DataConfig(source=str(small_corpus), seq_len=32)
    whole = prepare(cfg, 512)
    # "all" (the default) is the whole held-out stream as written in the cache, as before.
    assert len(whole.val) == whole.meta["splits"]["val"]["tokens"]
    tune = prepare(cfg.model_copy(update={"val_slice": "tune"}), 512).val
    report = prepare(cfg.model_copy(update={"val_slice": "report"}), 512).val
    cut = len(Blocks(whole.val, 32)) // 2 * 32 + 1
    assert len(tune) == cut and np.array_equal(tune, whole.val[:cut])
    assert np.array_equal(report, whole.val[cut:])
    assert np.array_equal(whole.train, prepare(cfg.model_copy(update={"val_slice": "tune"}),
                                               512).train)


def test_a_run_evaluates_on_its_slice(tiny):
    cfg = load_config(None, tiny)
    summaries = {}
    for which in ("tune", "report"):
        run = {**tiny, "train.steps": 1, "train.eval_batches": 100, "data.val_slice": which,
               "train.out_dir": tiny["train.out_dir"] + which}
        blocks = Blocks(prepare(load_config(None, run).data, 512).val, cfg.data.seq_len)
        summaries[which] = train(load_config(None, run))
        # Every block of its own half (100 batches are more than it has), no other block.
        assert summaries[which]["val_tokens"] == len(blocks) * cfg.data.seq_len
    assert summaries["tune"]["val_loss"] != summaries["report"]["val_loss"]  # the same model


def test_a_slice_of_a_streamed_source_needs_a_fixed_validation_budget():
    with pytest.raises(UserError, match="needs --val-tokens N"):
        prepare(DataConfig(source="hf:someone/corpus:en", val_slice="report"), 512,
                min_train_tokens=1000, min_val_tokens=100)


# ---- the tuning stage -------------------------------------------------------------------------
def _tuned_suite(tmp_path, small_corpus, tune: str = "", runs: str = "") -> str:
    path = tmp_path / "tuned.toml"
    path.write_text(f'''
seeds = [0, 1]
baseline = "full"
[common]
dim = 32
n-layers = 1
n-heads = 2
ffn-dim = 64
vocab-size = 512
rank = 8
data = "{small_corpus}"
seq-len = 16
batch-size = 4
steps = 2
eval-every = 0
eval-batches = 1
[tune]
{"" if "seeds" in tune else "seeds = [0]"}
steps = 1
{tune}
[runs.full]
method = "full"
lr = 1e-3
lr-grid = [1e-3, 3e-2]
[runs.sltrain]
method = "sltrain"
lr = 3e-3
lr-grid = [3e-4, 3e-3]
{runs}''')
    return str(path)


def _csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_tuning_picks_the_best_rate_and_the_final_runs_use_it(tmp_path, small_corpus):
    out = tmp_path / "bench"
    suite = _tuned_suite(tmp_path, small_corpus, "widen = 1")
    assert main(["bench", suite, "--out", str(out), "--progress", "false", "--jobs", "2"]) == 0

    tuning = _csv(out / "tune" / "results.csv")
    # A two-point grid's best is on an edge, so `widen = 1` adds the next rate out, once.
    for variant, grid in (("full", [1e-3, 3e-2]), ("sltrain", [3e-4, 3e-3])):
        first = {float(r["lr"]): float(r["val_loss"]) for r in tuning
                 if r["variant"] == variant and float(r["lr"]) in grid}
        beyond = grid[1] * 2 if first[grid[1]] < first[grid[0]] else grid[0] / 2
        assert sorted(float(r["lr"]) for r in tuning if r["variant"] == variant) == sorted(
            [*grid, beyond]), variant
    finals = _csv(out / "results.csv")
    assert [r["run"] for r in finals] == ["full-seed0", "full-seed1", "sltrain-seed0",
                                          "sltrain-seed1"]
    report = (out / "report.md").read_text()
    for variant in ("full", "sltrain"):
        mine = {float(r["lr"]): float(r["val_loss"]) for r in tuning if r["variant"] == variant}
        best = min(mine, key=mine.get)
        for r in (r for r in finals if r["variant"] == variant):
            assert float(r["lr"]) == best and r["lr_source"] == "tuned"
            saved = json.loads((out / "runs" / r["run"] / "config.json").read_text())
            assert saved["optimizer"]["lr"] == best and saved["data"]["val_slice"] == "report"
        assert f"**{best:.3g}: {mine[best]:.4f}**" in report  # the tuning table marks it
        ppl = [float(r["val_ppl"]) for r in finals if r["variant"] == variant]
        half = student_t.ppf(0.975, 1) * np.std(ppl, ddof=1) / np.sqrt(2)
        row = next(line for line in report.splitlines() if line.startswith(f"| {variant} | 2/2 |"))
        assert f"| {np.mean(ppl) - half:.2f} – {np.mean(ppl) + half:.2f} | {best:g} (tuned) |" in row
    for r in tuning:
        saved = json.loads((out / "tune" / "runs" / r["run"] / "config.json").read_text())
        assert saved["data"]["val_slice"] == "tune" and saved["train"]["steps"] == 1

    # Again: nothing is trained twice, tuning runs included.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")}
    assert len(stamps) == 10
    assert main(["bench", suite, "--out", str(out), "--progress", "false"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")} == stamps
    assert all(log.read_text().count("$ sltrain") == 1 for log in out.glob("**/logs/*.log"))


def test_choice_skips_rates_that_failed_at_any_seed():
    def row(lr, seed, loss, status="finished"):
        return {"variant": "v", "lr": lr, "seed": seed, "status": status, "val_loss": loss}

    rows = [row(1e-3, 0, 5.0), row(1e-3, 1, 5.2), row(2e-3, 0, 4.0), row(2e-3, 1, None, "failed"),
            row(4e-3, 0, 4.9), row(4e-3, 1, float("nan"))]
    choice = choose(rows)["v"]
    assert choice.lr == 1e-3 and choice.losses == {1e-3: 5.1, 2e-3: None, 4e-3: None}
    assert choice.at_edge
    assert choose([row(1e-3, 0, None, "failed")])["v"].lr is None


def test_widening_adds_the_next_rate_beyond_the_edge_the_best_is_on():
    tune = Tune([0], {}, step=2.0, grids={"hi": [1e-3, 2e-3], "lo": [1e-3, 2e-3], "mid": [1, 2, 4]})
    assert tune.widen_at({"hi": 2e-3, "lo": 1e-3, "mid": 2})
    assert tune.grids == {"hi": [1e-3, 2e-3, 4e-3], "lo": [5e-4, 1e-3, 2e-3], "mid": [1, 2, 4]}
    assert not tune.widen_at({"mid": 2}) and not tune.widen_at({})


def test_interval_is_student_t_over_seeds():
    v = Variant("v", [{"status": "finished", "val_ppl": x} for x in (100.0, 104.0, 110.0)])
    lo, hi = v.interval("val_ppl")
    half = student_t.ppf(0.975, 2) * np.std([100, 104, 110], ddof=1) / np.sqrt(3)
    assert lo == pytest.approx(np.mean([100, 104, 110]) - half) and hi - lo == pytest.approx(2 * half)
    assert Variant("w", v.rows[:1]).interval("val_ppl") is None


def test_grid_holds_the_published_rate_log_spaced():
    assert lr_grid(1e-3, 4, 2) == [5e-4, 1e-3, 2e-3, 4e-3]
    assert lr_grid(3e-3, 5, 3) == [pytest.approx(3e-3 / 9), 1e-3, 3e-3, 9e-3, 2.7e-2]
    quick = load_suite("quick-tuned")
    assert quick.seeds == [0, 1, 2] and quick.tune.seeds == [0]
    assert {v["train.steps"] for v in quick.variants.values()} == {250}
    for variant, grid in quick.tune.grids.items():
        lr = quick.runs(only=[variant])[0].config().optimizer.lr
        assert len(grid) >= 4 and lr in grid, variant
        assert np.allclose(np.diff(np.log(grid)), np.log(2))


@pytest.mark.parametrize("tune, runs, needle", [
    ("lr-points = 1", "", "lr-points = 1 must be a whole number of at least 2"),
    ("lr-step = 1", "", "lr-step = 1 must be a ratio above 1"),
    ("widen = -1", "", "widen = -1 must be a whole number of grid points"),
    ("seeds = []", "", "[tune]: seeds must be a non-empty list"),
    ("lr-stepp = 2", "", "'lr-stepp' is not a `sltrain train` flag"),
    ("seq-len = 8", "", "--seq-len cannot differ in the tuning runs"),
    ("lr = 1e-2", "", "--lr cannot differ in the tuning runs"),
    ("eval-batches = 0", "", "train.eval_batches = 0"),
    ("", '[runs.x]\nmethod = "full"\nlr = 3e-3\nlr-grid = [1e-2, 2e-2]',
     "does not bracket the run's lr 0.003"),
    ("", '[runs.x]\nmethod = "full"\nlr-grid = [1e-2]', "must list two or more positive rates"),
    ("", '[runs.x]\nmethod = "full"\nval-slice = "tune"', "val-slice is the tuning stage's"),
    ("", '[runs.x]\nmethod = "full"\ntune = 3', "tune = 3 must be a table of flags"),
])
def test_bad_tune_tables_are_one_line_errors(tmp_path, small_corpus, capsys, tune, runs, needle):
    suite = _tuned_suite(tmp_path, small_corpus, tune, runs)
    assert_one_line_error(capsys, main(["bench", suite, "--dry-run"]), needle)


def test_a_tuned_suite_refuses_what_the_stage_sets(tmp_path, small_corpus, capsys):
    suite = _tuned_suite(tmp_path, small_corpus)
    assert_one_line_error(capsys, main(["bench", suite, "--dry-run", "--lr", "1e-2"]),
                          "has a tuning stage, which sets --lr")
    path = tmp_path / "plain.toml"
    path.write_text('[runs.a]\nmethod = "full"\nlr-grid = [1e-3, 1e-2]\n')
    assert_one_line_error(capsys, main(["bench", str(path), "--dry-run"]),
                          "lr-grid needs a [tune] table")
