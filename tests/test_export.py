"""Export to transformers and eval: the export computes what the run computes, and says so."""

import json

import pytest
import torch
from conftest import assert_one_line_error, sltrain

from sltrain.config import load_config
from sltrain.run.folder import load_run_model, run_tokenizer
from sltrain.train import train

transformers = pytest.importorskip("transformers")



@pytest.mark.parametrize("method,extra", [("sltrain", {}), ("full", {"model.rope_theta": 500.0})])
def test_export_and_eval_agree_with_the_run(tiny, tmp_path, capsys, method, extra):
    cfg = load_config(None, {**tiny, "method.name": method, "train.steps": 5, **extra})
    summary = train(cfg)
    run, out = tmp_path / "run", tmp_path / "export"
    assert sltrain("export", run, "--to", "hf", out) == 0

    # the merged dense LLaMA in transformers gives the logits of our (unmerged) model
    ours, _, _ = load_run_model(run)
    hf, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.max_position_embeddings == cfg.data.seq_len
    ids = torch.randint(0, cfg.model_dims()["vocab_size"], (2, cfg.data.seq_len))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4

    tok, eos = run_tokenizer(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = f"Shall I compare thee to a summer's day?{eos}  Thou art more lovely"
    assert hf_tok(text).input_ids == tok.encode(text).ids
    assert hf_tok.eos_token == eos and hf.config.eos_token_id == tok.token_to_id(eos)

    # perplexity of the run, and of the export on the same blocks, is the run's own val_ppl
    capsys.readouterr()
    same_blocks = ["--max-batches", cfg.train.eval_batches, "--json"]
    assert sltrain("eval", run, *same_blocks) == 0
    of_run = json.loads(capsys.readouterr().out)
    assert of_run["ppl"] == pytest.approx(summary["val_ppl"], rel=1e-4)
    assert of_run["tokens"] == summary["val_tokens"]
    assert sltrain("eval", out, "--data", cfg.data.source, "--batch-size", cfg.train.batch_size,
                   *same_blocks) == 0
    of_export = json.loads(capsys.readouterr().out)
    assert of_export["ppl"] == pytest.approx(summary["val_ppl"], rel=1e-4)
    assert of_export["tokens"] == summary["val_tokens"]


def test_export_bfloat16_and_force(tiny, tmp_path, capsys):
    train(load_config(None, {**tiny, "train.steps": 2}))
    run, out = tmp_path / "run", tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(capsys, sltrain("export", run, out), "not empty", "--force")
    assert sltrain("export", run, out, "--dtype", "bfloat16", "--force") == 0
    assert (out / "notes.txt").read_text() == "mine"  # --force overwrites only what it writes
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    capsys.readouterr()
    assert sltrain("eval", out, "--split", "all", "--data", tiny["data.source"], "--batch-size", 4,
                   "--max-batches", 2, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["blocks"] == 8 and result["tokens"] == 8 * tiny["data.seq_len"]


def test_bad_input_gives_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(capsys, sltrain("export", empty, tmp_path / "out"), "no checkpoint")
    assert_one_line_error(capsys, sltrain("eval", empty), "no checkpoint")
    damaged = tmp_path / "run" / "checkpoints" / "step_0000001"
    damaged.mkdir(parents=True)
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    assert_one_line_error(capsys, sltrain("export", damaged, tmp_path / "out"), "damaged")
    assert not (tmp_path / "out").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    assert_one_line_error(capsys, sltrain("export", damaged, taken), "not empty", "--force")
    assert_one_line_error(capsys, sltrain("export", damaged, tmp_path / "run", "--force"),
                          "holds a run")
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "config.json").write_text('{"model_type": "llama"}')
    assert_one_line_error(capsys, sltrain("eval", exported), "records no data", "--data")
    assert_one_line_error(capsys, sltrain("eval", empty, "--split", "test"), "--split")
    assert_one_line_error(capsys, sltrain("eval", empty, "--max-batches", 0), "--max-batches")
