"""A parameterisation and an optimizer registered from outside the package (tests/plugins/toy_plugin.py)
train, count their memory, checkpoint, resume and export without any change to sltrain."""

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sltrain.cli import main
from sltrain.config import flag_table, load_config, resume_config
from sltrain.errors import UserError
from sltrain.model import build_model
from sltrain.registry import METHODS, OPTIMIZERS
from sltrain.train import train

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    module = importlib.import_module("toy_plugin")
    yield module
    METHODS.unregister("gated_lowrank")
    OPTIMIZERS.unregister("signum")
    sys.modules.pop("toy_plugin", None)


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_plugin_trains_checkpoints_resumes_and_counts_its_memory(plugin, tiny, tmp_path):
    base = {**tiny, "method.name": "gated_lowrank", "method.gate_init": 0.5, "optimizer.name": "signum",
            "optimizer.signum_beta": 0.8, "optimizer.lr": 5e-3, "train.steps": 12, "train.eval_every": 0}
    fresh = build_model(load_config(None, base))
    gates = [m.gate for m in fresh.modules() if isinstance(m, plugin.GatedLowRankLinear)]
    assert len(gates) == 2 * 7 and all(torch.equal(g, torch.full_like(g, 0.5)) for g in gates)

    a = tmp_path / "a"
    summary = train(load_config(None, {**base, "train.out_dir": str(a)}))
    history = losses(a)
    assert history[-1][1] < history[0][1] - 0.3, history
    # Memory: the estimate (from the optimizer's own state_bytes) equals the live tensors, and
    # both equal one float32 momentum per trainable parameter.
    live, estimate = summary["training_state_bytes"], summary["estimated_state_bytes"]
    assert live == estimate
    assert live["optimizer_states"] == 4 * summary["params"]["trainable"]

    def interrupt(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    b = tmp_path / "b"
    stopped = train(load_config(None, {**base, "train.out_dir": str(b)}), on_step=interrupt)
    assert stopped["step"] == 5
    train(resume_config(b, {}), run_dir=b, resume=b)
    assert losses(b) == history  # exact, step by step


def test_plugin_run_exports_to_transformers(plugin, tiny, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--method", "gated_lowrank", "--gate-init", "0.7", "--optimizer", "signum",
             "--lr", "1e-3"]
    args = [f"--{k}={v}" for k, v in tiny.items()]
    assert main(["train", *args, *flags, "--steps", "4", "--eval-every", "0"]) == 0
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "hf"), "--data", tiny["data.source"], "--json"]) == 0
    theirs = json.loads(capsys.readouterr().out)
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=1e-4)


def test_plugin_options_are_flags_and_are_validated(plugin, capsys):
    assert flag_table()["gate-init"] == "method.gate_init"
    assert flag_table()["signum-beta"] == "optimizer.signum_beta"
    with pytest.raises(UserError, match="method.gate_init"):
        load_config(None, {"method.name": "gated_lowrank", "method.gate_init": -1.0})
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "gated_lowrank" in out and "signum" in out


def _cli(*args, plugins="toy_plugin"):
    env = {**os.environ, "SLTRAIN_PLUGINS": plugins,
           "PYTHONPATH": os.pathsep.join([str(PLUGINS), *sys.path])}
    return subprocess.run([sys.executable, "-m", "sltrain", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_plugin_loads_from_the_environment():
    done = _cli("memory", "--method", "gated_lowrank", "--optimizer", "signum", "--rank", "8",
                "--dtype", "float32", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["method"] == "gated_lowrank" and report["optimizer"] == "signum"
    assert report["bytes"]["optimizer_states"] == 4 * report["params"]["trainable"]
    broken = _cli("memory", plugins="no_such_plugin_module")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines() == [broken.stderr.strip()]
    assert "plugin no_such_plugin_module" in broken.stderr
