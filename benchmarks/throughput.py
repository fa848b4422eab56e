"""Training throughput against the peers, in one process: our dense LLaMA (eager and compiled)
against transformers' LlamaForCausalLM at the same config, the factored methods against our
dense, and the SLTrain layer against its compute limit; on CUDA also llama-60m/350m/1b with MFU.

    python benchmarks/throughput.py                 # the record: llama-cpu, the paper's shapes
    python benchmarks/throughput.py --quick         # a small check that every part runs

Every model trains on the same random tokens with full logits, the same loss (float32
cross-entropy; compiled in the +compile variants, as train.compile compiles it), clipping and
AdamW; transformers' model runs SDPA attention from a local config (nothing is downloaded).
Rounds alternate the order of the variants; tokens/s is the median of the rounds, the warm-up
(and so compilation) excluded. The SLTrain layer's forward + backward is timed against a dense
nn.Linear's, the two back to back at each repetition (the ratio: the median of the pairs'); its
compute limit is 1 + 4r/(3T) of dense (the dense 6 T m n plus 8 m n r to compose W in forward
and backward and form both factor gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local config only, never the Hub

HERE = Path(__file__).resolve().parent
# The paper's shapes: (dim, ffn_dim, rank) of llama-60m, -350m and -1b.
PAPER_SHAPES = {"60m": (512, 1376, 128), "350m": (1024, 2736, 256), "1b": (2048, 5461, 512)}
GPU_PRESETS = {"llama-60m": 64, "llama-350m": 32, "llama-1b": 16}  # preset -> sequences a step
GOALS = {"compiled_dense_vs_transformers": 1.3, "sltrain_step_vs_dense": 1.05,
         "layer_vs_limit": 1.03, "gpu_dense_mfu_1b": 0.40, "gpu_sltrain_vs_dense": 0.9}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(preset: str, method: str, seq_len: int, precision: str, device: str):
    from sltrain.config import load_config

    return load_config(None, {"model.preset": preset, "method.name": method,
                              "data.seq_len": seq_len, "train.precision": precision,
                              "train.device": device})


def ours(cfg, device: torch.device, compiled: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from sltrain.model import build_model
    from sltrain.optim import build_optimizer
    from sltrain.train.compile import compile_blocks

    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    if compiled:
        compile_blocks(model)
    return model, build_optimizer(model, cfg.optimizer, cfg.rank)


def transformers_llama(cfg, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """LlamaForCausalLM at `cfg`'s shape (untied, SDPA), as `sltrain export` would describe it."""
    import transformers

    from sltrain.optim.adamw import AdamW, kernel

    d = cfg.model_dims()
    config = transformers.LlamaConfig(
        vocab_size=d["vocab_size"], hidden_size=d["dim"], intermediate_size=d["ffn_dim"],
        num_hidden_layers=d["n_layers"], num_attention_heads=d["n_heads"],
        num_key_value_heads=d["n_heads"], head_dim=d["dim"] // d["n_heads"],
        max_position_embeddings=d["max_seq_len"], rms_norm_eps=d["norm_eps"],
        rope_theta=d["rope_theta"], hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device)
    params = list(model.parameters())
    oc = cfg.optimizer
    return model, AdamW(params, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, **kernel(params))


