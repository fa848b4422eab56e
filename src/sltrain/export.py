"""Export a run to a Hugging Face `LlamaForCausalLM` folder, and load such a folder back.

A trained model leaves the package as a plain dense LLaMA: every re-parameterised layer is folded
back into one weight (`parametrize.merge`), so `transformers`, lm-eval and friends load it as is.

Usage (README-ready):

    sltrain export runs/my-run --to hf exports/my-run        # newest checkpoint of the run
    sltrain eval runs/my-run                                   # perplexity on the run's val split
    sltrain eval exports/my-run --data embedded                # the same, through transformers

    pip install "lm-eval[hf]"
    lm_eval --model hf --model_args pretrained=exports/my-run,dtype=float32 \
        --tasks lambada_openai,hellaswag --batch_size 16 --output_path results/

The export is a folder with config.json, model.safetensors and the run's tokenizer
(tokenizer.json, tokenizer_config.json). lm-eval reads each task's dataset from the Hugging Face
hub (or a local HF_DATASETS_CACHE), so the tasks need that access even though the model is local.
The model only knows `seq_len` positions (max_position_embeddings): tasks with longer contexts are
truncated by lm-eval. No BOS token is added: documents were separated by the end-of-text token
during training, so that token also serves as BOS and PAD.

RoPE: our attention rotates halves (`x * cos + rotate_half(x) * sin`, the angle table repeated over
both halves), which is Hugging Face LLaMA's default rope, so q_proj and k_proj are copied without
the permutation that Meta's interleaved-pair checkpoints need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from sltrain.data.tokenizer import META_FILE
from sltrain.errors import UserError
from sltrain.files import writable_dir
from sltrain.parametrize import merge
from sltrain.run.checkpoint import STATE_FILE, find_checkpoint
from sltrain.run.folder import load_run_model, run_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError("this needs transformers; pip install 'sltrain[export]'") from None
    return transformers


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face's: the decoder sits under `model.`, lm_head beside it."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def export_hf(path: Path, out: Path, dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """Write the merged dense model of `path` (run or checkpoint folder) to `out` for transformers."""
    transformers = _transformers()
    ckpt = find_checkpoint(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a folder to export into")
    if (out / "checkpoints").exists() or (out / STATE_FILE).exists():
        raise UserError(f"{out} holds a run or checkpoint; export into another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite its files or choose another")
    writable_dir(out, "OUT", create=False)
    model, cfg, ckpt = load_run_model(ckpt)
    if cfg.model.norm != "pre_rmsnorm" or cfg.model.embed_proj:
        raise UserError(f"the run uses --norm {cfg.model.norm}"
                        + (" with --embed-proj" if cfg.model.embed_proj else "")
                        + "; transformers' LlamaForCausalLM is Pre-RMSNorm only (convert a pre_ln "
                        "run with `sltrain convert --to pre_rmsnorm` first)")
    tok, eos = run_tokenizer(ckpt.parent.parent)
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise UserError(f"the run's tokenizer has no {eos} token; it is not the run's own")

    merge(model)
    tensors = {hf_name(k): v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    dims = cfg.model_dims()
    config = transformers.LlamaConfig(
        vocab_size=dims["vocab_size"], hidden_size=dims["dim"], intermediate_size=dims["ffn_dim"],
        num_hidden_layers=dims["n_layers"], num_attention_heads=dims["n_heads"],
        num_key_value_heads=dims["n_heads"], head_dim=dims["dim"] // dims["n_heads"],
        max_position_embeddings=dims["max_seq_len"], rms_norm_eps=dims["norm_eps"],
        rope_theta=dims["rope_theta"], hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        dtype=dtype, architectures=["LlamaForCausalLM"],
    )
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos,
        model_max_length=dims["max_seq_len"])

    writable_dir(out, "OUT")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    hf_tok.save_pretrained(out)
    # Our own record of the EOS, so that `sltrain eval` of the export splits documents the same.
    (out / META_FILE).write_text(json.dumps({"eos_token": eos}))
    # transformers 4.x (still common under lm-eval) reads `rope_theta` and knows the tokenizer as
    # PreTrainedTokenizerFast; 5.x reads both spellings too.
    _update_json(out / "config.json", rope_theta=dims["rope_theta"])
    _update_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    return {"checkpoint": str(ckpt), "out": str(out), "method": cfg.method.name, "dtype": dtype,
            "params": sum(t.numel() for t in tensors.values()), "source": cfg.data.source}


def _update_json(path: Path, **items: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **items}, indent=2) + "\n")


def is_hf_export(path: Path) -> bool:
    """A folder transformers loads (its config.json names a model_type); run folders have none."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


class _Logits(nn.Module):
    """A transformers causal LM seen as ours are: token ids in, logits out."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=idx, use_cache=False).logits


def load_hf_model(path: Path) -> tuple[nn.Module, Any]:
    """An exported folder as a float32 model returning logits, and its transformers config."""
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path} cannot be loaded by transformers ({first})") from None
    return _Logits(hf_model).eval(), hf_model.config
