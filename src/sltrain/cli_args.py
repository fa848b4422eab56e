"""The arguments of each `sltrain` subcommand, and the config flags generated from the registries.

`build_parser(handlers)` pairs each subcommand's parser with its handler (sltrain/cli.py); a flag
per config key comes from `config.section_fields`, so a registered option is a flag at once.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from sltrain.config import RunConfig, flag_table, section_fields
from sltrain.errors import UserError
from sltrain.registry import Registry

Parsers = dict[str, argparse.ArgumentParser]  # "data score" -> the parser of `sltrain data score`
_CONFIG_HELP = "a .toml/.yaml/.json config file; flags override it"
_RUN_HELP = "a run folder (newest checkpoint) or a checkpoint folder"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see `{self.prog} --help`")


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ()) -> None:
    """A flag per key of the config `sections` (default: all), read from the sections and the
    registries (config.section_fields), so an option a registered entry declares is a flag too."""
    spellings: dict[str, list[str]] = defaultdict(list)
    for flag, key in flag_table().items():
        spellings[key].append(flag)
    for section in sections or tuple(RunConfig.model_fields):
        group = parser.add_argument_group(f"config section [{section}]")
        registry = getattr(RunConfig.model_fields[section].annotation, "registry", None)
        for field, info in section_fields(section).items():
            key = f"{section}.{field}"
            default = info.get_default(call_default_factory=True)
            what = _entry_list(registry) if registry and field == registry.key else info.description
            text = f"{key}: {what}" if what else key
            if "default" not in (info.description or ""):
                text += f" (default: {default})"
            # A bare boolean flag means true (`--per-layer-updates`); `--refactor false` also works.
            switch = {"nargs": "?", "const": True} if isinstance(default, bool) else {}
            flags = sorted({f"--{f}" for f in spellings[key]}, key=lambda f: (len(f), "_" in f))
            group.add_argument(*flags, dest=key, default=argparse.SUPPRESS,
                               metavar=(section if field == "name" else field).upper(),
                               help=text.replace("%", "%%"), **switch)  # argparse %-formats help


def _entry_list(registry: Registry) -> str:
    """The registered names with their one-line docs, for the help of `--method` and the like."""
    return "one of " + " | ".join(f"{e.name}: {e.doc}" if e.doc else e.name
                                  for e in registry.entries())


def add_eval_flags(p: argparse.ArgumentParser, batch_default: str) -> None:
    """The blocks a command evaluates on (`sltrain eval`, `sltrain soup`): export.eval_set's."""
    p.add_argument("--seq-len", dest="data.seq_len", type=int, default=argparse.SUPPRESS,
                   metavar="N", help="block length (default and maximum: the model's context)")
    p.add_argument("--batch-size", dest="train.batch_size", type=int, default=argparse.SUPPRESS,
                   metavar="B", help=f"blocks per batch (default: {batch_default})")
    p.add_argument("--max-batches", type=int, metavar="K", help="only the first K batches of B blocks "
                   "(default: all); the run's B and K = its eval_batches give the blocks of its "
                   "val_ppl")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")


def _train_parser(sub: Any) -> Parsers:
    p = sub.add_parser("train", help="pretrain a model on a corpus")
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument("--resume", help="a run folder (newest checkpoint), a checkpoint folder, or "
                   "`auto`: continue --out-dir if it holds a checkpoint, else start it")
    add_config_flags(p)
    return {"train": p}


def _memory_parser(sub: Any) -> Parsers:
    p = sub.add_parser("memory", help="parameter count, training-state bytes and the predicted "
                       "peak of a step, without training; --budget: which setups fit")
    p.add_argument("--precision", choices=["fp32", "bf16-mixed", "bf16"], default="bf16",
                   help="what `train --precision` stores: bf16 (the papers' setting, default) holds "
                   "2-byte weights, gradients and states; fp32 and bf16-mixed 4-byte ones")
    p.add_argument("--dtype", dest="precision", type=_storage_dtype, metavar="{float32,bfloat16}",
                   help="the old spelling of --precision: float32 = fp32, bfloat16 = bf16")
    p.add_argument("--json", action="store_true", help="print JSON")
    _peak_flags(p)
    add_config_flags(p, sections=("model", "method", "optimizer"))
    return {"memory": p}


