"""Peak training memory and speed with and without activation checkpointing and the chunked loss.

Runs real `sltrain train` steps, each configuration in its own process, and reports the peak the
run summary measures (`peak_memory_bytes`: CUDA max allocated, or CPU resident memory above the
process's baseline) and the training tokens/s:

    python benchmarks/activation_memory.py                      # llama-cpu 16x256, llama-60m 8x256
    python benchmarks/activation_memory.py --shapes llama-cpu:16x256 -- --device cpu --steps 3

Each shape runs {none, full} checkpointing x {plain, chunked} cross-entropy; extra flags after
`--` go to every `sltrain train`. Writes benchmarks/results/activation-memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {  # label: (activation checkpointing, loss.chunk_tokens)
    "none / plain CE": ("none", 0),
    "none / chunked CE": ("none", 1024),
    "full / plain CE": ("full", 0),
    "full / chunked CE": ("full", 1024),
}


def run_one(preset: str, batch: int, seq: int, checkpointing: str, chunk: int, steps: int,
            extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sltrain", "train", "--preset", preset,
               "--batch-size", str(batch), "--seq-len", str(seq), "--steps", str(steps),
               "--eval-every", "0", "--eval-batches", "1", "--progress", "false",
               "--activation-checkpointing", checkpointing, "--chunk-tokens", str(chunk),
               "--out-dir", tmp, *extra]
        print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s = json.loads((Path(tmp) / "summary.json").read_text())
    return {"peak_memory_bytes": s["peak_memory_bytes"], "peak_memory_kind": s["peak_memory_kind"],
            "tok_per_s": s["tok_per_s"], "state_bytes": s["training_state_bytes"]["total"]}


def table(rows: list[dict]) -> str:
    lines = ["| shape | checkpointing / loss | peak memory (MiB) | vs none / plain | tokens/s |",
             "|---|---|---:|---:|---:|"]
    base: dict[str, int] = {}
    for r in rows:
        ref = base.setdefault(r["shape"], r["peak_memory_bytes"])
        lines.append(f"| {r['shape']} | {r['variant']} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                     f"{r['peak_memory_bytes'] / ref:.0%} | {r['tok_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-cpu:16x256", "llama-60m:8x256"],
                    help="PRESET:BATCHxSEQ")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--results", type=Path,
                    default=Path(__file__).parent / "results" / "activation-memory.json")
    ap.add_argument("train_flags", nargs=argparse.REMAINDER, help="flags for `sltrain train`")
    args = ap.parse_args()
    extra = [f for f in args.train_flags if f != "--"]
    rows = []
    for shape in args.shapes:
        preset, dims = shape.split(":")
        batch, seq = (int(v) for v in dims.split("x"))
        for label, (checkpointing, chunk) in VARIANTS.items():
            rows.append({"shape": shape, "variant": label,
                         **run_one(preset, batch, seq, checkpointing, chunk, args.steps, extra)})
    print(table(rows))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"steps": args.steps, "train_flags": extra, "runs": rows},
                                       indent=2))


if __name__ == "__main__":
    main()
