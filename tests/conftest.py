import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from sltrain.data.corpus import embedded_path

# Tests never reach the Hugging Face Hub: an unknown name fails at once instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# pytest-xdist's workers (pyproject: -n auto) share the cores: each, and each run it starts in a
# subprocess, takes its share of threads instead of all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tokenizers and token files of the tests out of the user's cache."""
    os.environ["SLTRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A JSON-lines corpus of 12 documents cut from the embedded corpus (~240 KB)."""
    with gzip.open(embedded_path(), "rt") as f:
        docs = [json.loads(line) for line in f][:12]
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"][:20_000]}) + "\n" for d in docs))
    return path


@pytest.fixture
def tiny(small_corpus, tmp_path) -> dict:
    """Overrides for a model and run small enough to train in seconds on one CPU core."""
    return {
        "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 512, "method.rank": 16, "data.source": str(small_corpus),
        "data.seq_len": 32, "train.batch_size": 8, "train.steps": 20, "train.eval_every": 10,
        "train.eval_batches": 4, "train.progress": False, "train.out_dir": str(tmp_path / "run"),
        "optimizer.lr": 3e-3,
    }


def sltrain(*args):
    """`sltrain ARGS` in this process: the exit status of the same `main` a process runs
    (test_bad_inputs.py checks the contract in real processes too)."""
    from sltrain.cli import main

    return main([str(a) for a in args])


def assert_one_line_error(capsys, code, *needles):
    """An in-process `sltrain` call exited 2 with one `sltrain: error:` line holding `needles`."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sltrain: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


class LiveGradients:
    """Watches a real backward: each time a parameter's gradient completes, the bytes and number
    of the gradients then alive (`p.grad` set); `peak_bytes`/`peak_count` are the most at once.
    Install it before building an optimizer that frees gradients in its own hooks (per-layer
    updates): hooks run in the order registered, so this one sees each gradient before it goes."""

    def __init__(self, model) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.peak_bytes = self.peak_count = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def alive(self) -> list:
        return [p.grad for p in self.params if p.grad is not None]

    def alive_bytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.alive())

    def _hook(self, p) -> None:
        self.peak_bytes = max(self.peak_bytes, self.alive_bytes())
        self.peak_count = max(self.peak_count, len(self.alive()))
