"""A run folder written by sltrain 0.1 before the Trainer/registry refactor (tests/fixtures/run-v0.1:
a 4-step SLTrain run on tests/fixtures/corpus-v0.1.jsonl, made by
`sltrain train --dim 32 --n-layers 1 --n-heads 2 --ffn-dim 64 --vocab-size 256 --rank 4 --seq-len 16
--batch-size 4 --steps 4 --eval-every 0 --eval-batches 2 --data tests/fixtures/corpus-v0.1.jsonl
--out-dir tests/fixtures/run-v0.1` at commit 20da3b4) still evaluates and resumes."""

import json
import shutil
from pathlib import Path

import pytest

from sltrain.cli import main

ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "run-v0.1"


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the run names its corpus relative to the repository
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def test_old_run_evaluates_to_its_recorded_perplexity(old_run, capsys):
    recorded = json.loads((old_run / "summary.json").read_text())["val_ppl"]
    assert main(["eval", str(old_run), "--max-batches", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(recorded, rel=1e-5)


def test_old_run_resumes_from_its_checkpoint(old_run):
    assert main(["train", "--resume", str(old_run), "--steps", "6", "--progress", "false"]) == 0
    steps = [json.loads(line)["step"] for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    summary = json.loads((old_run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["tokens_seen"] == 6 * 4 * 16
