"""The SLTrain paper's memory table, measured: real `sltrain train` steps in bf16 per configuration.

SLTrain (Han et al., NeurIPS 2024) reports the memory of pretraining LLaMA 350M / 1B / 7B with
AdamW, 8-bit Adam per-layer, 8-bit GaLore per-layer and 8-bit SLTrain per-layer on one A100:

    python benchmarks/memory.py                                   # llama-350m and llama-1b, all four
    python benchmarks/memory.py --sizes llama-7b:1x64 --configs sltrain-8bit-per-layer --steps 1
    python benchmarks/memory.py --estimate-only --sizes llama-350m llama-1b llama-7b

Each configuration runs in its own process (`--precision bf16`, `--device` auto: on a GPU the
run summary's peak is torch.cuda.max_memory_allocated, on the CPU the resident memory above the
process's size before the model is built) beside `sltrain memory`'s training-state estimate and
the published figure. A configuration whose estimate exceeds `--ram` is skipped with the reason.
Rows are merged into benchmarks/results/paper-memory.json (keyed by size, shape, steps,
configuration and checkpointing), so that sizes can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name: (label, flags for `sltrain train` and `sltrain memory`)
    "adamw": ("AdamW", ["--method", "full", "--optimizer", "adamw"]),
    "adam8bit-per-layer": ("8-bit Adam per-layer", ["--method", "full", "--optimizer", "adam8bit",
                                                    "--per-layer-updates", "true"]),
    "galore8bit-per-layer": ("8-bit GaLore per-layer", ["--method", "full", "--optimizer",
                                                        "galore8bit", "--per-layer-updates", "true"]),
    "sltrain-8bit-per-layer": ("8-bit SLTrain per-layer", ["--method", "sltrain", "--optimizer",
                                                           "adam8bit", "--per-layer-updates", "true"]),
}
PUBLISHED_GB = {  # the paper's figure, GB, per size and configuration (one A100)
    "llama-350m": {"adamw": 4.5, "adam8bit-per-layer": 3.5, "galore8bit-per-layer": 3.1,
                   "sltrain-8bit-per-layer": 2.2},
    "llama-1b": {"adamw": 16.3, "adam8bit-per-layer": 11.8, "galore8bit-per-layer": 10.3,
                 "sltrain-8bit-per-layer": 6.8},
    "llama-7b": {"adamw": 67.4, "adam8bit-per-layer": 29.4, "galore8bit-per-layer": 22.0,
                 "sltrain-8bit-per-layer": 18.3},
}
RESULTS = Path(__file__).parent / "results" / "paper-memory.json"


def sltrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "sltrain", *args]


def estimate(preset: str, config: str) -> int:
    """`sltrain memory`'s training-state bytes (weights, gradients, states, indices) in bf16."""
    out = subprocess.run(sltrain("memory", "--model", preset, *CONFIGS[config][1], "--precision",
                                 "bf16", "--json"), check=True, capture_output=True, text=True)
    b = json.loads(out.stdout)["bytes"]
    return b["total"]


def train(preset: str, config: str, batch: int, seq: int, steps: int, checkpointing: str,
          extra: list[str], mmap_threshold: int) -> dict:
    """One real run: the summary's peak and state, and the process's own peak RSS (wait4).
    `mmap_threshold` > 0 fixes glibc's (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave
    the process and its resident size follows the live tensors (docs/results/peak-prediction.md)."""
    env = dict(os.environ)
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = sltrain("train", "--model", preset, *CONFIGS[config][1], "--precision", "bf16",
                      "--batch-size", str(batch), "--seq-len", str(seq), "--steps", str(steps),
                      "--eval-every", "0", "--eval-batches", "1", "--progress", "false",
                      "--activation-checkpointing", checkpointing, "--out-dir", tmp, *extra)
        print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[2:])} failed with exit status {proc.returncode}")
        s = json.loads((Path(tmp) / "summary.json").read_text())
    return {"peak_bytes": s["peak_memory_bytes"], "peak_kind": s["peak_memory_kind"],
            "state_bytes": s["training_state_bytes"]["total"],
            "process_max_rss_bytes": usage.ru_maxrss * 1024, "device": s["device"],
            "train_time_s": round(s["train_time_s"], 1),
            "wall_time_s": round(time.perf_counter() - t0, 1)}


def ram_bytes() -> int:
    """Total memory of this machine (Linux), 0 when unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def table(rows: list[dict]) -> str:
    gb = 1e9
    lines = ["| size | configuration | micro-batch | steps | checkpointing | training state (estimate) "
             "| measured peak | peak / state | published |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        measured = (f"{r['peak_bytes'] / gb:.2f} GB | {r['peak_bytes'] / r['estimate_bytes']:.2f}"
                    if "peak_bytes" in r else f"{r['status']} | ")
        lines.append(f"| {r['size']} | {CONFIGS[r['config']][0]} | {r['batch']} x {r['seq']} | "
                     f"{r['steps']} | {r['checkpointing']} | {r['estimate_bytes'] / gb:.2f} GB | "
                     f"{measured} | {r['published_gb']} GB |")
    return "\n".join(lines)


def merge(path: Path, rows: list[dict], meta: dict) -> list[dict]:
    """The rows already in `path`, with those of this invocation replacing their matches."""
    def key(r: dict) -> tuple:
        return r["size"], r["batch"], r["seq"], r["steps"], r["config"], r["checkpointing"]

    old = json.loads(path.read_text())["runs"] if path.exists() else []
    new = {key(r): r for r in rows}
    merged = [new.pop(key(r), r) for r in old] + list(new.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "runs": merged}, indent=2) + "\n")
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["llama-350m", "llama-1b"],
                    help="PRESET or PRESET:BATCHxSEQ (default micro-batch 1 x 256)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--checkpointing", default="none", help="--activation-checkpointing")
    ap.add_argument("--ram", type=float, default=ram_bytes() / 2**30,
                    help="GiB; skip a configuration whose training state exceeds it")
    ap.add_argument("--estimate-only", action="store_true", help="no training runs")
    ap.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                    help="MALLOC_MMAP_THRESHOLD_ of the runs, bytes (0: glibc's dynamic default)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- flags for `sltrain train`")
    args = ap.parse_args()
    extra = [f for f in args.train_flags if f != "--"]
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    rows = []
    for size in args.sizes:
        preset, _, dims = size.partition(":")
        batch, seq = (int(v) for v in (dims or "1x256").split("x"))
        for config in args.configs:
            state = estimate(preset, config)
            row = {"size": preset, "config": config, "batch": batch, "seq": seq,
                   "steps": args.steps, "checkpointing": args.checkpointing,
                   "estimate_bytes": state,
                   "published_gb": PUBLISHED_GB[preset][config], "command": command,
                   "mmap_threshold": args.mmap_threshold}
            if args.estimate_only:
                row["status"] = "not run"
            elif state > args.ram * 2**30:
                row["status"] = (f"skipped: its training state ({state / 1e9:.1f} GB) exceeds "
                                 f"this machine's {args.ram:.0f} GiB")
            else:
                row.update(status="measured", train_flags=extra,
                       **train(preset, config, batch, seq, args.steps, args.checkpointing, extra,
                                    args.mmap_threshold))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    meta = {"precision": "bf16", "ram_bytes": ram_bytes()}
    merged = merge(args.results, rows, meta) if not args.estimate_only else rows
    print(table(merged))


if __name__ == "__main__":
    main()
