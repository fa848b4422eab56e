"""Predicted against measured peak training memory: `sltrain memory`'s prediction beside real runs.

Each configuration runs a few real `sltrain train` steps in its own process and reads the run
summary's `peak_memory_bytes` (CUDA max allocated, or CPU resident memory above the process's
baseline); the prediction is `sltrain.measure.peak.predict_peak` of the same config, from shapes:

    python benchmarks/peak_prediction.py                  # every configuration, CPU
    python benchmarks/peak_prediction.py --only cpu-full -- --device cpu

On CPU every configuration runs twice: with glibc's default allocator settings, and with
MALLOC_MMAP_THRESHOLD_ fixed at glibc's initial 128 KiB (`--mmap-threshold`). By default glibc
raises that threshold to the size of the largest block freed so far (up to 32 MiB), after which
smaller tensors live on the heap, whose freed memory is mostly kept; fixed, every tensor above it
is its own mapping, returned when freed, and the resident size follows the live tensors. Writes
benchmarks/results/peak-prediction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sltrain.config import flag_for, load_config
from sltrain.device import resolve_device, resolve_precision
from sltrain.measure.peak import predict_peak

RUN = {"train.steps": 3, "train.eval_every": 0, "train.eval_batches": 1, "train.progress": False}
# label: config overrides. A spread of what dominates the peak: activations and the loss's
# chunks (cpu-full), the logits of the plain loss (cpu-plain-ce), the state and the retained
# graph of exact per-layer clipping (60m-8bit-per-layer), bf16 activations with SLTrain's dense
# backward matrices (60m-mixed).
CONFIGS: dict[str, dict[str, Any]] = {
    "cpu-full": {"model.preset": "llama-cpu", "method.name": "full", "train.precision": "fp32",
                 "train.batch_size": 8, "data.seq_len": 256},
    "cpu-plain-ce": {"model.preset": "llama-cpu", "method.name": "sltrain",
                     "train.precision": "fp32", "train.batch_size": 8, "data.seq_len": 256,
                     "loss.chunk_tokens": 0},
    "60m-8bit-per-layer": {"model.preset": "llama-60m", "method.name": "sltrain",
                           "train.precision": "bf16", "optimizer.name": "adam8bit",
                           "optimizer.per_layer_updates": True, "train.batch_size": 2,
                           "data.seq_len": 256, "train.activation_checkpointing": "full"},
    "60m-mixed": {"model.preset": "llama-60m", "method.name": "sltrain",
                  "train.precision": "bf16-mixed", "train.batch_size": 4, "data.seq_len": 256},
}


def flags(overrides: dict[str, Any]) -> list[str]:
    """`sltrain train` flags for dotted config overrides."""
    return [item for k, v in overrides.items()
            for item in (flag_for(k), str(v).lower() if isinstance(v, bool) else str(v))]


def predicted(overrides: dict[str, Any], device: str) -> dict[str, Any]:
    cfg = load_config(None, overrides)
    precision = resolve_precision(cfg.train.precision, resolve_device(device))
    return predict_peak(cfg, precision).to_dict()


def measured(overrides: dict[str, Any], extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One `sltrain train` run in its own process; its summary's peak."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sltrain", "train", *flags(overrides), "--out-dir", tmp, *extra]
        print("$ " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd[1:]),
              file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **env})
        s = json.loads((Path(tmp) / "summary.json").read_text())
    return {"peak_memory_bytes": s["peak_memory_bytes"], "peak_memory_kind": s["peak_memory_kind"],
            "tok_per_s": s["tok_per_s"], "state_bytes": s["training_state_bytes"]["total"]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | predicted (MiB) | peak at | measured (MiB) | ratio | measured, fixed mmap "
             "threshold (MiB) | ratio |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        pred = r["predicted"]["total"]
        cells = [f"{r['config']}", f"{pred / 2**20:.0f}", r["predicted"]["moment"]]
        for key in ("measured", "measured_fixed_mmap"):
            m = r.get(key)
            cells += [f"{m['peak_memory_bytes'] / 2**20:.0f}", f"{pred / m['peak_memory_bytes']:.2f}"] \
                if m else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations only")
    ap.add_argument("--steps", type=int, default=RUN["train.steps"])
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ of the second run of each config (0: no second run)")
    ap.add_argument("--results", type=Path,
                    default=Path(__file__).parent / "results" / "peak-prediction.json")
    ap.add_argument("train_flags", nargs=argparse.REMAINDER, help="flags for `sltrain train`")
    args = ap.parse_args()
    extra = [f for f in args.train_flags if f != "--"]
    device = extra[extra.index("--device") + 1] if "--device" in extra else "auto"
    rows = []
    for label in args.only or CONFIGS:
        overrides = {**RUN, "train.steps": args.steps, **CONFIGS[label]}
        row = {"config": label, "overrides": CONFIGS[label], "predicted": predicted(overrides, device),
               "measured": measured(overrides, extra, {})}
        if args.mmap_threshold and row["measured"]["peak_memory_kind"].startswith("cpu"):
            env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
            row["measured_fixed_mmap"] = measured(overrides, extra, env)
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"steps": args.steps, "train_flags": extra,
                                        "mmap_threshold": args.mmap_threshold, "runs": rows},
                                       indent=2))


if __name__ == "__main__":
    main()
