import json
import subprocess
import sys

import pytest
import torch
from conftest import LiveGradients

from sltrain.config import load_config
from sltrain.device import _mallopt
from sltrain.measure import estimate_memory, measure_memory
from sltrain.measure.memory import rss_bytes
from sltrain.model import build_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain"])
def test_estimate_equals_live_tensors_after_a_step(method, dtype):
    cfg = load_config(None, {"model.preset": "llama-9m", "model.vocab_size": 200,
                             "method.name": method, "data.seq_len": 16})
    model = build_model(cfg).to(dtype)
    watch = LiveGradients(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 200, (2, 16))).float().sum().backward()
    # The gradients a real backward left, counted from the tensors themselves.
    grads = watch.alive_bytes()
    assert len(watch.alive()) == len(watch.params) and grads == watch.peak_bytes
    opt.step()
    live = measure_memory(model, opt)
    estimate = estimate_memory(model, dtype)
    assert estimate.gradients == grads
    assert live == estimate
    assert estimate_memory(build_model(cfg, device="meta"), dtype) == live


def test_memory_command_reports_published_count_and_int32_indices():
    out = subprocess.run(
        [sys.executable, "-m", "sltrain", "memory", "--model", "llama-1b", "--method", "sltrain",
         "--json"], capture_output=True, text=True, check=True,
    ).stdout
    report = json.loads(out)
    assert round(report["params"]["total"] / 1e6, 1) == 645.5
    nnz = report["params"]["sparse_indices"]
    assert report["bytes"]["sparse_indices"] == 4 * nnz  # int32: half the published int64 code
    assert report["bytes"]["weights"] == 2 * report["params"]["total"]  # bfloat16 by default


HOLES = """
import sys, torch
from sltrain.device import return_freed_memory
from sltrain.measure.memory import rss_bytes
if sys.argv[1] == "fixed":
    return_freed_memory(torch.device("cpu"))
torch.empty(1 << 22).fill_(1)  # a 16 MiB block freed: by default glibc's threshold climbs to it
start = rss_bytes()
blocks = [torch.ones(1 << 18) for _ in range(128)]  # 1 MiB each
del blocks[::2]  # 64 MiB freed between the blocks kept
print(rss_bytes() - start)
"""


@pytest.mark.skipif(_mallopt() is None or rss_bytes() == 0, reason="glibc on Linux only")
def test_freed_tensors_leave_the_process_at_once():
    def held(mode):
        out = subprocess.run([sys.executable, "-c", HOLES, mode], check=True, capture_output=True,
                             text=True)
        return int(out.stdout.split()[-1])

    assert held("default") > 120 * 2**20  # the heap keeps the holes resident...
    assert held("fixed") < 72 * 2**20  # ... mmapped blocks are returned when freed
