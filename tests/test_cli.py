"""The command line as a user meets it: bad input gives one line, no traceback, exit 2."""

import importlib.util
import json
import shutil

import pytest
from conftest import assert_one_line_error, sltrain

from sltrain.data.corpus import embedded_path


def tiny_flags(tmp_path, data):
    return ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--ffn-dim", "128",
            "--vocab-size", "512", "--rank", "16", "--data", str(data), "--seq-len", "32",
            "--batch-size", "8", "--eval-batches", "2", "--progress", "false",
            "--out-dir", str(tmp_path / "run")]


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--model", "llama-3m"], ["model.preset", "llama-60m"]),
        (["--rank", "0"], ["method.rank", "greater than 0", "--rank"]),
        (["--rank", "-3"], ["method.rank"]),
        (["--rank", "300"], ["rank 300 is impossible", "1..256"]),
        (["--density", "0"], ["method.density", "--density"]),
        (["--sp-ratio", "1.5"], ["method.density"]),
        (["--steps", "ten"], ["train.steps", "integer"]),
        (["--lr", "-1"], ["optimizer.lr"]),
        (["--no-such-flag", "1"], ["unrecognized arguments"]),
        (["--optimizer", "adafactor"], ["optimizer.name", "galore"]),
        (["--optimizer", "galore"], ["projection rank 64", "--proj-rank 16"]),  # SLTrain's r x in factors
        (["--per-layer-updates", "--per-layer-clip", "none"], ["global gradient norm", "--grad-clip 0"]),
        (["--method", "relora"], ["reset-every", "0"]),
        (["--refactor", "--reset-every", "10", "--method", "full"], ["--refactor", "lowrank"]),
    ],
)
def test_bad_values(tmp_path, flags, needles, capsys):
    assert_one_line_error(capsys, sltrain("train", "--out-dir", str(tmp_path / "r"), *flags), *needles)
    assert not (tmp_path / "r").exists()  # nothing is left behind by a run that never started


