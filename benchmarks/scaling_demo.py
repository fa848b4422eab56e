"""The scaling-law demonstration of docs/results/scaling.md: dense and gradually pruned runs at
two model sizes and three token budgets, fitted with L(N, D) = E + A/N^alpha + B/D^beta.

Each run is `sltrain train` on the embedded corpus; the pruned runs prune the targeted linears by
magnitude to `--sparsity` between 25% and 75% of the run (cubic ramp), so their average parameter
count over training lies between the dense and the final count ("The Journey Matters"). The law is
then fitted twice with `sltrain scaling fit`: with N the average parameter count (the paper's
proposal) and with N the final count, and the fit with the average is plotted. Runs whose folder
already has a summary.json are not run again.

    python benchmarks/scaling_demo.py --jobs 2                # runs/scaling-demo/, ~45 min on 2 cores
    python benchmarks/scaling_demo.py --steps 200 400 800     # other budgets
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Two widths of a 4-layer LLaMA with a 2048-token BPE: about 1.3M and 4.2M parameters.
SIZES = {
    "d128": ["--dim", "128", "--ffn-dim", "352", "--n-layers", "4", "--n-heads", "4"],
    "d256": ["--dim", "256", "--ffn-dim", "688", "--n-layers", "4", "--n-heads", "4"],
}
COMMON = ["--method", "full", "--vocab-size", "2048", "--seq-len", "128", "--batch-size", "16",
          "--eval-every", "0", "--eval-batches", "32", "--progress", "false"]


def sltrain(*args: str) -> None:
    cmd = [sys.executable, "-m", "sltrain", *args]
    print("$ sltrain " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs=3, default=[100, 200, 400],
                    help="the three token budgets, in update steps of 16 x 128 tokens")
    ap.add_argument("--lr", default="1e-3", help="peak learning rate of every run (at 3e-3 the "
                    "4.2M model falls behind the 1.3M one after 200 steps)")
    ap.add_argument("--sparsity", type=float, default=0.75, help="final sparsity of the pruned runs")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one thread "
                    "when more than one)")
    ap.add_argument("--out", type=Path, default=Path("runs/scaling-demo"))
    ap.add_argument("--plot", type=Path, default=Path("docs/scaling/fit.png"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/scaling_demo.json"))
    args = ap.parse_args()

    runs: list[Path] = []
    todo: list[list[str]] = []
    for size, dims in SIZES.items():
        for steps in args.steps:
            for variant, flags in (("dense", []),
                                   ("pruned", ["--target-sparsity", str(args.sparsity)])):
                run = args.out / f"{size}-{steps}-{variant}"
                if not (run / "summary.json").is_file():
                    todo.append(["train", *dims, *COMMON, "--lr", args.lr, *flags, "--steps", str(steps),
                                 "--out-dir", str(run)])
                runs.append(run)
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    todo.sort(key=lambda cmd: -int(cmd[cmd.index("--dim") + 1]) * int(cmd[cmd.index("--steps") + 1]))
    with ThreadPoolExecutor(args.jobs) as pool:  # the longest runs first
        list(pool.map(lambda cmd: sltrain(*cmd), todo))

    args.plot.parent.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    fits = {}
    for params in ("avg", "final"):
        out = args.results.with_name(f"{args.results.stem}_{params}.json")
        plot = ["--plot", str(args.plot)] if params == "avg" else []
        sltrain("scaling", "fit", *map(str, runs), "--params", params, "--json", str(out), *plot)
        fits[params] = json.loads(out.read_text())
        out.unlink()
    table = []
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        table.append({"run": run.name, "params_avg": s["params_avg"],
                      "params_final": s["params_final"], "tokens": s["tokens_seen"],
                      "val_loss": s["val_loss"], "val_ppl": s["val_ppl"]})
    args.results.write_text(json.dumps({"runs": table, "fit": fits}, indent=2))
    print(f"{'run':<20}{'N avg':>12}{'N final':>12}{'tokens':>12}{'val loss':>10}")
    for r in table:
        print(f"{r['run']:<20}{r['params_avg']:>12,.0f}{r['params_final']:>12,}"
              f"{r['tokens']:>12,}{r['val_loss']:>10.4f}")
    print(f"results in {args.results}, plot in {args.plot}")


if __name__ == "__main__":
    main()
