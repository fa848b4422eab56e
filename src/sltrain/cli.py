"""The `sltrain` command: `train` a model, account for its `memory`, `bench` methods, `data
prepare` a corpus, `export` and `eval` a trained model.

Each handler parses, calls one library function and prints its result; the arguments of each
subcommand are in sltrain/cli_args.py. User errors are printed as one line without a traceback,
with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sltrain import cli_args
from sltrain.config import (
    load_config,
)
from sltrain.errors import UserError


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if "." in k}


def _fmt_bytes(n: float) -> str:
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.2f} {unit}"
    return f"{n / 1000:.2f} TB"


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def cmd_train(args: argparse.Namespace) -> int:
    from sltrain.run.resume import plan
    from sltrain.train import train

    summary = train(*plan(args.config, _overrides(args), args.resume))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if summary["status"] == "finished" else 130  # rank 0 reports
    _print_summary(summary)
    if summary["status"] != "finished":
        print(f"{summary['status']} at step {summary['step']}; checkpoint saved in "
              f"{summary['checkpoint']}; continue with: sltrain train --resume {summary['run_dir']}",
              file=sys.stderr)
        return 130
    return 0


def _print_summary(s: dict[str, Any]) -> None:
    p, mem = s["params"], s["training_state_bytes"]
    rows = [
        ("run", s["run_dir"]),
        ("status", f"{s['status']} at step {s['step']}/{s['steps']}"),
        ("validation", f"loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.2f}"),
        ("parameters", f"total {_fmt_count(p['total'])}, trainable {_fmt_count(p['trainable'])}, "
                       f"sparse {_fmt_count(p['sparse'])}"),
        ("training state", f"{_fmt_bytes(mem['total'])} (weights {_fmt_bytes(mem['weights'])}, "
                           f"gradients {_fmt_bytes(mem['gradients'])}, optimizer "
                           f"{_fmt_bytes(mem['optimizer_states'])}, indices "
                           f"{_fmt_bytes(mem['sparse_indices'])})"),
        ("peak memory", f"{_fmt_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']})"),
        ("tokens seen", f"{s['tokens_seen']:,} ({s['tok_per_s']:.0f} tokens/s)"),
        ("compute", _compute_line(s)),
        ("wall time", f"{s['wall_time_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _compute_line(s: dict[str, Any]) -> str:
    """Achieved model FLOP/s, with the MFU where the device's peak is known (why not, if not)."""
    from sltrain.measure.flops import format_flops, format_rate

    line = f"{format_rate(s['flops_per_s'])} ({format_flops(s['flops_per_token'])} a token)"
    if s.get("mfu") is not None:
        return f"{line}, MFU {100 * s['mfu']:.1f}% of the {s['mfu_note']}"
    return f"{line}; {s['mfu_note']}"


def cmd_memory(args: argparse.Namespace) -> int:
    from sltrain.device import weight_dtype
    from sltrain.measure import count_parameters
    from sltrain.measure.flops import format_flops, model_flops
    from sltrain.measure.memory import estimate_for
    from sltrain.measure.peak import predict_peak
    from sltrain.model import build_model
    from sltrain.parametrize.base import FactoredLinear

    cfg = load_config(None, _overrides(args))
    if args.budget is not None:
        return _memory_budget(cfg, args.budget, args.json)
    model = build_model(cfg, device="meta")
    counts = count_parameters(model)
    dtype = weight_dtype(args.precision)
    mem = estimate_for(cfg, args.precision, model)
    peak = predict_peak(cfg, args.precision, model)
    report = {"preset": cfg.model.preset, "method": cfg.method.name, "precision": args.precision,
              "dtype": _dtype_name(dtype),
              "optimizer": cfg.optimizer.name, "params": counts, "bytes": mem.to_dict(),
              "flops_per_token": model_flops(model, cfg.data.seq_len, cfg.train.batch_size),
              "peak": {**peak.to_dict(), **_peak_inputs(cfg)}}
    # The chosen method's own options (rank, lora_alpha, density, ...), the preset's where unset.
    options = cfg.method_options()
    report.update({k: v for k, v in options.items() if k not in report})
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    knobs = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in options.items())
    print(f"{cfg.model.preset} x {cfg.method.name}{f' ({knobs})' if knobs else ''}, "
          f"--precision {args.precision} ({_dtype_name(dtype)} weights, gradients and states), "
          f"{cfg.optimizer.name}"
          + (" with per-layer updates" if cfg.optimizer.per_layer_updates else ""))
    print(f"parameters: total {_fmt_count(counts['total'])} ({counts['total']:,}), "
          f"trainable {_fmt_count(counts['trainable'])}, sparse values "
          f"{_fmt_count(counts['sparse'])}")
    index_dtype = next((b.dtype for m in model.modules() if isinstance(m, FactoredLinear)
                        for b in m.index_buffers()), None)
    rows = [("weights", mem.weights), ("gradients", mem.gradients),
            ("optimizer states", mem.optimizer_states),
            ("sparse indices" + (f" ({_dtype_name(index_dtype)})" if index_dtype else ""),
             mem.sparse_indices),
            ("total", mem.total)]
    for name, n in rows:
        print(f"  {name:<24} {_fmt_bytes(n):>12}   {n:>16,} B")
    _print_peak(cfg, peak)
    flops = report["flops_per_token"]
    print(f"FLOPs per token: forward {format_flops(flops['forward'])}, training "
          f"{format_flops(flops['train'])} (forward + backward, seq_len {cfg.data.seq_len}, "
          f"micro-batch {cfg.train.batch_size})")
    return 0