def test_missing_and_empty_data_files(tmp_path, capsys):
    assert_one_line_error(capsys, sltrain("train", "--data", str(tmp_path / "none.jsonl")), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(capsys, sltrain("train", "--data", str(empty)), "holds no text")


def test_corrupt_corpus_checksum(tmp_path, capsys):
    corrupt = tmp_path / "corpus.jsonl.gz"
    data = bytearray(embedded_path().read_bytes())
    data[-100] ^= 0x01
    corrupt.write_bytes(bytes(data))
    shutil.copy(str(embedded_path()) + ".sha256", str(corrupt) + ".sha256")
    assert_one_line_error(capsys, sltrain("train", "--data", str(corrupt)), "corrupt", "sha256")


def test_bad_config_files(tmp_path, capsys):
    assert_one_line_error(capsys, sltrain("train", "--config", str(tmp_path / "x.toml")), "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    assert_one_line_error(capsys, sltrain("train", "--config", str(bad)), "cannot be parsed")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stepz: 3\n")
    assert_one_line_error(capsys, sltrain("train", "--config", str(unknown)),
                          "unknown config key 'train.stepz'")


def test_train_from_config_file_then_resume_from_checkpoint(tmp_path, small_corpus, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[method]\nname = "sltrain"\n[train]\nsteps = 6\nsave_every = 3\n'
                      "eval_every = 3\n")
    code = sltrain("train", "--config", config, *tiny_flags(tmp_path, small_corpus))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "perplexity" in out.out and "sparse" in out.out
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["method"] == "sltrain"
    # continue the finished run for 4 more steps from its newest checkpoint
    code = sltrain("train", "--resume", run_dir, "--steps", "10", "--progress", "false")
    err = capsys.readouterr().err
    assert code == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert_one_line_error(capsys, sltrain("train", "--resume", str(run_dir), "--rank", "8"), "method.rank")


def test_example_config_is_the_default_run():
    from pathlib import Path

    from sltrain.config import RunConfig, load_config

    example = Path(__file__).resolve().parents[1] / "configs" / "sltrain-cpu.toml"
    cfg = load_config(example)
    default = RunConfig()
    # The file writes out rank, alpha and density, which the default leaves to be derived: the
    # same values, and every other method setting the default's.
    written = {"rank": 64, "lora_alpha": 32, "density": 0.03}
    assert cfg.method.model_dump() == {**default.method.model_dump(), **written}
    assert cfg.to_dict() == {**default.to_dict(), "method": cfg.method.model_dump()}
    assert (cfg.rank, cfg.lora_alpha, cfg.density) == (default.rank, default.lora_alpha, default.density)
    assert (default.rank, default.lora_alpha, default.density) == tuple(written.values())
    # The robustness benchmark's grid knows which of its runs is the default run.
    spec = importlib.util.spec_from_file_location("default_run", example.parents[1] / "benchmarks"
                                                  / "default_run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.DEFAULT_LR == default.optimizer.lr in bench.SLTRAIN_LRS


def _train_help(capsys, monkeypatch) -> str:
    from sltrain.cli import main

    monkeypatch.setenv("COLUMNS", "100000")  # one line per flag: no names broken by wrapping
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _flag_help(text: str, flag: str) -> str:
    """The help of `flag`: on its line, or on the next one when its spellings fill the first."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{flag} "))
    return lines[i] + (lines[i + 1] if lines[i + 1].startswith(" " * 10) else "")


def test_train_help_lists_every_registered_method_and_optimizer(capsys, monkeypatch):
    from sltrain.registry import METHODS, OPTIMIZERS

    text = _train_help(capsys, monkeypatch)
    for registry, flag in ((METHODS, "--method"), (OPTIMIZERS, "--optimizer")):
        line = _flag_help(text, flag)
        assert len(registry.entries()) > 3
        for entry in registry.entries():
            assert (f"{entry.name}: {entry.doc}" if entry.doc else entry.name) in line, entry.name
    assert "method.rank: rank r of the B @ A factors" in _flag_help(text, "--rank")


def test_an_option_a_test_registers_becomes_a_flag_and_a_validated_key(capsys, monkeypatch):
    from contextlib import contextmanager

    import torch
    from pydantic import Field

    from sltrain.cli import _overrides, build_parser, main
    from sltrain.config import load_config
    from sltrain.errors import UserError
    from sltrain.registry import OPTIMIZERS, Options

    class KnobOptions(Options):
        test_knob: float = Field(0.25, gt=0, description="a knob only this test's optimizer has")

    @contextmanager
    def registered():
        OPTIMIZERS.names()  # the built-ins first, as in a real run
        OPTIMIZERS.register("test_opt", torch.optim.SGD, options=KnobOptions, doc="throwaway")
        try:
            yield
        finally:
            OPTIMIZERS.unregister("test_opt")

    with registered():
        text = _train_help(capsys, monkeypatch)
        assert "test_opt: throwaway" in _flag_help(text, "--optimizer")
        assert ("optimizer.test_knob: a knob only this test's optimizer has (default: 0.25)"
                in _flag_help(text, "--test-knob"))
        args = build_parser().parse_args(["train", "--optimizer", "test_opt", "--test-knob", "0.5"])
        cfg = load_config(None, _overrides(args))
        assert cfg.optimizer.test_knob == 0.5 and cfg.optimizer.options() == KnobOptions(test_knob=0.5)
        assert main(["train", "--optimizer", "test_opt", "--test-knob", "-1"]) == 2
        err = capsys.readouterr().err
        assert "optimizer.test_knob" in err and "greater than 0" in err
    assert "--test-knob" not in _train_help(capsys, monkeypatch)
    with pytest.raises(UserError, match="unknown config key 'optimizer.test_knob'"):
        load_config(None, {"optimizer.test_knob": 0.5})
