"""Peak live tensor bytes of one SLTrain layer's forward and backward (llama-1b's 2048 x 5461).

    python benchmarks/sltrain_backward.py [--tokens 256] [--src DIR]

Counts the storages the forward and the backward create (LiveTensorBytes, any device), in
float32 and under bf16 autocast from float32 weights, next to the bytes of one dense (out, in)
matrix. `--src` runs the layer of another checkout (e.g. main's, whose backward keeps W alive
while it forms G); the counter is always loaded from this checkout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20


def _counter():
    path = HERE.parent / "src" / "sltrain" / "measure" / "tensor_bytes.py"
    spec = importlib.util.spec_from_file_location("tensor_bytes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.LiveTensorBytes


def measure(tokens: int, autocast: bool) -> dict:
    import torch

    from sltrain.parametrize.sltrain import SparseLowRankLinear

    counter = _counter()
    torch.manual_seed(0)
    layer = SparseLowRankLinear(5461, 2048, rank=512, lora_alpha=8, density=0.03, seed=0)
    torch.nn.init.normal_(layer.B, std=0.02)
    x = torch.randn(1, tokens, 5461, requires_grad=True)
    with counter() as fwd, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    g = torch.randn_like(y)
    with counter() as bwd:
        y.backward(g)
    return {"mode": "bf16 autocast" if autocast else "float32", "tokens": tokens,
            "dense_mib": 2048 * 5461 * 4 / MIB, "forward_peak_mib": fwd.peak / MIB,
            "backward_peak_mib": bwd.peak / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--src", help="a checkout's src folder for the layer (default: ours)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps([measure(args.tokens, a) for a in (False, True)]))
        return
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([args.src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, "--one", "--tokens", str(args.tokens)],
                          env=env, check=True, stdout=subprocess.PIPE, text=True)
    print("| mode | tokens | one dense W (float32) | forward peak | backward peak |")
    print("|---|---|---|---|---|")
    for r in json.loads(done.stdout.strip().splitlines()[-1]):
        print(f"| {r['mode']} | {r['tokens']} | {r['dense_mib']:.1f} MiB | "
              f"{r['forward_peak_mib']:.1f} MiB | {r['backward_peak_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
