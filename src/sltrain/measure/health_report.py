"""The report of `sltrain health`: a run's checkpoint measured on its own validation blocks.

Kurtosis, weight spectra and the output nuclear norm of sltrain/measure/health.py (the SLTrain
paper's low-rank-plus-sparse spectrum figure among them), written as health.json and a plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sltrain.data import Blocks, prepare, prepare_options
from sltrain.errors import UserError
from sltrain.files import writable_dir
from sltrain.measure.health import health_record, plot_spectra, weight_spectra
from sltrain.run.folder import load_run_model


def health_report(run: Path, out: Path | None = None, blocks: int = 16,
                  layers: list[str] | None = None) -> dict[str, Any]:
    """`sltrain health`: measure the newest checkpoint of `run` (or the checkpoint `run`) on
    `blocks` validation blocks, write OUT/health.json and OUT/spectrum.png (OUT defaults to
    RUN/health) and return the report, with `json` and `png` naming the files written."""
    if out:  # refused before the slow part, and nothing made yet
        writable_dir(out, "--out", create=False)
    model, cfg, ckpt = load_run_model(run)
    run_dir = ckpt.parent.parent
    data = prepare(cfg.data, cfg.model_dims()["vocab_size"], run_dir, **prepare_options(cfg))
    val = Blocks(data.val, cfg.data.seq_len)
    n = min(len(val), blocks)
    if n == 0:
        raise UserError(f"the run's validation split holds no block of {cfg.data.seq_len + 1} tokens")
    x, _ = val.batch(range(n))
    spectra = weight_spectra(model)
    last = cfg.model_dims()["n_layers"] - 1
    layers = layers or [f"layers.{i}.{p}" for i in (0, last)
                        for p in ("self_attn.q_proj", "mlp.down_proj")]
    unknown = [name for name in layers if name not in spectra]
    if unknown:
        raise UserError(f"no learned weight named {unknown[0]}; pass e.g. --layers "
                        f"{next(iter(spectra))}")
    out = writable_dir(out or run_dir / "health", "--out")
    report = {"checkpoint": str(ckpt), "blocks": n, **health_record(model, x),
              "weights": {k: {**{f: v for f, v in s.items() if f.endswith("share")},
                              "top_singular_values": s["weight"][:8]}
                          for k, s in spectra.items()}}
    (out / "health.json").write_text(json.dumps(report, indent=2))
    png = plot_spectra(spectra, out / "spectrum.png", layers,
                       f"{cfg.model.preset} {cfg.method.name}, {ckpt.name}")
    return {**report, "json": str(out / "health.json"), "png": str(png)}