def train_step(model, opt, x: torch.Tensor, autocast, hf: bool, compiled: bool) -> Callable[[], None]:
    """One step as the trainer takes it; `compiled`: the loss compiled too, as `train.compile`
    compiles it."""
    from sltrain.train.losses import TrainingLoss

    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = TrainingLoss("cross_entropy", compile=compiled)

    def step() -> None:
        with autocast:
            out = model(input_ids=x[:, :-1]) if hf else model(x[:, :-1])
        loss_fn(out.logits if hf else out, x[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build_variants(preset: str, names: list[str], args, device: torch.device) -> dict[str, dict]:
    """label -> {"step", "flops_per_token"} for "full", "full+compile", "transformers", ...:
    a method name; "+compile" for `train.compile` (compiled blocks and loss), "+compile-blocks"
    for the blocks alone (the loss eager: what compiling the loss adds)."""
    from sltrain.device import autocast_for
    from sltrain.measure.flops import model_flops
    from sltrain.model import build_model

    variants = {}
    for name in names:
        method, _, compiled = name.partition("+")
        if compiled not in ("", "compile", "compile-blocks"):
            raise SystemExit(f"unknown variant {name!r}: a method, +compile or +compile-blocks")
        cfg = run_config(preset, "full" if method == "transformers" else method, args.seq_len,
                         args.precision, str(device))
        vocab = cfg.model_dims()["vocab_size"]
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(device)
        flops = model_flops(build_model(cfg, device="meta"), args.seq_len, args.batch_size)["train"]
        hf = method == "transformers"
        model, opt = transformers_llama(cfg, device) if hf else ours(cfg, device, bool(compiled))
        step = train_step(model, opt, x, autocast_for(cfg, device), hf, compiled == "compile")
        for _ in range(args.warmup):  # compilation happens here, outside the timed rounds
            step()
        sync(device)
        variants[name] = {"step": step, "flops_per_token": flops, "model": model, "optimizer": opt,
                          "params": sum(p.numel() for p in model.parameters())}
    return variants


def time_rounds(variants: dict[str, dict], args, device: torch.device) -> dict[str, dict]:
    """Median tokens/s over `args.rounds` rounds of `args.steps` steps, order alternating."""
    tokens = args.batch_size * args.seq_len * args.steps
    rates: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)
    for r in range(args.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[label]["step"]()
            sync(device)
            rates[label].append(tokens / (time.perf_counter() - t0))
            print(f"round {r + 1}/{args.rounds} {label}: {rates[label][-1]:.0f} tokens/s", flush=True)
    return {label: {"tok_per_s": statistics.median(v), "rounds": v,
                    "params": variants[label]["params"],
                    "flops_per_token": variants[label]["flops_per_token"]}
            for label, v in rates.items()}


def model_rows(preset: str, names: list[str], args, device: torch.device) -> dict[str, dict]:
    from sltrain.device import resolve_precision
    from sltrain.measure.flops import device_peak

    variants = build_variants(preset, names, args, device)
    rows = time_rounds(variants, args, device)
    del variants
    precision = resolve_precision(args.precision, device)
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    peak, note = device_peak(device, precision, tf32)
    for row in rows.values():
        row["flops_per_s"] = row["flops_per_token"] * row["tok_per_s"]
        row["mfu"] = row["flops_per_s"] / peak if peak else None
    rows["_peak"] = {"peak_flops": peak, "note": note, "precision": precision}
    return rows


def fwd_bwd_seconds(layers: list[torch.nn.Module], x: torch.Tensor, reps: int,
                    device: torch.device) -> list[list[float]]:
    """Seconds of each layer's forward and backward (input and weight gradients) at each of
    `reps` repetitions, the layers taking turns so that a noisy machine's drift hits them alike."""
    g = torch.randn(x.shape[0], layers[0].out_features, device=device)
    times: list[list[float]] = [[] for _ in layers]
    for i in range(reps + 2):
        for layer, t in zip(layers, times, strict=True):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            sync(device)
            t0 = time.perf_counter()
            layer(x).backward(g)
            sync(device)
            if i >= 2:  # two warm-up calls each
                t.append(time.perf_counter() - t0)
    return times


def layer_rows(shapes: list[str], tokens: int, reps: int, device: torch.device) -> list[dict]:
    """The SLTrain layer against a dense nn.Linear at each paper shape (attention, MLP up and
    down), float32: its time ratio and the limit 1 + 4r/(3T)."""
    from sltrain.parametrize.sltrain import SparseLowRankLinear

    rows = []
    for size in shapes:
        dim, ffn, rank = PAPER_SHAPES[size]
        for part, (n_in, n_out) in (("attention", (dim, dim)), ("mlp up", (dim, ffn)),
                                    ("mlp down", (ffn, dim))):
            torch.manual_seed(0)
            dense = torch.nn.Linear(n_in, n_out, bias=False, device=device)
            sl = SparseLowRankLinear(n_in, n_out, rank, lora_alpha=32, density=0.03, device=device)
            torch.nn.init.normal_(sl.B, std=0.02)
            x = torch.randn(tokens, n_in, device=device, requires_grad=True)
            dense_s, sl_s = fwd_bwd_seconds([dense, sl], x, reps, device)
            # The ratio of each repetition's pair (run back to back), then the median: drift
            # between repetitions cancels, where a ratio of the two medians keeps it.
            pairs = [b / a for a, b in zip(dense_s, sl_s, strict=True)]
            ratio = statistics.median(pairs)
            limit = 1 + 4 * rank / (3 * tokens)
            rows.append({"shape": size, "part": part, "in": n_in, "out": n_out, "rank": rank,
                         "tokens": tokens, "dense_s": statistics.median(dense_s),
                         "sltrain_s": statistics.median(sl_s), "ratio": ratio,
                         "pair_ratios": pairs, "limit": limit, "ratio_vs_limit": ratio / limit})
            print(f"layer {size} {part}: {ratio:.3f}x dense (limit {limit:.3f})", flush=True)
    return rows


def goals(cpu: dict, layers: list[dict], gpu: dict, quick: bool) -> dict[str, dict]:
    """Each goal's measured value and whether it is met (None: not measured, or a --quick
    check, whose tiny shapes say nothing about the goals)."""
    def ratio(a: str, b: str) -> float | None:
        return cpu[a]["tok_per_s"] / cpu[b]["tok_per_s"] if a in cpu and b in cpu else None

    measured = {
        "compiled_dense_vs_transformers": ratio("full+compile", "transformers"),
        "sltrain_step_vs_dense": ratio("full", "sltrain"),  # step time: dense's tokens/s over ours
        "layer_vs_limit": max((r["ratio_vs_limit"] for r in layers), default=None),
        "gpu_dense_mfu_1b": gpu.get("llama-1b", {}).get("full+compile", {}).get("mfu"),
        "gpu_sltrain_vs_dense": None,
    }
    one_b = gpu.get("llama-1b", {})
    if "sltrain+compile" in one_b:
        measured["gpu_sltrain_vs_dense"] = (one_b["sltrain+compile"]["tok_per_s"]
                                            / one_b["full+compile"]["tok_per_s"])
    out = {}
    for name, value in measured.items():
        at_most = name in ("sltrain_step_vs_dense", "layer_vs_limit")
        met = None if value is None or quick else (
            value <= GOALS[name] if at_most else value >= GOALS[name])
        out[name] = {"goal": ("<= " if at_most else ">= ") + str(GOALS[name]), "value": value, "met": met}
    return out


def names(rows: dict[str, dict]) -> list[str]:
    return [label for label in rows if not label.startswith("_")]


def table(rows: dict[str, dict], reference: str) -> list[str]:
    ref = rows[reference]["tok_per_s"]
    lines = ["| variant | params | tokens/s | vs " + reference + " | model FLOP/s | MFU |",
             "|---|---|---|---|---|---|"]
    for label in names(rows):
        r = rows[label]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–"
        lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['tok_per_s']:.0f} | "
                     f"{r['tok_per_s'] / ref:.3f}x | {r['flops_per_s'] / 1e9:.2f} GFLOP/s | {mfu} |")
    return lines