def _peak_inputs(cfg: Any) -> dict[str, Any]:
    t = cfg.train
    return {"batch_size": t.batch_size, "seq_len": cfg.data.seq_len, "grad_accum": t.grad_accum,
            "activation_checkpointing": t.activation_checkpointing,
            "chunk_tokens": cfg.loss.chunk_tokens}


def _print_peak(cfg: Any, peak: Any) -> None:
    t = cfg.train
    chunks = (f"loss chunks of {cfg.loss.chunk_tokens} tokens" if cfg.loss.chunk_tokens
              else "full logits")
    print(f"predicted peak of an update step (micro-batch {t.batch_size} x {cfg.data.seq_len} "
          f"tokens, grad-accum {t.grad_accum}, checkpointing {t.activation_checkpointing}, "
          f"{chunks}), at {peak.moment}:")
    for name, n in (("state held then", peak.states), ("activations kept", peak.activations),
                    ("largest transient", peak.transient), ("peak", peak.total)):
        print(f"  {name:<24} {_fmt_bytes(n):>12}   {n:>16,} B")


def _memory_budget(cfg: Any, budget_text: str, as_json: bool) -> int:
    """`sltrain memory --budget SIZE`: the setups whose predicted peak fits, ranked."""
    from sltrain.measure.budget import RANKING, fits, parse_size

    budget = parse_size(budget_text)
    found, skipped = fits(cfg, budget)
    if as_json:
        print(json.dumps({"preset": cfg.model.preset, "seq_len": cfg.data.seq_len,
                          "budget_bytes": budget, "ranking": RANKING,
                          "fits": [f.to_dict() for f in found], "skipped": skipped}, indent=2))
        return 0
    binary = "i" in budget_text.lower()
    print(f"{cfg.model.preset} at seq-len {cfg.data.seq_len}: the setups whose predicted peak "
          f"fits {budget_text.strip()} ({budget:,} B), each at its largest micro-batch "
          f"(powers of two); ranked by {RANKING}")
    for setup, why in skipped.items():
        print(f"  skipped {setup}: {why}")
    if not found:
        print("  none fits, even at micro-batch 1: raise --budget or lower --seq-len")
        return 0
    head = ("method", "optimizer", "per-layer", "precision", "checkpointing", "micro-batch",
            "trainable", "predicted peak", "peak at")
    table = [head] + [(f.method, f.optimizer, "yes" if f.per_layer else "no", f.precision,
                       f.checkpointing, str(f.micro_batch), _fmt_count(f.trainable),
                       _fmt_size(f.peak.total, binary), f.peak.moment) for f in found]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _fmt_size(n: float, binary: bool) -> str:
    if not binary:
        return _fmt_bytes(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} GiB"


def cmd_data(args: argparse.Namespace) -> int:
    from sltrain.data import prepare, prepare_options, write_token_folder

    cfg = load_config(args.config, _overrides(args))
    start = time.perf_counter()
    data = prepare(cfg.data, cfg.model_dims()["vocab_size"], **prepare_options(cfg))
    folder = data.folder
    if args.out:
        folder = Path(args.out)
        write_token_folder(data, folder)
    how = "tokenised" if data.built else "found in the cache"
    print(f"{len(data.train):,} train + {len(data.val):,} validation tokens "
          f"({data.train.dtype.name}) of {cfg.data.source}, tokenizer {data.meta.get('tokenizer')} "
          f"(EOS {data.eos_token}), {how} in {time.perf_counter() - start:.1f} s")
    use = f"--data {folder}" if args.out else "the same data flags"
    print(f"token folder: {folder}; `sltrain train` with {use} reads it without tokenising")
    return 0


