"""Peak resident memory and time of building (initialising) a model, against its parameter bytes.

    python benchmarks/init_memory.py [--configs llama-1b:sltrain:float32 ...] [--src DIR] [--out F]

Each configuration `preset:method:dtype` is built in a fresh subprocess on the CPU with
`build_model(cfg, dtype=...)`; the child reports its peak RSS during the build above its RSS just
before it (ru_maxrss, exact, and PeakMemory's sampled /proc/self/statm), the build time, and the
bytes the built model holds: parameters x element size plus buffers (the int32 sparse support,
the rotary tables), which lean initialisation should approach. A tiny model is built first, so
that paging in the kernels' code is not counted. `--src` points the children at
another checkout's `src` (e.g. main's, to measure the old dense-then-swap build; it has no dtype
argument, so float32 only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = ["llama-1b:full:float32", "llama-1b:sltrain:float32", "llama-1b:sltrain:bfloat16",
           "llama-7b:sltrain:bfloat16", "llama-7b:sltrain:float32"]

TINY = {"model.dim": 64, "model.n_layers": 1, "model.n_heads": 4, "model.ffn_dim": 128,
        "model.vocab_size": 512, "method.rank": 16}


def measure_one(preset: str, method: str, dtype_name: str) -> dict:
    """Build the model in this process and report what the build cost."""
    import torch

    from sltrain.config import load_config
    from sltrain.measure.memory import PeakMemory, rss_bytes
    from sltrain.model import build_model

    dtype = getattr(torch, dtype_name)
    cfg = load_config(None, {"model.preset": preset, "method.name": method})
    kw = {} if dtype == torch.float32 else {"dtype": dtype}
    # A tiny build first pages in the kernels' code, so that the peak counts tensors only.
    build_model(load_config(None, {**TINY, "method.name": method}), **kw)
    before = rss_bytes()
    peak = PeakMemory(torch.device("cpu")).start()
    t0 = time.perf_counter()
    model = build_model(cfg, **kw)
    seconds = time.perf_counter() - t0
    sampled, _ = peak.result()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = list(model.parameters())
    return {
        "config": f"{preset}:{method}:{dtype_name}", "seconds": round(seconds, 1),
        "params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "peak_rss_above_start": max_rss - before, "sampled_peak_above_start": sampled,
    }


def run_child(config: str, src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, "--one", config], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    gb = 1e9
    lines = ["| preset:method:dtype | parameters | parameter + buffer bytes | peak RSS during init "
             "(above start) | peak / bytes | time |", "|---|---|---|---|---|---|"]
    for r in rows:
        held = r["param_bytes"] + r["buffer_bytes"]
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {held / gb:.2f} GB "
                     f"({r['param_bytes'] / gb:.2f} + {r['buffer_bytes'] / gb:.3f}) | "
                     f"{r['peak_rss_above_start'] / gb:.2f} GB | "
                     f"{r['peak_rss_above_start'] / held:.2f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT, help="preset:method:dtype ...")
    parser.add_argument("--src", help="a checkout's src folder for the children (default: ours)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: measure one, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one.split(":"))))
        return
    rows = []
    for config in args.configs:
        rows.append(run_child(config, args.src))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
