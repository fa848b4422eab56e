"""`sltrain bench`: suite files, the runner (isolation, resume, failures), the report."""

import csv
import shutil

import pytest
import torch

from sltrain.bench import builtin_suites, load_suite
from sltrain.bench.report import PLOTS, Variant, check_lines
from sltrain.bench.runner import COLUMNS
from sltrain.bench.suite import Check
from sltrain.cli import main
from sltrain.errors import UserError
from sltrain.measure import PeakMemory


def _suite(tmp_path, small_corpus, extra_runs: str = "", checks: str = "") -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(f'''
description = "two methods, a few steps"
seeds = [0]
baseline = "full"
[common]
dim = 64
n-layers = 2
n-heads = 4
ffn-dim = 128
vocab-size = 512
rank = 16
data = "{small_corpus}"
seq-len = 32
batch-size = 8
steps = 6
eval-every = 3
eval-batches = 2
[runs.full]
method = "full"
[runs.sltrain]
method = "sltrain"
{extra_runs}
{checks}''')
    return str(path)


def _rows(folder):
    with (folder / "results.csv").open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_suite_runs_records_failures_resumes_and_reports(tmp_path, small_corpus, capsys):
    broken = f'[runs.broken]\nmethod = "full"\ndata = "{tmp_path / "missing.jsonl"}"\n'
    checks = ('[[checks]]\nclaim = "sltrain no worse than 100x full"\nmetric = "val_ppl"\n'
              'left = "sltrain"\nop = "<="\nright = "full"\nfactor = 100\n')
    suite = _suite(tmp_path, small_corpus, broken, checks)
    out = tmp_path / "bench"
    assert main(["bench", suite, "--out", str(out), "--progress", "false"]) == 1  # one run failed

    header, rows = _rows(out)
    assert header == COLUMNS
    by_run = {r["run"]: r for r in rows}
    assert list(by_run) == ["full-seed0", "sltrain-seed0", "broken-seed0"]
    assert by_run["broken-seed0"]["status"] == "failed"
    assert "missing.jsonl" in by_run["broken-seed0"]["error"]
    for name in ("full-seed0", "sltrain-seed0"):
        r = by_run[name]
        assert r["status"] == "finished" and int(r["tokens"]) == 6 * 8 * 32
        assert float(r["val_ppl"]) > 1 and float(r["tok_per_s"]) > 0
        assert int(r["params_trainable"]) > 0 and int(r["est_memory_bytes"]) > 0
        assert r["peak_memory_kind"].startswith("cpu")
        assert len(r["val_curve"].split()) == 2  # evaluations at steps 3 and 6
        assert r["command"].startswith("sltrain train ") and "--seed 0" in r["command"]
    assert int(by_run["sltrain-seed0"]["params_total"]) < int(by_run["full-seed0"]["params_total"])

    report = (out / "report.md").read_text()
    assert "| sltrain | 1/1 |" in report and "| broken | 0/1 | failed |" in report
    assert "**holds**: sltrain no worse than 100x full" in report
    assert "## Runs that did not finish" in report and "missing.jsonl" in report
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000

    # Running the suite again skips the finished runs: their summaries are untouched.
    stamps = {n: (out / "runs" / n / "summary.json").stat().st_mtime_ns for n in by_run
              if n != "broken-seed0"}
    assert main(["bench", suite, "--out", str(out), "--progress", "false",
                 "--only", "full", "sltrain"]) == 0
    for name, stamp in stamps.items():
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == stamp
        assert (out / "logs" / f"{name}.log").read_text().count("$ sltrain") == 1

    # A run stopped after its checkpoint (no finished summary) is resumed, not restarted.
    (out / "runs" / "full-seed0" / "summary.json").unlink()
    assert main(["bench", suite, "--out", str(out), "--progress", "false", "--only", "full"]) == 0
    log = (out / "logs" / "full-seed0.log").read_text()
    assert f"$ sltrain train --resume {out / 'runs' / 'full-seed0'}" in log
    rows = _rows(out)[1]  # the runs this call left alone keep their rows
    assert [r["run"] for r in rows] == ["full-seed0", "sltrain-seed0", "broken-seed0"]
    assert rows[0]["status"] == "finished" and rows[2]["status"] == "failed"
    assert "| sltrain | 1/1 |" in (out / "report.md").read_text()

    # A run folder made by a different config is refused, not mixed into the results.
    capsys.readouterr()
    assert main(["bench", suite, "--out", str(out), "--progress", "false", "--steps", "8"]) == 2
    assert "different config (train.steps" in capsys.readouterr().err