def cmd_data_score(args: argparse.Namespace) -> int:
    from sltrain.data.scoring import score_and_prune

    r = score_and_prune([Path(p) for p in args.runs], args.method, args.keep, Path(args.out),
                        args.drop, args.max_blocks, args.batch_size, args.device, args.seed,
                        progress=sys.stderr.isatty())
    q = r["quantiles"]
    print(f"{r['method']} scores of {r['count']:,} blocks averaged over {len(r['sources'])} "
          f"model(s): mean {r['mean']:.4f}, median {q['0.5']:.4f}, 5%-95% {q['0.05']:.4f}-"
          f"{q['0.95']:.4f}")
    print(f"kept {r['kept_blocks']:,} blocks (dropped {r['drop']}; kept mean score "
          f"{r['kept_mean']:.4f}) in {args.out}; train on them with: sltrain train --data "
          f"{args.out} --seq-len {r['seq_len']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sltrain.bench import list_suites, render, run_suite

    report_dir = Path(args.report_dir) if args.report_dir else None
    if args.suite == "list":
        for s in list_suites():
            tuning = f" + {len(s.tune_runs())} tuning" if s.tune else ""
            print(f"{s.name:<8} {len(s.runs()):>3} runs{tuning}  {s.description}\n{'':<8} {s.path}")
        return 0
    if args.suite == "report":
        if not args.dir:
            raise UserError("`sltrain bench report` needs the folder of a suite's results.csv")
        print(f"report written to {render(Path(args.dir), report_dir)}")
        return 0
    if args.dir:
        raise UserError(f"unexpected argument {args.dir}; pass the output folder as --out")
    r = run_suite(args.suite, Path(args.out) if args.out else None, args.seeds, args.only,
                  args.jobs, _overrides(args), args.dry_run, report_dir)
    if args.dry_run:
        print("\n".join(r["commands"]))
        return 0
    failed = [row for row in r["rows"] if row["status"] != "finished"]
    if r["tuning"]:  # a diverged tuning run is a result of the search, not a failure
        done = sum(row["status"] == "finished" for row in r["tuning"])
        print(f"tuning: {done}/{len(r['tuning'])} runs finished")
    print(f"{len(r['rows']) - len(failed)}/{len(r['rows'])} runs finished; results in "
          f"{r['results']}, report in {r['report']}")
    if r["interrupted"]:
        print(f"interrupted; run the same command again to continue {r['out']}", file=sys.stderr)
        return 130
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from sltrain.export import export_hf

    info = export_hf(Path(args.run), Path(args.out), args.dtype, args.force)
    print(f"exported {info['checkpoint']} ({info['method']}, merged to dense, "
          f"{_fmt_count(info['params'])} parameters, {info['dtype']}) to {info['out']} as "
          f"LlamaForCausalLM\nevaluate with: sltrain eval {info['out']} --data {info['source']}\n"
          f"           or: lm_eval --model hf --model_args pretrained={info['out']} --tasks TASKS")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sltrain.model.convert import convert_run

    info = convert_run(Path(args.run), args.to, Path(args.out))
    print(f"converted {info['source']} (pre_ln, {_fmt_count(info['source_params'])} parameters) "
          f"to {args.to} ({_fmt_count(info['params'])} parameters, dense) in {info['checkpoint']}"
          f"\nevaluate with: sltrain eval {args.out}")
    return 0


def cmd_densify(args: argparse.Namespace) -> int:
    from sltrain.densify import densify

    info = densify(Path(args.run), Path(args.out))
    print(f"densified {info['source']} ({info['method']}, step {info['step']}) into {args.out}: "
          f"a dense (full) model of {_fmt_count(info['params'])} parameters\n"
          f"fine-tune with: sltrain train --method full --init-from {args.out} --out-dir DIR")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sltrain.evaluate import perplexity

    overrides = {**_overrides(args), "train.device": args.device}
    r = perplexity(Path(args.model), overrides, args.split, args.max_batches)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['model']} ({r['kind']}) on {r['data']}, {r['split']} split: {r['blocks']} blocks "
          f"of {r['seq_len']} tokens")
    print(f"loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}, tokens {r['tokens']:,}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from sltrain.measure.health_report import health_report

    r = health_report(Path(args.run), Path(args.out) if args.out else None, args.blocks,
                      args.layers)
    print("excess kurtosis per block: " + " ".join(f"{k:.2f}" for k in r["kurtosis"]))
    print(f"output nuclear norm / N: {r['output_nuclear_norm']:.4f}")
    shares = [w["low_rank_share"] for w in r["weights"].values() if "low_rank_share" in w]
    if shares:
        print(f"low-rank share of ||W||^2: mean {sum(shares) / len(shares):.1%} "
              f"(min {min(shares):.1%}, max {max(shares):.1%}) over {len(shares)} SLTrain layers")
    print(f"written {r['json']} and {r['png']}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from sltrain.measure.schedule_preview import schedule_preview

    r = schedule_preview(args.config, _overrides(args), args.print,
                         Path(args.plot) if args.plot else None, args.compare)
    print(f"schedule {r['name']}: {r['steps']} update steps, warm-up {r['warmup']}, "
          f"peak lr {r['peak_lr']:g}, {r['tokens_per_step']:,} tokens per step")
    print(f"  {'':<18} {'step':>8} {'multiplier':>11} {'lr':>11}")
    for label, step, m, lr in r["rows"]:
        print(f"  {label:<18} {step:>8} {m:>11.5f} {lr:>11.4g}")
    if args.print:
        print("step\tmultiplier\tlr")
        print("\n".join(f"{step}\t{m:.6g}\t{lr:.6g}" for step, m, lr in r["every_step"]))
    for name, why in r["skipped"]:
        print(f"skipping {name}: {why}", file=sys.stderr)
    if args.plot:
        print(f"plot written to {r['plot']}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from sltrain.measure.scaling import fit_runs

    r = fit_runs([Path(d) for d in args.runs], args.params, args.bootstrap, args.predict,
                 Path(args.plot) if args.plot else None, Path(args.json) if args.json else None)
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    fit = r["fit"]
    print(f"L(N, D) = E + A / N^alpha + B / D^beta, fitted to {len(r['runs'])} runs "
          f"(N = params_{args.params}, D = tokens_seen, L = val_loss; Huber loss "
          f"{fit['objective']:.3g})")
    for name in ("E", "A", "alpha", "B", "beta"):
        lo_hi = fit["intervals"].get(name)
        ci = f"  [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}] (95%, {args.bootstrap} bootstrap fits)" if lo_hi else ""
        print(f"  {name:<5} {fit[name]:>12.4g}{ci}")
    print(f"  {'N':>10} {'D':>12} {'observed':>9} {'fitted':>9} {'log ratio':>10}  run")
    for run in r["runs"]:
        print(f"  {run['N']:>10.4g} {run['D']:>12.4g} {run['L']:>9.4f} {run['predicted']:>9.4f} "
              f"{run['residual']:>+10.4f}  {run['run']}")
    if "prediction" in r:
        p = r["prediction"]
        print(f"prediction at N = {p['N']:.4g}, D = {p['D']:.4g}: loss {p['loss']:.4f} "
              f"(perplexity {p['ppl']:.2f})")
    for what, key in (("plot", "plot"), ("fit", "json")):
        if key in r:
            print(f"{what} written to {r[key]}")
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from sltrain.soup import make_soup

    overrides = {**_overrides(args), "train.device": args.device}
    r = make_soup([Path(p) for p in args.ingredients], Path(args.out), args.recipe, overrides,
                  args.max_batches)
    e = r["eval"]
    print(f"{r['recipe']} soup of {len(r['ingredients'])} checkpoints, merged to dense; val "
          f"perplexity on {e['blocks']} blocks of {e['seq_len']} tokens of {e['data']}:")
    width = max(len(i["path"]) for i in r["ingredients"])
    for i in r["ingredients"]:
        mark = "kept" if i["kept"] else "left out"
        print(f"  {i['path']:<{width}}  {i['method']:<8} ppl {i['val_ppl']:>9.3f}  {mark}")
    for t in r["greedy_trials"]:
        print(f"  greedy: adding {r['ingredients'][t['added']]['path']} gives ppl "
              f"{t['val_ppl']:.3f}: {'kept' if t['kept'] else 'worse, left out'}")
    print(f"  {'soup':<{width}}  {'full':<8} ppl {r['soup']['val_ppl']:>9.3f}")
    print(f"written {args.out}: a dense run folder with soup.json; evaluate with: "
          f"sltrain eval {args.out}")
    return 0


def _dtype_name(dtype: object) -> str:
    return str(dtype).replace("torch.", "")


HANDLERS = {
    "train": cmd_train, "memory": cmd_memory, "data prepare": cmd_data, "data score": cmd_data_score,
    "bench": cmd_bench, "export": cmd_export, "convert": cmd_convert, "densify": cmd_densify,
    "eval": cmd_eval, "health": cmd_health, "schedule": cmd_schedule, "scaling": cmd_scaling,
    "soup": cmd_soup,
}


def build_parser() -> argparse.ArgumentParser:
    """`sltrain`'s parser: each subcommand's arguments (sltrain.cli_args) with its handler here."""
    return cli_args.build_parser(HANDLERS, __doc__.splitlines()[0])


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is both)
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # a reader that left shows here, not in the interpreter's exit
        return code
    except UserError as e:
        print(f"sltrain: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`sltrain bench list | head`): nothing to report
        _silence_stdout()
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as e:  # a path no library check caught (a full disk, a vanished folder)
        from sltrain.files import os_error_line

        print(f"sltrain: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sltrain: interrupted", file=sys.stderr)
        return 130

