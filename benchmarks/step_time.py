"""Training-step time and peak memory of each parameterisation relative to dense, in one run.

Each method is measured in its own process (honest peak memory), on random tokens (the data
pipeline is not what is measured), for a full update step: forward, backward, clipping, AdamW.
Rounds alternate the order of the methods so that drift of a noisy machine hits all of them.

    python benchmarks/step_time.py                       # llama-cpu preset, writes results/
    python benchmarks/step_time.py --preset llama-60m --batch-size 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> dict:
    import torch

    from sltrain.config import load_config
    from sltrain.device import autocast_for, resolve_device
    from sltrain.measure import count_parameters, measure_memory, rss_bytes
    from sltrain.measure.loss import lm_loss
    from sltrain.model import build_model
    from sltrain.optim import build_optimizer

    per_layer = bool(args.per_layer)
    cfg = load_config(None, {"model.preset": args.preset, "method.name": args.method,
                             "optimizer.name": args.optimizer, "optimizer.per_layer_updates": per_layer,
                             "optimizer.grad_clip": 0.0 if per_layer else 1.0,
                             "data.seq_len": args.seq_len, "train.device": args.device})
    device = resolve_device(args.device)
    torch.manual_seed(0)
    baseline = rss_bytes()
    model = build_model(cfg).to(device)
    opt = build_optimizer(model, cfg.optimizer, cfg.rank)
    autocast = autocast_for(cfg, device)
    vocab = cfg.model_dims()["vocab_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast:
            logits = model(x[:, :-1])
        lm_loss(logits, x[:, 1:]).backward()  # per-layer updates step inside backward
        if not per_layer:  # per-layer updates cannot clip by the global norm
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        kind = "cpu_peak_rss_above_baseline"
    return {
        "method": args.method,
        "optimizer": args.optimizer,
        "per_layer": per_layer,
        "optimizer_state_bytes": measure_memory(model, opt).optimizer_states,
        "median_step_s": statistics.median(times),
        "peak_bytes": peak,
        "peak_kind": kind,
        "params": count_parameters(model)["total"],
        "state_bytes": measure_memory(model, opt).total,
    }


def measure(variants: dict[str, list[str]], args: argparse.Namespace) -> dict[str, dict]:
    """Run each variant (label -> extra worker flags) in its own process, `args.rounds` times in
    alternating order; return the fastest round of each."""
    runs: dict[str, list[dict]] = {label: [] for label in variants}
    labels = list(variants)
    for r in range(args.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            cmd = [sys.executable, __file__, *variants[label], "--preset", args.preset,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {label}: "
                  f"{runs[label][-1]['median_step_s'] * 1000:.1f} ms/step", file=sys.stderr)
    # Fastest round per variant: the least disturbed measurement of each.
    return {label: min(rs, key=lambda d: d["median_step_s"]) for label, rs in runs.items()}


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="llama-cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    # set in the worker processes
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    ap.add_argument("--per-layer", type=int, default=0, help=argparse.SUPPRESS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--methods", nargs="+", default=["full", "lowrank", "sltrain"])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "step_time.json")
    args = ap.parse_args()
    if args.method:
        print(json.dumps(worker(args)))
        return

    best = measure({m: ["--method", m] for m in args.methods}, args)
    ref = best.get("full", next(iter(best.values())))
    rows = []
    for b in best.values():
        rows.append({**b, "time_vs_full": b["median_step_s"] / ref["median_step_s"],
                     "peak_vs_full": b["peak_bytes"] / ref["peak_bytes"],
                     "state_vs_full": b["state_bytes"] / ref["state_bytes"]})
    setup = {k: getattr(args, k) for k in ("preset", "batch_size", "seq_len", "steps", "rounds")}
    result = {"setup": setup, "device": ref["peak_kind"], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"best of {args.rounds} rounds (median of {args.steps} steps each)\n")
    print("| method | params | step time vs full | peak memory vs full | training state vs full |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['params'] / 1e6:.2f}M | {r['time_vs_full']:.2f}x | "
              f"{r['peak_vs_full']:.2f}x | {r['state_vs_full']:.2f}x |")


if __name__ == "__main__":
    main()
