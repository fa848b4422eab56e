"""CoLA's forward+backward step time against dense on CPU, whole model and one MLP, side by side.

The speed claim of "CoLA: Compute-Efficient Pre-Training of LLMs via Low-Rank Activation" (Liu et
al., 2025): at r = d/4 a CoLA model needs about half the FLOPs of the dense one, so it should step
faster, not only be smaller. All variants live in one process and run on the same random tokens;
each round times every variant in a rotated order, and the table reports each variant's median
over the rounds, so that drift of a shared machine hits all of them alike. Both clocks are kept:
wall time, and this process's CPU time (all its threads), which other processes on a busy machine
disturb far less (they still share its caches and memory bandwidth).

    python benchmarks/cola_speed.py                  # llama-cpu, rank d/4 = 64, batch 16 x 128
    python benchmarks/cola_speed.py --rounds 9 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sltrain.config import load_config
from sltrain.measure.flops import linear_flops, model_flops
from sltrain.measure.loss import lm_loss
from sltrain.model import build_model

HERE = Path(__file__).resolve().parent
METHODS = ("full", "cola", "cola_m")


def variants(args: argparse.Namespace) -> dict[str, tuple[nn.Module, Any, float]]:
    """name -> (module, one forward+backward step, training FLOPs per token) for every method,
    as the whole model and as the first block's MLP alone."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for method in METHODS:
        cfg = load_config(None, {"model.preset": args.preset, "method.name": method,
                                 "data.seq_len": args.seq_len, "train.batch_size": args.batch_size})
        torch.manual_seed(0)
        model = build_model(cfg)
        vocab, dim = cfg.model_dims()["vocab_size"], cfg.model_dims()["dim"]
        x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g)
        h = torch.randn(args.batch_size, args.seq_len, dim, generator=g, requires_grad=True)
        mlp = model.layers[0].mlp
        flops = model_flops(model, args.seq_len, args.batch_size)["train"]
        mlp_flops = sum(sum(linear_flops(m, args.batch_size * args.seq_len)) for m in mlp.children())
        out[f"model {method}"] = (
            model, lambda m=model, x=x: lm_loss(m(x[:, :-1]), x[:, 1:]).backward(), flops)
        out[f"mlp {method}"] = (mlp, lambda m=mlp, h=h: m(h).square().mean().backward(), mlp_flops)
    return out


def time_rounds(cases: dict[str, tuple[nn.Module, Any, float]], rounds: int, steps: int,
                warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step of each case in each round (the mean of `steps` steps)."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name][1]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            module, step, _ = cases[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step()
                module.zero_grad(set_to_none=True)
            times[name]["wall"].append((time.perf_counter() - t0) / steps)
            times[name]["cpu"].append((time.process_time() - c0) / steps)
    return times


def table(result: dict[str, Any]) -> str:
    rows = ["| variant | wall ms (median) | vs full | CPU ms (median) | vs full | "
            "training FLOPs/token vs full |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["cases"].items():
        base = result["cases"][f"{name.split()[0]} full"]
        rows.append(f"| {name} | {r['wall_s'] * 1e3:.1f} | {r['wall_s'] / base['wall_s']:.3f} | "
                    f"{r['cpu_s'] * 1e3:.1f} | {r['cpu_s'] / base['cpu_s']:.3f} | "
                    f"{r['train_flops_per_token'] / base['train_flops_per_token']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(HERE / "results" / "cola_speed.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cases = variants(args)
    times = time_rounds(cases, args.rounds, args.steps, args.warmup)
    result = {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "rank": load_config(None, {"model.preset": args.preset}).rank,
              "rounds": args.rounds, "steps": args.steps, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(),
              "cases": {name: {"wall_s": statistics.median(t["wall"]),
                               "cpu_s": statistics.median(t["cpu"]), "rounds_wall_s": t["wall"],
                               "rounds_cpu_s": t["cpu"], "train_flops_per_token": cases[name][2]}
                        for name, t in times.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"threads {result['threads']}, load average before {load_before[0]:.2f}, after "
          f"{result['loadavg_after'][0]:.2f}; written to {args.out}")


if __name__ == "__main__":
    main()