def _peak_flags(p: argparse.ArgumentParser) -> None:
    """The run shape of `sltrain memory`'s predicted peak, spelled as `sltrain train` does."""
    peak = p.add_argument_group("predicted peak (as `sltrain train` spells them)")
    for flag, key, kind, what in (
            ("--batch-size", "train.batch_size", int, "micro-batch, in sequences (default: 16)"),
            ("--seq-len", "data.seq_len", int, "tokens a sequence (default: 128)"),
            ("--grad-accum", "train.grad_accum", int, "micro-batches an update (default: 1)"),
            ("--activation-checkpointing", "train.activation_checkpointing", str,
             "none (default), full or every:K"),
            ("--chunk-tokens", "loss.chunk_tokens", int,
             "logits rows the loss forms at a time; 0 = full logits (default: 1024)")):
        peak.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS,
                          metavar=key.split(".")[1].upper(), help=what)
    peak.add_argument("--budget", metavar="SIZE", help="instead: every method x optimizer x "
                      "per-layer x precision x checkpointing setup whose predicted peak fits SIZE "
                      "(24GiB, 24GB, 500MiB, 500MB) at --seq-len, each at its largest "
                      "micro-batch, ranked; --method, --optimizer and --precision are ignored")


def _storage_dtype(value: str) -> str:
    precisions = {"float32": "fp32", "bfloat16": "bf16"}
    if value not in precisions:
        raise argparse.ArgumentTypeError(f"invalid choice: '{value}' (choose from float32, bfloat16; "
                                         "or --precision fp32|bf16-mixed|bf16)")
    return precisions[value]


def _data_parser(sub: Any) -> Parsers:
    data = sub.add_parser(
        "data", help="tokenise a corpus once into memory-mapped token files; score and prune it",
        description="`sltrain data prepare` tokenises a corpus; `sltrain data score` scores a "
        "run's training blocks (EL2N, GraNd) and writes a pruned token folder.")
    actions = data.add_subparsers(dest="action", required=True, parser_class=Parser)
    p = actions.add_parser(
        "prepare", help="tokenise and save",
        description="`sltrain data prepare` tokenises --data with --tokenizer into the cache that "
        "`sltrain train` reads (same flags: same data), or with --out DIR into a folder that "
        "`--data DIR` trains on. It takes the flags of `sltrain train`; those choosing the data, "
        "the vocabulary and the token budget (steps, batch size, --max-tokens) matter.")
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument("--out", help="write a self-contained token folder here instead of the cache")
    add_config_flags(p)
    return {"data prepare": p, "data score": _data_score_parser(actions)}


def _data_score_parser(actions: Any) -> argparse.ArgumentParser:
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
    return p


