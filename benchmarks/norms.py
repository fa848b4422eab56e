"""Forward+backward time of the three equivalent forms of one model: Pre-LN, Pre-RMSNorm,
Pre-CRMSNorm (the paper claims 1-10% faster for the (C)RMSNorm forms).

    python benchmarks/norms.py [--preset llama-cpu] [--batch 16] [--seq 128] [--rounds 5]

The forms are interleaved round by round (each round times every form once, over `--steps`
steps after a warm-up), so drift of a noisy machine hits all three alike; the median round is
reported, with each form's time relative to Pre-LN.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sltrain.config import load_config
from sltrain.model import build_model
from sltrain.model.convert import to_pre_crmsnorm, to_pre_rmsnorm


def step_time(model: torch.nn.Module, idx: torch.Tensor, steps: int) -> float:
    def one() -> None:
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
        model.zero_grad(set_to_none=True)

    one()  # warm-up
    if idx.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if idx.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    cfg = load_config(None, {"model.preset": args.preset, "model.norm": "pre_ln",
                             "method.name": "full", "data.seq_len": args.seq})
    torch.manual_seed(0)
    ln = build_model(cfg).to(args.device)
    forms = {"pre_ln": ln, "pre_rmsnorm": to_pre_rmsnorm(ln), "pre_crmsnorm": to_pre_crmsnorm(ln)}
    vocab = cfg.model_dims()["vocab_size"]
    idx = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    with torch.no_grad():
        ref = ln(idx)
        gap = max((m(idx) - ref).abs().max().item() for m in forms.values())
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, model in forms.items():
            times[name].append(step_time(model, idx, args.steps))
    base = statistics.median(times["pre_ln"])
    print(f"{args.preset}, batch {args.batch} x {args.seq}, {args.device}; max |logit gap| {gap:.1e}")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"form": name, "median_s": med, "vs_pre_ln": med / base})
        print(f"{name:<13} {med * 1e3:8.1f} ms/step  {med / base:.3f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "max_logit_gap": gap,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