def test_report_is_rebuilt_from_results_csv_alone(tmp_path, small_corpus):
    out = tmp_path / "bench"
    assert main(["bench", _suite(tmp_path, small_corpus), "--out", str(out), "--progress",
                 "false", "--only", "full"]) == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "results.csv", copy)
    assert main(["bench", "report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    assert all((copy / p).is_file() for p in PLOTS)


def test_builtin_suites_load_and_quick_is_the_papers_comparison():
    assert {"quick", "paper", "density", "rank"} <= set(builtin_suites())
    quick = load_suite("quick")
    assert list(quick.variants) == ["full", "lowrank", "relora", "galore", "fira", "sltrain",
                                    "sltrain-8bit-per-layer"]
    assert len(quick.seeds) >= 2
    assert {v["train.steps"] for v in quick.variants.values()} == {250}  # equal token budget
    assert load_suite("density").variants["sltrain-density0.05"]["method.density"] == 0.05
    paper = load_suite("paper")
    assert paper.published["full-60m"]["llama-60m"] == {"ppl": 34.06, "memory_gb": 0.36}
    assert paper.variants["sltrain-1b"]["model.preset"] == "llama-1b"


@pytest.mark.parametrize("body, needle", [
    ('[runs.a]\nmethd = "full"', "'methd' is not a `sltrain train` flag"),
    ('[runs.a]\nmethod = "sltrain"\nrank = 4096', "rank 4096"),
    ('[runs.a]\nmethod = "full"\n[[checks]]\nclaim = "x"\nmetric = "speed"\nleft = "a"\n'
     'op = "<"\nright = "a"', "needs metric in"),
    ('seeds = []\n[runs.a]\nmethod = "full"', "seeds must be"),
    ('baseline = "b"\n[runs.a]\nmethod = "full"', "baseline 'b'"),
    ("[runs", "cannot be parsed"),
])
def test_bad_suite_files_are_refused_with_the_fix(tmp_path, body, needle):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(UserError, match=None) as e:
        load_suite(str(path))
    assert needle in str(e.value)


def test_unknown_suite_and_missing_results(tmp_path, capsys):
    assert main(["bench", "nonexistent"]) == 2
    assert "no suite 'nonexistent'" in capsys.readouterr().err
    assert main(["bench", "report", str(tmp_path)]) == 2
    assert "results.csv" in capsys.readouterr().err


def test_checks_report_whether_claims_hold():
    def variant(name, ppl):
        return Variant(name, [{"status": "finished", "val_ppl": ppl}])

    variants = {"a": variant("a", 100.0), "b": variant("b", 98.0)}
    within = Check("a within 5% of b", "val_ppl", "a", "<=", "b", 1.05)
    better = Check("a better than b", "val_ppl", "a", "<", "b")
    lines = check_lines([within, better], variants)
    assert lines[0].startswith("- **holds**: a within 5% of b")
    assert lines[1].startswith("- **does not hold**: a better than b")
    assert "ratio 1.020" in lines[1]


def test_cpu_peak_memory_counts_what_training_allocates():
    peak = PeakMemory(torch.device("cpu"), interval_s=0.001).start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so that it is resident
    x += 1
    import time

    time.sleep(0.05)
    del x
    n, kind = peak.result()
    assert kind == "cpu_peak_rss_above_baseline"
    assert 60 * 2**20 <= n < 200 * 2**20
