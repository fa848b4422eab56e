"""The `sltrain` command: `train` a model, account for its `memory`, `bench` methods, `data
prepare` a corpus, `export` and `eval` a trained model.

User errors are printed as one line without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sltrain.config import (
    RunConfig,
    flag_table,
    flatten,
    load_config,
    read_config_file,
    resume_config,
    run_clashes,
)
from sltrain.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see `{self.prog} --help`")


def _add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ()) -> None:
    spellings: dict[str, list[str]] = defaultdict(list)
    for flag, key in flag_table().items():
        if not sections or key.split(".")[0] in sections:
            spellings[key].append(flag)
    for key, flags in spellings.items():
        section, field = key.split(".", 1)
        default = RunConfig.model_fields[section].default_factory().model_dump()[field]  # type: ignore[misc]
        # A bare boolean flag means true (`--per-layer-updates`); `--refactor false` also works.
        switch = {"nargs": "?", "const": True} if isinstance(default, bool) else {}
        parser.add_argument(*sorted({f"--{f}" for f in flags}, key=lambda f: (len(f), "_" in f)), dest=key,
                            default=argparse.SUPPRESS, metavar=field.upper(),
                            help=f"{key} (default: {default})", **switch)


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
    from sltrain.train import train
    from sltrain.train.checkpoint import list_checkpoints

    overrides = _overrides(args)
    if args.resume == "auto":
        # Continue the newest complete checkpoint of --out-dir if there is one, else start it.
        cfg = load_config(args.config, overrides)
        if not cfg.train.out_dir:
            raise UserError("--resume auto needs --out-dir, the run folder to continue or start")
        run_dir = Path(cfg.train.out_dir)
        if list_checkpoints(run_dir):
            clashes = run_clashes(run_dir, cfg)
            if clashes:
                raise UserError(f"run folder {run_dir} was made by another config "
                                f"({', '.join(clashes)}); pass another --out-dir or the same flags")
            summary = train(cfg, run_dir=run_dir, resume=run_dir)
        else:
            summary = train(cfg)
    elif args.resume:
        resume = Path(args.resume)
        if not resume.exists():
            raise UserError(f"--resume {resume} does not exist; pass a run folder or checkpoint")
        run_dir = resume if (resume / "config.json").is_file() else resume.parent.parent
        if args.config:
            overrides = {**flatten(read_config_file(Path(args.config))), **overrides}
        cfg = resume_config(run_dir, overrides)
        summary = train(cfg, run_dir=run_dir, resume=resume)
    else:
        cfg = load_config(args.config, overrides)
        summary = train(cfg)
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
        ("wall time", f"{s['wall_time_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def cmd_memory(args: argparse.Namespace) -> int:
    from sltrain.measure import count_parameters, estimate_memory
    from sltrain.measure.memory import DTYPES
    from sltrain.model import build_model

    cfg = load_config(None, _overrides(args))
    model = build_model(cfg, device="meta")
    counts = count_parameters(model)
    mem = estimate_memory(model, DTYPES[args.dtype], cfg.optimizer, cfg.rank)
    report = {"preset": cfg.model.preset, "method": cfg.method.name, "dtype": args.dtype,
              "optimizer": cfg.optimizer.name, "params": counts, "bytes": mem.to_dict()}
    if cfg.method.name not in ("full", "sparse"):
        report.update(rank=cfg.rank, lora_alpha=cfg.lora_alpha)
    if cfg.method.name in ("sltrain", "sparse", "lost"):
        report["density"] = cfg.density
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    knobs = {"full": "", "lowrank": f" (rank {cfg.rank})",
             "sltrain": f" (rank {cfg.rank}, alpha {cfg.lora_alpha:g}, density {cfg.density:g})",
             "relora": f" (rank {cfg.rank}, alpha {cfg.lora_alpha:g})",
             "sparse": f" (density {cfg.density:g}, {cfg.method.mask} mask)",
             "lost": f" (rank {cfg.rank}, density {cfg.density:g})"}
    print(f"{cfg.model.preset} x {cfg.method.name}{knobs[cfg.method.name]}, "
          f"{args.dtype} weights and states, {cfg.optimizer.name}"
          + (" with per-layer updates" if cfg.optimizer.per_layer_updates else ""))
    print(f"parameters: total {_fmt_count(counts['total'])} ({counts['total']:,}), "
          f"trainable {_fmt_count(counts['trainable'])}, sparse values "
          f"{_fmt_count(counts['sparse'])}")
    index_dtype = next((b.dtype for n, b in model.named_buffers()
                        if n.endswith(("support", "channels"))), None)
    rows = [("weights", mem.weights), ("gradients", mem.gradients),
            ("optimizer states", mem.optimizer_states),
            ("sparse indices" + (f" ({_dtype_name(index_dtype)})" if index_dtype else ""),
             mem.sparse_indices),
            ("total", mem.total)]
    for name, n in rows:
        print(f"  {name:<24} {_fmt_bytes(n):>12}   {n:>16,} B")
    return 0


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
    from sltrain.bench import SuiteRunner, builtin_suites, load_suite, render

    if args.suite == "list":
        for name, path in sorted(builtin_suites().items()):
            suite = load_suite(str(path))
            runs = len(suite.runs())
            print(f"{name:<8} {runs:>3} runs  {suite.description}\n{'':<8} {path}")
        return 0
    if args.suite == "report":
        if not args.dir:
            raise UserError("`sltrain bench report` needs the folder of a suite's results.csv")
        path = render(Path(args.dir), Path(args.report_dir) if args.report_dir else None)
        print(f"report written to {path}")
        return 0
    if args.dir:
        raise UserError(f"unexpected argument {args.dir}; pass the output folder as --out")
    suite = load_suite(args.suite)
    extra = _overrides(args)
    progress = extra.pop("train.progress", True) not in (False, "false", "0", "no")  # the suite's bar
    for key in ("train.seed", "train.out_dir"):
        if key in extra:
            raise UserError(f"a suite sets {key} for each run; use --seeds and --out instead")
    out = Path(args.out or f"runs/bench-{suite.name}")
    runner = SuiteRunner(suite, out, suite.runs(args.seeds, args.only), args.jobs, extra,
                         progress=progress)
    if args.dry_run:
        print("\n".join("sltrain " + " ".join(runner.command(r)) for r in runner.runs))
        return 0
    runner.check_reusable()
    rows = runner.run()
    path = render(out, Path(args.report_dir) if args.report_dir else None)
    failed = [r for r in rows if r["status"] != "finished"]
    print(f"{len(rows) - len(failed)}/{len(rows)} runs finished; results in {out / 'results.csv'}, "
          f"report in {path}")
    if runner.stopping.is_set():
        print(f"interrupted; run the same command again to continue {out}", file=sys.stderr)
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
    from sltrain.export import perplexity

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
    from sltrain.data import Blocks, prepare, prepare_options
    from sltrain.export import load_run_model
    from sltrain.measure.health import health_record, plot_spectra, weight_spectra

    model, cfg, ckpt = load_run_model(Path(args.run))
    data = prepare(cfg.data, cfg.model_dims()["vocab_size"], ckpt.parent.parent,
                   **prepare_options(cfg))
    blocks = Blocks(data.val, cfg.data.seq_len)
    n = min(len(blocks), args.blocks)
    if n == 0:
        raise UserError(f"the run's validation split holds no block of {cfg.data.seq_len + 1} tokens")
    x, _ = blocks.batch(range(n))
    spectra = weight_spectra(model)
    n_layers = cfg.model_dims()["n_layers"]
    layers = args.layers or [f"layers.{i}.{p}" for i in (0, n_layers - 1)
                             for p in ("self_attn.q_proj", "mlp.down_proj")]
    unknown = [name for name in layers if name not in spectra]
    if unknown:
        raise UserError(f"no learned weight named {unknown[0]}; pass e.g. --layers "
                        f"{next(iter(spectra))}")
    out = Path(args.out or ckpt.parent.parent / "health")
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(ckpt), "blocks": n, **health_record(model, x),
              "weights": {k: {**{f: v for f, v in s.items() if f.endswith("share")},
                              "top_singular_values": s["weight"][:8]}
                          for k, s in spectra.items()}}
    (out / "health.json").write_text(json.dumps(report, indent=2))
    png = plot_spectra(spectra, out / "spectrum.png", layers,
                       f"{cfg.model.preset} {cfg.method.name}, {ckpt.name}")
    print("excess kurtosis per block: " + " ".join(f"{k:.2f}" for k in report["kurtosis"]))
    print(f"output nuclear norm / N: {report['output_nuclear_norm']:.4f}")
    shares = [s["low_rank_share"] for s in spectra.values() if "low_rank_share" in s]
    if shares:
        print(f"low-rank share of ||W||^2: mean {sum(shares) / len(shares):.1%} "
              f"(min {min(shares):.1%}, max {max(shares):.1%}) over {len(shares)} SLTrain layers")
    print(f"written {out / 'health.json'} and {png}")
    return 0


def _schedule_key_steps(cfg: RunConfig) -> list[tuple[str, int]]:
    """(label, update step) of the points worth printing: phase starts, middle, end."""
    s, total, warm = cfg.schedule, cfg.train.steps, cfg.warmup_steps
    rows = [("start", 0)]
    if warm:
        rows += [("last warm-up step", warm - 1), ("end of warm-up", warm)]
    if s.name == "infinite":
        rows.append(("start of constant", warm + round(s.cooldown_ratio * total)))
    if s.name == "cosine_restarts" and s.cycle_steps:
        rows.append(("first restart", warm + s.cycle_steps))
    rows.append(("middle", total // 2))
    if s.name in ("wsd", "power", "infinite"):
        rows.append(("start of decay", total - round(s.decay_ratio * total)))
    rows.append(("last step", total - 1))
    return sorted({(label, step) for label, step in rows if 0 <= step < total},
                  key=lambda r: (r[1], r[0]))


def cmd_schedule(args: argparse.Namespace) -> int:
    from sltrain.train.schedule import SCHEDULES, multiplier

    if args.compare and not args.plot:
        raise UserError("--compare draws a figure; pass --plot OUT.png too")
    cfg = load_config(args.config, _overrides(args))
    total, peak = cfg.train.steps, cfg.optimizer.lr
    print(f"schedule {cfg.schedule.name}: {total} update steps, warm-up {cfg.warmup_steps}, "
          f"peak lr {peak:g}, {cfg.tokens_per_step:,} tokens per step")
    print(f"  {'':<18} {'step':>8} {'multiplier':>11} {'lr':>11}")
    for label, step in _schedule_key_steps(cfg):
        m = multiplier(cfg, step)
        print(f"  {label:<18} {step:>8} {m:>11.5f} {peak * m:>11.4g}")
    if args.print:
        print("step\tmultiplier\tlr")
        for step in range(total):
            m = multiplier(cfg, step)
            print(f"{step}\t{m:.6g}\t{peak * m:.6g}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(SCHEDULES) if args.compare else [cfg.schedule.name]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, name in enumerate(names):
            try:
                c = load_config(args.config, {**_overrides(args), "schedule.name": name})
            except UserError as e:
                print(f"skipping {name}: {e}", file=sys.stderr)
                continue
            ax.plot(range(total), [peak * multiplier(c, step) for step in range(total)], label=name,
                    linestyle="--" if i % 2 else "-")  # rewarm overlays cosine after warm-up
        ax.set(xlabel="update step", ylabel="learning rate",
               title=f"{total} steps, warm-up {cfg.warmup_steps}, peak {peak:g}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = Path(args.plot)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"plot written to {out}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    import numpy as np

    from sltrain.measure import scaling

    at = None
    if args.predict:
        try:
            at = tuple(float(v) for v in args.predict.split(","))
            n, d = at
        except ValueError:
            raise UserError(f"--predict {args.predict} is not N,D; pass e.g. --predict 1e8,2e9") from None
    runs, notes = scaling.read_runs([Path(r) for r in args.runs], args.params)
    N, D, L = (np.array([r[k] for r in runs]) for k in "NDL")
    fit = scaling.fit(N, D, L)
    for note in notes:  # after the fit, so that a refusal stays one line
        print(f"note: {note}", file=sys.stderr)
    if args.bootstrap:
        fit.intervals = scaling.bootstrap(N, D, L, args.bootstrap, full=fit)
    print(f"L(N, D) = E + A / N^alpha + B / D^beta, fitted to {len(runs)} runs "
          f"(N = params_{args.params}, D = tokens_seen, L = val_loss; Huber loss "
          f"{fit.objective:.3g})")
    for name, value in fit.coefficients.items():
        lo_hi = fit.intervals.get(name)
        ci = f"  [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}] (95%, {args.bootstrap} bootstrap fits)" if lo_hi else ""
        print(f"  {name:<5} {value:>12.4g}{ci}")
    pred = scaling.predict(fit, N, D)
    residuals = [{**r, "predicted": float(p), "residual": float(np.log(r["L"] / p))}
                 for r, p in zip(runs, pred, strict=True)]
    print(f"  {'N':>10} {'D':>12} {'observed':>9} {'fitted':>9} {'log ratio':>10}  run")
    for r in residuals:
        print(f"  {r['N']:>10.4g} {r['D']:>12.4g} {r['L']:>9.4f} {r['predicted']:>9.4f} "
              f"{r['residual']:>+10.4f}  {r['run']}")
    report: dict[str, Any] = {"law": "E + A/N^alpha + B/D^beta", "params": args.params,
                              "fit": fit.to_dict(), "runs": residuals, "notes": notes}
    if at:
        n, d = at
        loss = float(scaling.predict(fit, n, d))
        report["prediction"] = {"N": n, "D": d, "loss": loss, "ppl": float(np.exp(loss))}
        print(f"prediction at N = {n:.4g}, D = {d:.4g}: loss {loss:.4f} (perplexity "
              f"{np.exp(loss):.2f})")
    if args.plot:
        print(f"plot written to {scaling.plot(fit, N, D, L, Path(args.plot))}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"fit written to {out}")
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


def _add_eval_flags(p: argparse.ArgumentParser, batch_default: str) -> None:
    """The blocks a command evaluates on (`sltrain eval`, `sltrain soup`): export.eval_set's."""
    p.add_argument("--seq-len", dest="data.seq_len", type=int, default=argparse.SUPPRESS,
                   metavar="N", help="block length (default and maximum: the model's context)")
    p.add_argument("--batch-size", dest="train.batch_size", type=int, default=argparse.SUPPRESS,
                   metavar="B", help=f"blocks per batch (default: {batch_default})")
    p.add_argument("--max-batches", type=int, metavar="K", help="only the first K batches of B blocks "
                   "(default: all); the run's B and K = its eval_batches give the blocks of its "
                   "val_ppl")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sltrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="pretrain a model on a corpus")
    p.add_argument("--config", help="a .toml/.yaml/.json config file; flags override it")
    p.add_argument("--resume", help="a run folder (newest checkpoint), a checkpoint folder, or "
                   "`auto`: continue --out-dir if it holds a checkpoint, else start it")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("memory", help="parameter count and training-state bytes, without training")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="storage dtype of weights, gradients and optimizer states")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_config_flags(p, sections=("model", "method", "optimizer"))
    p.set_defaults(func=cmd_memory)

    data = sub.add_parser(
        "data", help="tokenise a corpus once into memory-mapped token files; score and prune it",
        description="`sltrain data prepare` tokenises a corpus; `sltrain data score` scores a "
        "run's training blocks (EL2N, GraNd) and writes a pruned token folder.")
    actions = data.add_subparsers(dest="action", required=True, parser_class=_Parser)
    p = actions.add_parser(
        "prepare", help="tokenise and save",
        description="`sltrain data prepare` tokenises --data with --tokenizer into the cache that "
        "`sltrain train` reads (same flags: same data), or with --out DIR into a folder that "
        "`--data DIR` trains on. It takes the flags of `sltrain train`; those choosing the data, "
        "the vocabulary and the token budget (steps, batch size, --max-tokens) matter.")
    p.add_argument("--config", help="a .toml/.yaml/.json config file; flags override it")
    p.add_argument("--out", help="write a self-contained token folder here instead of the cache")
    _add_config_flags(p)
    p.set_defaults(func=cmd_data)
    p = actions.add_parser(
        "score", help="score a run's training blocks (EL2N or GraNd) and write a pruned token folder",
        description="Score every training block of the runs' data with each run's model, average "
        "the scores over the runs (Paul et al., 2021: several briefly trained seeds), keep --keep "
        "of the blocks and write OUT: scores.npy, scores.json and a token folder that "
        "`sltrain train --data OUT --seq-len (the runs')` trains on.")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT",
                   help="run folders (newest checkpoint) or checkpoint folders, same data")
    p.add_argument("--method", choices=["el2n", "grand"], default="el2n",
                   help="el2n: mean L2 error of the softmax (default); grand: per-block gradient "
                   "norm (one backward per block)")
    p.add_argument("--keep", type=float, required=True, metavar="FRACTION",
                   help="fraction of the blocks to keep, in (0, 1]")
    p.add_argument("--drop", choices=["easy", "hard", "random"], default="easy",
                   help="easy: drop the lowest scores (the paper's; default); hard: the highest; "
                   "random: a random subset of the same size (baseline)")
    p.add_argument("--out", required=True, help="the folder to write (new, empty or a token folder)")
    p.add_argument("--max-blocks", type=int, metavar="N", help="score only the first N blocks "
                   "(the pruned set is drawn from them)")
    p.add_argument("--batch-size", type=int, metavar="B", help="blocks per forward (default: "
                   "the run's)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of --drop random")
    p.set_defaults(func=cmd_data_score)

    p = sub.add_parser(
        "bench", help="run a suite of methods under one budget and write the comparison report",
        description="`sltrain bench SUITE` runs a suite (quick, paper, density, rank or a suite "
        "file); `sltrain bench report DIR` rebuilds the report from DIR/results.csv; "
        "`sltrain bench list` lists the built-in suites. Config flags apply to every run.")
    p.add_argument("suite", help="a built-in suite, a suite .toml file, `report` or `list`")
    p.add_argument("dir", nargs="?", help="with `report`: the folder holding results.csv")
    p.add_argument("--out", help="folder for runs, results.csv and report (default: "
                   "runs/bench-SUITE)")
    p.add_argument("--report-dir", help="write report.md and plots here instead")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; speeds are "
                   "only comparable at 1 on a CPU)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    p.add_argument("--only", nargs="+", help="run only these runs of the suite")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    _add_config_flags(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a trained model as a transformers LlamaForCausalLM folder",
                       description="Fold the newest checkpoint of RUN (or the checkpoint folder RUN) "
                       "into dense weights and write OUT: config.json, model.safetensors and the "
                       "tokenizer, loadable with transformers and lm-eval.")
    p.add_argument("run", help="a run folder (newest checkpoint) or a checkpoint folder")
    p.add_argument("--to", choices=["hf"], default="hf", help="format: hf (transformers; default)")
    p.add_argument("out", help="the folder to write (must be empty or new)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight dtype of the export (default float32)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT, overwriting "
                   "files of the same names")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="turn a Pre-LN run into its exact Pre-RMSNorm or "
                       "Pre-CRMSNorm form", description="Write the newest checkpoint of the pre_ln "
                       "run RUN (or the checkpoint folder RUN) to OUT as the equivalent dense run "
                       "with --to pre_rmsnorm (LLaMA's norm, exportable) or pre_crmsnorm (residual "
                       "stream in dim - 1): same logits, same gradients.")
    p.add_argument("run", help="a pre_ln run folder (newest checkpoint) or a checkpoint folder")
    p.add_argument("--to", choices=["pre_rmsnorm", "pre_crmsnorm"], required=True,
                   help="the target form")
    p.add_argument("--out", required=True, help="the new run folder to write")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("densify", help="fold a run (sparse, sltrain, ...) into a dense run folder "
                       "to fine-tune with --init-from",
                       description="Merge the newest checkpoint of RUN (or the checkpoint folder "
                       "RUN) to dense weights and write OUT: a run folder of method full with one "
                       "weights-only checkpoint, read by `sltrain train --init-from OUT`, "
                       "`sltrain eval` and `sltrain export`.")
    p.add_argument("run", help="a run folder (newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="the run folder to write (new or empty)")
    p.set_defaults(func=cmd_densify)

    p = sub.add_parser("eval", help="perplexity of a run, checkpoint or export on a data source",
                       description="Token-weighted mean loss and perplexity over consecutive blocks "
                       "of a data split, tokenised with the model's own tokenizer. A run or "
                       "checkpoint defaults to its own data, split and block length; an export "
                       "(from `sltrain export`) needs --data.")
    p.add_argument("model", help="a run folder, a checkpoint folder or an exported folder")
    p.add_argument("--data", dest="data.source", default=argparse.SUPPRESS, metavar="SOURCE",
                   help="any source `sltrain train --data` accepts (default: the run's; "
                   "required for an export)")
    p.add_argument("--text-field", dest="data.text_field", default=argparse.SUPPRESS, metavar="F",
                   help="the text field of JSON/Parquet records (default: the run's, or text)")
    p.add_argument("--val-fraction", dest="data.val_fraction", type=float,
                   default=argparse.SUPPRESS, metavar="X", help="the held-out tail of each document "
                   "(default: the run's, or 0.05; keep the run's to evaluate on its val split)")
    _add_eval_flags(p, batch_default="the run's, or 16")
    p.add_argument("--split", choices=["val", "train", "all"], default="val",
                   help="val: the held-out tail of each document (default); train: the rest; all: "
                   "every block of the source (train then val)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("health", help="activation kurtosis, weight spectra (PNG) and output "
                       "nuclear norm of a run's checkpoint")
    p.add_argument("run", help="a run folder (newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", help="folder for health.json and spectrum.png (default RUN/health)")
    p.add_argument("--blocks", type=int, default=16, help="validation blocks to measure on")
    p.add_argument("--layers", nargs="+", help="weights to plot (default: q_proj and down_proj "
                   "of the first and last block)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("schedule", help="print and plot a learning-rate schedule before training",
                       description="The learning rate by update step for the schedule flags of "
                       "`sltrain train`: the multiplier and lr at the phase boundaries, and with "
                       "--plot a PNG of lr vs step (--compare: every schedule on one figure).")
    p.add_argument("--config", help="a .toml/.yaml/.json config file; flags override it")
    for flag, key, kind in (("--steps", "train.steps", int), ("--lr", "optimizer.lr", float),
                            ("--batch-size", "train.batch_size", int),
                            ("--grad-accum", "train.grad_accum", int),
                            ("--seq-len", "data.seq_len", int)):
        p.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, metavar="N",
                       help=f"{key}, as in `sltrain train`")
    p.add_argument("--plot", metavar="OUT.png", help="write a plot of lr vs step here")
    p.add_argument("--compare", action="store_true", help="plot every schedule (each with these "
                   "flags) on one figure")
    p.add_argument("--print", action="store_true", help="also print every step as TSV")
    _add_config_flags(p, sections=("schedule",))
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("scaling", help="fit the scaling law L(N, D) = E + A/N^alpha + B/D^beta to runs",
                       description="Fit Chinchilla's parametric law (Hoffmann et al. 2022, Approach "
                       "3) to the val_loss, tokens_seen and parameter count of finished runs "
                       "(their summary.json): Huber loss on log L, L-BFGS from a grid of starts, "
                       "bootstrap intervals. Needs at least 5 runs, several N and D.")
    p.add_argument("action", choices=["fit"], help="fit: fit the law and report it")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding summary.json")
    p.add_argument("--params", choices=["avg", "final"], default="avg",
                   help="N is summary's params_avg (default) or params_final; runs without them "
                   "use params.trainable")
    p.add_argument("--predict", metavar="N,D", help="also print the fitted loss at N params, D tokens")
    p.add_argument("--bootstrap", type=int, default=200, metavar="K",
                   help="bootstrap refits for 95%% intervals (default 200; 0: none)")
    p.add_argument("--plot", metavar="OUT.png", help="write loss vs tokens with the fitted curves")
    p.add_argument("--json", metavar="OUT.json", help="write the fit, residuals and prediction")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("soup", help="average the weights of checkpoints into one dense model",
                       description="Model soups (Wortsman et al. 2022): fold every checkpoint to "
                       "dense weights and average them, all (uniform) or, best first, each one that "
                       "does not raise the soup's validation loss (greedy). The checkpoints need "
                       "one architecture and tokenizer; the soup is a dense run folder that "
                       "`sltrain eval` and `sltrain export` read.")
    p.add_argument("ingredients", nargs="+", metavar="CKPT_OR_RUN",
                   help="run folders (newest checkpoint) or checkpoint folders")
    p.add_argument("--out", required=True, help="the soup's run folder (new or empty)")
    p.add_argument("--recipe", choices=["uniform", "greedy"], default="uniform",
                   help="uniform: mean of all (default); greedy: best first, keep what helps")
    p.add_argument("--data", dest="data.source", default=argparse.SUPPRESS, metavar="SOURCE",
                   help="validation data (default: the first checkpoint's)")
    _add_eval_flags(p, batch_default="the first checkpoint's run's")
    p.set_defaults(func=cmd_soup)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"sltrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path no library check caught (a full disk, a vanished folder)
        from sltrain.files import os_error_line

        print(f"sltrain: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sltrain: interrupted", file=sys.stderr)
        return 130

