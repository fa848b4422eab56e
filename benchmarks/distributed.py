"""One process vs. torchrun DDP and FSDP2 on the same global batch: losses, speed, state per rank.

    python benchmarks/distributed.py --nproc 2 --steps 30 [--device cpu|cuda] [train flags...]

Runs `sltrain train` three times (one process, `--parallel ddp`, `--parallel fsdp`) with the same
flags and prints the largest loss difference from the one-process run, tokens/s relative to it,
and the training state each rank holds (FSDP shards weights, gradients and optimizer states).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, nproc: int, device: str, flags: list[str], parallel: str | None) -> dict:
    sltrain = ["-m", "sltrain", "train", "--device", device, "--progress", "false",
               "--out-dir", str(out), *flags]
    if parallel:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *sltrain, "--parallel", parallel]
    else:
        cmd = [sys.executable, *sltrain]
    threads = str(max(1, (os.cpu_count() or 1) // (nproc if parallel else 1)))
    env = {**os.environ, "OMP_NUM_THREADS": threads} if device == "cpu" else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": losses, **json.loads((out / "summary.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the table as JSON here")
    args, flags = parser.parse_known_args()
    flags = ["--steps", str(args.steps), "--eval-every", "0", *flags]
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: run(Path(tmp) / name, args.nproc, args.device, flags, parallel)
                for name, parallel in [("one process", None), ("ddp", "ddp"), ("fsdp", "fsdp")]}
    base = rows["one process"]
    table = []
    print(f"{'setup':<12} {'max |dloss|':>12} {'val loss':>9} {'tok/s vs 1':>11} "
          f"{'state/rank MB':>14} {'peak/rank MB':>13}")
    for name, r in rows.items():
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        state = r["training_state_bytes"]["total"] / 1e6
        row = {"setup": name, "max_abs_loss_diff": diff, "val_loss": r["val_loss"],
               "tok_per_s_ratio": r["tok_per_s"] / base["tok_per_s"], "state_mb_per_rank": state,
               "peak_mb_per_rank": r["peak_memory_bytes"] / 1e6, "peak_kind": r["peak_memory_kind"]}
        table.append(row)
        print(f"{name:<12} {diff:>12.2e} {r['val_loss']:>9.4f} {row['tok_per_s_ratio']:>10.2f}x "
              f"{state:>14.2f} {row['peak_mb_per_rank']:>13.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"flags": flags, "nproc": args.nproc,
                                              "device": args.device, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
