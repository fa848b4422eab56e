"""The README's quick comparison: the same tokens with each parameterisation, one after another.

Runs `sltrain train --method M` for each method with otherwise identical settings (default preset
and corpus unless flags say otherwise), then prints validation loss and perplexity, parameters and
training state, and saves them with each run's own resolved config. A method whose run folder
already has a summary.json is not run again. Speed is measured by step_time.py, not here: runs one
after another on a shared machine are too noisy to compare throughput.

    python benchmarks/compare_methods.py                     # writes runs/compare/<method>/
    python benchmarks/compare_methods.py -- --steps 600      # extra flags go to `sltrain train`
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
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--results", type=Path, help="JSON of the per-method summaries "
                    "(default: benchmarks/results/<name of --out>.json)")
    ap.add_argument("train_flags", nargs=argparse.REMAINDER, help="flags for `sltrain train`")
    args = ap.parse_args()
    extra = [f for f in args.train_flags if f != "--"]

    summaries, configs = {}, {}
    for method in args.methods:
        run_dir = args.out / method
        if not (run_dir / "summary.json").is_file():
            cmd = [sys.executable, "-m", "sltrain", "train", "--method", method,
                   "--out-dir", str(run_dir), "--progress", "false", *extra]
            print("$ " + " ".join(cmd[1:]), file=sys.stderr)
            subprocess.run(cmd, check=True)
        summaries[method] = json.loads((run_dir / "summary.json").read_text())
        configs[method] = json.loads((run_dir / "config.json").read_text())

    results = args.results or Path(__file__).parent / "results" / f"{args.out.name}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    keep = ("method", "preset", "step", "tokens_seen", "val_loss", "val_ppl", "params",
            "training_state_bytes")
    # Each run's own config, not this invocation's flags: a run reused from an earlier call
    # is labelled by what it actually ran.
    results.write_text(json.dumps({"runs": [
        {**{k: s[k] for k in keep}, "config": configs[m]} for m, s in summaries.items()]}, indent=2))

    ref = summaries.get("full", next(iter(summaries.values())))
    print(f"\n{ref['preset']}, {ref['tokens_seen']:,} training tokens per run\n")
    print("| method | val loss | val perplexity | params | training state |")
    print("|---|---|---|---|---|")
    for method, s in summaries.items():
        print(f"| {method} | {s['val_loss']:.3f} | {s['val_ppl']:.1f} | "
              f"{s['params']['total'] / 1e6:.2f}M | "
              f"{s['training_state_bytes']['total'] / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
