"""The quick comparison of docs/results/compare-methods.md: the same tokens with each
parameterisation, one after another.

Runs `sltrain train --method M [--optimizer O]` for each method (and optimizer) with otherwise
identical settings (default preset
and corpus unless flags say otherwise), then prints validation loss and perplexity, parameters and
training state, and saves them with each run's own resolved config. A method whose run folder
already has a summary.json is not run again. Speed is measured by step_time.py, not here: runs one
after another on a shared machine are too noisy to compare throughput.

    python benchmarks/compare_methods.py                     # writes runs/compare/<method>/
    python benchmarks/compare_methods.py -- --steps 600      # extra flags go to `sltrain train`
    python benchmarks/compare_methods.py --methods full --optimizers adamw galore fira \
        --out runs/compare-optimizers -- --proj-rank 64       # one folder per method-optimizer
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["full", "lowrank", "sltrain"])
    ap.add_argument("--optimizers", nargs="+", help="also vary the optimizer (default: the "
                    "config's); runs are then named METHOD-OPTIMIZER")
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--results", type=Path, help="JSON of the per-method summaries "
                    "(default: benchmarks/results/<name of --out>.json)")
    ap.add_argument("train_flags", nargs=argparse.REMAINDER, help="flags for `sltrain train`")
    args = ap.parse_args()
    extra = [f for f in args.train_flags if f != "--"]

    variants = {m: ["--method", m] for m in args.methods}
    if args.optimizers:
        variants = {f"{m}-{o}": ["--method", m, "--optimizer", o]
                    for m in args.methods for o in args.optimizers}
    summaries, configs = {}, {}
    for label, flags in variants.items():
        run_dir = args.out / label
        if not (run_dir / "summary.json").is_file():
            cmd = [sys.executable, "-m", "sltrain", "train", *flags,
                   "--out-dir", str(run_dir), "--progress", "false", *extra]
            print("$ " + " ".join(cmd[1:]), file=sys.stderr)
            subprocess.run(cmd, check=True)
        summaries[label] = json.loads((run_dir / "summary.json").read_text())
        configs[label] = json.loads((run_dir / "config.json").read_text())

    results = args.results or Path(__file__).parent / "results" / f"{args.out.name}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    keep = ("method", "preset", "step", "tokens_seen", "val_loss", "val_ppl", "params",
            "training_state_bytes")
    # Each run's own config, not this invocation's flags: a run reused from an earlier call
    # is labelled by what it actually ran.
    results.write_text(json.dumps({"runs": [
        {"run": label, **{k: s[k] for k in keep}, "config": configs[label]}
        for label, s in summaries.items()]}, indent=2))

    ref = next(iter(summaries.values()))
    print(f"\n{ref['preset']}, {ref['tokens_seen']:,} training tokens per run\n")
    print("| run | val loss | val perplexity | params | training state |")
    print("|---|---|---|---|---|")
    for label, s in summaries.items():
        print(f"| {label} | {s['val_loss']:.3f} | {s['val_ppl']:.1f} | "
              f"{s['params']['total'] / 1e6:.2f}M | "
              f"{s['training_state_bytes']['total'] / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