def report(result: dict) -> str:
    s = result["setup"]
    out = [f"## {s['preset']}, {s['batch_size']} x {s['seq_len']} tokens a step, {s['precision']}, "
           f"median of {s['rounds']} rounds of {s['steps']} steps", "",
           *table(result["cpu"], "full" if "full" in result["cpu"] else names(result["cpu"])[0]), ""]
    if result["layers"]:
        out += ["## The SLTrain layer against dense nn.Linear (float32, forward + backward)", "",
                "| shape | part | in x out | rank | T | dense ms | SLTrain ms | ratio | limit "
                "| ratio / limit |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['shape']} | {r['part']} | {r['in']} x {r['out']} | {r['rank']} | {r['tokens']} | "
                f"{1e3 * r['dense_s']:.2f} | {1e3 * r['sltrain_s']:.2f} | {r['ratio']:.3f} | "
                f"{r['limit']:.3f} | {r['ratio_vs_limit']:.3f} |" for r in result["layers"]] + [""]
    for preset, rows in result["gpu"].items():
        out += [f"## {preset} on {result['device']} ({rows['_peak']['note']})", "",
                *table(rows, "full+compile"), ""]
    out += ["## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for name, g in result["goals"].items():
        value = "not measured" if g["value"] is None else f"{g['value']:.3f}"
        met = {None: "– (--quick)" if result["setup"]["quick"] else "–", True: "yes",
               False: "no"}[g["met"]]
        out.append(f"| {name} | {g['goal']} | {value} | {met} |")
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps a round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="auto", help="fp32 on CPU, bf16-mixed on CUDA by default")
    ap.add_argument("--variants", default="full,full+compile,transformers,sltrain,sltrain+compile,"
                    "lowrank,cola",
                    help="our methods, +compile (blocks and loss), +compile-blocks, and transformers")
    ap.add_argument("--layer-shapes", default="60m,350m,1b", help="'' skips the layer timing")
    ap.add_argument("--layer-tokens", type=int, default=4096, help="T, tokens per micro-batch")
    ap.add_argument("--layer-reps", type=int, default=9)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true",
                    help="a small check that every part runs (not a measurement)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "throughput.json")
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.seq_len, args.steps, args.warmup = 4, 64, 2, 2
        args.layer_shapes, args.layer_tokens, args.layer_reps = "60m", 256, 3
    return args


def main() -> None:
    from sltrain.device import enable_tf32, resolve_device

    args = parse_args()
    device = resolve_device(args.device)
    enable_tf32(device, args.precision)  # as the Trainer does: TF32 on CUDA under fp32/bf16-mixed
    names = [n for n in args.variants.split(",") if n]
    cpu = model_rows(args.preset, names, args, device)
    shapes = [s for s in args.layer_shapes.split(",") if s]
    layers = layer_rows(shapes, args.layer_tokens, args.layer_reps, device)
    gpu = {}
    if device.type == "cuda" and not args.quick:
        for preset, sequences in GPU_PRESETS.items():
            gpu_args = argparse.Namespace(**{**vars(args), "batch_size": sequences})
            gpu[preset] = model_rows(preset, ["full", "full+compile", "sltrain", "sltrain+compile"],
                                     gpu_args, device)
    setup = {k: getattr(args, k) for k in ("preset", "batch_size", "seq_len", "steps", "warmup",
                                            "rounds", "layer_tokens", "quick")}
    setup["precision"] = cpu["_peak"]["precision"]
    result = {"setup": setup, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
              "cpu": cpu, "layers": layers, "gpu": gpu,
              "goals": goals(cpu, layers, gpu, args.quick)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