def _bench_parser(sub: Any) -> Parsers:
    p = sub.add_parser(
        "bench", help="run a suite of methods under one budget and write the comparison report",
        description="`sltrain bench SUITE` runs a suite (quick, quick-tuned, paper, density, rank or "
        "a suite file; one with [tune] first picks each run's learning rate); "
        "`sltrain bench report DIR` rebuilds the report from DIR/results.csv; "
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
    add_config_flags(p)
    return {"bench": p}


def _export_parser(sub: Any) -> Parsers:
    p = sub.add_parser("export", help="write a trained model as a transformers LlamaForCausalLM folder",
                       description="Fold the newest checkpoint of RUN (or the checkpoint folder RUN) "
                       "into dense weights and write OUT: config.json, model.safetensors and the "
                       "tokenizer, loadable with transformers and lm-eval.")
    p.add_argument("run", help=_RUN_HELP)
    p.add_argument("--to", choices=["hf"], default="hf", help="format: hf (transformers; default)")
    p.add_argument("out", help="the folder to write (must be empty or new)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight dtype of the export (default float32)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT, overwriting "
                   "files of the same names")
    return {"export": p}


def _convert_parser(sub: Any) -> Parsers:
    p = sub.add_parser("convert", help="turn a Pre-LN run into its exact Pre-RMSNorm or "
                       "Pre-CRMSNorm form", description="Write the newest checkpoint of the pre_ln "
                       "run RUN (or the checkpoint folder RUN) to OUT as the equivalent dense run "
                       "with --to pre_rmsnorm (LLaMA's norm, exportable) or pre_crmsnorm (residual "
                       "stream in dim - 1): same logits, same gradients.")
    p.add_argument("run", help="a pre_ln run folder (newest checkpoint) or a checkpoint folder")
    p.add_argument("--to", choices=["pre_rmsnorm", "pre_crmsnorm"], required=True,
                   help="the target form")
    p.add_argument("--out", required=True, help="the new run folder to write")
    return {"convert": p}


def _densify_parser(sub: Any) -> Parsers:
    p = sub.add_parser("densify", help="fold a run (sparse, sltrain, ...) into a dense run folder "
                       "to fine-tune with --init-from",
                       description="Merge the newest checkpoint of RUN (or the checkpoint folder "
                       "RUN) to dense weights and write OUT: a run folder of method full with one "
                       "weights-only checkpoint, read by `sltrain train --init-from OUT`, "
                       "`sltrain eval` and `sltrain export`.")
    p.add_argument("run", help=_RUN_HELP)
    p.add_argument("--out", required=True, help="the run folder to write (new or empty)")
    return {"densify": p}


def _eval_parser(sub: Any) -> Parsers:
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
    add_eval_flags(p, batch_default="the run's, or 16")
    p.add_argument("--split", choices=["val", "train", "all"], default="val",
                   help="val: the held-out tail of each document (default); train: the rest; all: "
                   "every block of the source (train then val)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return {"eval": p}


def _health_parser(sub: Any) -> Parsers:
    p = sub.add_parser("health", help="activation kurtosis, weight spectra (PNG) and output "
                       "nuclear norm of a run's checkpoint")
    p.add_argument("run", help=_RUN_HELP)
    p.add_argument("--out", help="folder for health.json and spectrum.png (default RUN/health)")
    p.add_argument("--blocks", type=int, default=16, help="validation blocks to measure on")
    p.add_argument("--layers", nargs="+", help="weights to plot (default: q_proj and down_proj "
                   "of the first and last block)")
    return {"health": p}


def _schedule_parser(sub: Any) -> Parsers:
    p = sub.add_parser("schedule", help="print and plot a learning-rate schedule before training",
                       description="The learning rate by update step for the schedule flags of "
                       "`sltrain train`: the multiplier and lr at the phase boundaries, and with "
                       "--plot a PNG of lr vs step (--compare: every schedule on one figure).")
    p.add_argument("--config", help=_CONFIG_HELP)
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
    add_config_flags(p, sections=("schedule",))
    return {"schedule": p}


def _number_pair(text: str) -> tuple[float, float]:
    try:
        n, d = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not N,D; pass e.g. --predict 1e8,2e9") from None
    return n, d


def _scaling_parser(sub: Any) -> Parsers:
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
    p.add_argument("--predict", metavar="N,D", type=_number_pair,
                   help="also print the fitted loss at N params, D tokens")
    p.add_argument("--bootstrap", type=int, default=200, metavar="K",
                   help="bootstrap refits for 95%% intervals (default 200; 0: none)")
    p.add_argument("--plot", metavar="OUT.png", help="write loss vs tokens with the fitted curves")
    p.add_argument("--json", metavar="OUT.json", help="write the fit, residuals and prediction")
    return {"scaling": p}


def _soup_parser(sub: Any) -> Parsers:
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
    add_eval_flags(p, batch_default="the first checkpoint's run's")
    return {"soup": p}


SUBCOMMANDS: tuple[Callable[[Any], Parsers], ...] = (
    _train_parser, _memory_parser, _data_parser, _bench_parser, _export_parser, _convert_parser,
    _densify_parser, _eval_parser, _health_parser, _schedule_parser, _scaling_parser, _soup_parser)


def build_parser(handlers: Mapping[str, Callable[[argparse.Namespace], int]],
                 description: str = "") -> argparse.ArgumentParser:
    """The `sltrain` parser; `handlers` maps each subcommand ("train", "data score", ...) to the
    function its parsed arguments go to (as `args.func`)."""
    parser = Parser(prog="sltrain", description=description)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in SUBCOMMANDS:
        for name, p in add(sub).items():
            p.set_defaults(func=handlers[name])
    return parser
