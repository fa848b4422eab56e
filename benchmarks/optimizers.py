"""Step time and optimizer-state bytes of every optimizer relative to AdamW, in one run.

Same harness as step_time.py (one process per variant, random tokens, alternating rounds,
fastest round kept): a full update step of one preset and method with each optimizer, plus
per-layer variants. Per-layer variants cannot clip by the global norm; the others clip at 1.0.

    python benchmarks/optimizers.py                      # llama-cpu, dense weights
    python benchmarks/optimizers.py --method sltrain --out benchmarks/results/optimizers_sltrain.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from step_time import HERE, common_args, measure, worker

from sltrain.registry import OPTIMIZERS

PER_LAYER = ["adamw", "adam8bit", "galore8bit"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--for-method", dest="for_method", default="full",
                    help="parameterisation to train (full, lowrank, sltrain)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "optimizers.json")
    args = ap.parse_args()
    if args.method:
        print(json.dumps(worker(args)))
        return

    variants = {name: ["--method", args.for_method, "--optimizer", name] for name in OPTIMIZERS}
    variants.update({f"{name} per-layer": ["--method", args.for_method, "--optimizer", name,
                                           "--per-layer", "1"] for name in PER_LAYER})
    best = measure(variants, args)
    ref = best["adamw"]
    rows = [{"variant": label, **b,
             "time_vs_adamw": b["median_step_s"] / ref["median_step_s"],
             "optimizer_state_vs_adamw": b["optimizer_state_bytes"] / ref["optimizer_state_bytes"],
             "training_state_vs_adamw": b["state_bytes"] / ref["state_bytes"],
             "peak_vs_adamw": b["peak_bytes"] / ref["peak_bytes"]} for label, b in best.items()]
    setup = {k: getattr(args, k) for k in ("preset", "for_method", "batch_size", "seq_len", "steps",
                                          "rounds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "device": ref["peak_kind"], "rows": rows},
                                   indent=2))

    print(f"preset {args.preset}, method {args.for_method}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, best of {args.rounds} rounds (median of {args.steps} steps)\n")
    print("| optimizer | step time vs AdamW | optimizer state vs AdamW | training state vs AdamW "
          "| peak memory vs AdamW |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['time_vs_adamw']:.2f}x | {r['optimizer_state_vs_adamw']:.2f}x "
              f"| {r['training_state_vs_adamw']:.2f}x | {r['peak_vs_adamw']:.2f}x |")


if __name__ == "__main__":
    main()
