"""Is the default run robust? `sltrain train` at several seeds and thread counts, and SLTrain
against `--method full` each at its best learning rate of a grid, on the same budget.

    python benchmarks/default_run.py                       # the default run: 3 seeds x threads 1, 2
    python benchmarks/default_run.py --lr-grid             # + lr grids for sltrain and full, seed 0
    python benchmarks/default_run.py --extra "--b-init zero" --label paper-init

Every run is a plain `sltrain train` (the README's main job) plus the flags shown, in its own
process with OMP_NUM_THREADS set; a run folder that already holds a summary is read, not redone.
Writes benchmarks/results/default-run[-LABEL].json; docs/results/default-run.md reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sltrain.config import OptimizerConfig

ROOT = Path(__file__).resolve().parent.parent
# Log-spaced x2 around each method's best: sltrain around the default 1.5e-3 (the paper's 3e-3
# is the top of the grid), full around 2e-3 (the GaLore paper's 1e-3 is the bottom).
SLTRAIN_LRS = [7.5e-4, 1.5e-3, 3e-3]
FULL_LRS = [1e-3, 2e-3, 4e-3]
# `sltrain train`'s rate: the grid's run at it is the default run itself (tests/test_cli.py
# checks that the grid holds it).
DEFAULT_LR = OptimizerConfig.model_fields["lr"].default


def run(folder: Path, flags: list[str], threads: int) -> dict:
    """One `sltrain train` run (or the summary of one already finished in `folder`)."""
    summary = folder / "summary.json"
    if not summary.exists():
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "sltrain", "train", "--progress", "false",
               "--out-dir", str(folder), *flags]
        print(f"$ OMP_NUM_THREADS={threads} sltrain train {shlex.join(cmd[4:])}", flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    s = json.loads(summary.read_text())
    return {"flags": flags, "threads": threads, "val_ppl": s["val_ppl"], "val_loss": s["val_loss"],
            "tok_per_s": s.get("tok_per_s"), "wall_s": s.get("wall_time_s")}


def spread(ppls: list[float]) -> dict:
    mean = statistics.fmean(ppls)
    return {"mean": mean, "min": min(ppls), "max": max(ppls),
            "max_dev_pct": 100 * max(abs(p - mean) for p in ppls) / mean}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--lr-grid", action="store_true", help="also the lr grids (seed 0, one thread)")
    p.add_argument("--extra", default="", help="flags added to every run, e.g. '--b-init zero'")
    p.add_argument("--label", default="", help="suffix of the results file and run folders")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "default-run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (results do not depend on it; wall times do)")
    a = p.parse_args()
    extra, tag = shlex.split(a.extra), f"-{a.label}" if a.label else ""
    runs = a.runs / (a.label or "default")
    result: dict = {"extra": a.extra, "robustness": [], "lr_grid": {}}
    jobs = {(seed, t): (runs / f"seed{seed}-t{t}", [*extra, "--seed", str(seed)], t)
            for seed in a.seeds for t in a.threads}
    grids = {"sltrain": SLTRAIN_LRS, "full": FULL_LRS} if a.lr_grid else {}
    for method, lrs in grids.items():
        for lr in lrs:  # seed 0, one thread; sltrain at the default rate is the default run
            same = method == "sltrain" and lr == DEFAULT_LR and not extra and (0, 1) in jobs
            jobs[(method, lr)] = jobs[(0, 1)] if same else (
                runs / f"{method}-lr{lr:g}", [*extra, "--method", method, "--lr", str(lr)], 1)
    with ThreadPoolExecutor(a.jobs) as pool:
        done = dict(zip(jobs, pool.map(lambda j: run(*j), jobs.values()), strict=True))
    for seed in a.seeds:
        for t in a.threads:
            r = done[(seed, t)]
            result["robustness"].append({"seed": seed, **r})
            print(f"seed {seed} threads {t}: val ppl {r['val_ppl']:.2f}", flush=True)
    result["spread"] = spread([r["val_ppl"] for r in result["robustness"]])
    for method, lrs in grids.items():
        result["lr_grid"][method] = {f"{lr:g}": done[(method, lr)]["val_ppl"] for lr in lrs}
        print(f"{method}: " + ", ".join(f"lr {k} -> {v:.2f}" for k, v in
                                        result["lr_grid"][method].items()), flush=True)
    if grids:
        best = {m: min(g.values()) for m, g in result["lr_grid"].items()}
        result["best_ratio_sltrain_over_full"] = best["sltrain"] / best["full"]
    out = ROOT / "benchmarks" / "results" / f"default-run{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    sp = result["spread"]
    print(f"spread over {len(result['robustness'])} runs: mean {sp['mean']:.2f}, "
          f"{sp['min']:.2f}..{sp['max']:.2f}, max deviation {sp['max_dev_pct']:.1f}% -> {out}")


if __name__ == "__main__":
    main()
