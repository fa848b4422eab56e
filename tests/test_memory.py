import json

import pytest
import torch
from conftest import LiveGradients

from sltrain.cli import main
from sltrain.config import load_config
from sltrain.measure import estimate_memory, measure_memory
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


def test_memory_command_reports_published_count_and_int32_indices(capsys):
    assert main(["memory", "--model", "llama-1b", "--method", "sltrain", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert round(report["params"]["total"] / 1e6, 1) == 645.5
    nnz = report["params"]["sparse_indices"]
    assert report["bytes"]["sparse_indices"] == 4 * nnz  # int32: half the published int64 code
    assert report["bytes"]["weights"] == 2 * report["params"]["total"]  # bfloat16 by default

