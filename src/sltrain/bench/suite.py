"""A benchmark suite: a TOML file naming the runs to compare, expanded into `sltrain train` runs.

    description = "..."
    seeds = [0, 1]
    baseline = "full"                 # speeds are reported relative to this run
    [common]                          # `sltrain train` flags shared by every run
    preset = "llama-cpu"
    steps = 300
    [runs.full]                       # one table per compared configuration
    method = "full"
    [runs.sltrain]
    method = "sltrain"
    sweep = { density = [0.01, 0.03] }   # optional: one run per value (sltrain-density0.01, ...)
    [published.full]                  # optional: numbers from the papers, per preset
    llama-60m = { ppl = 34.06, memory_gb = 0.36 }
    [tune]                            # optional: a learning-rate grid per run, at a short budget
    seeds = [0]
    lr-points = 4                     # published x 1/2, 1, 2, 4 (the run's lr at (points - 1) // 2)
    lr-step = 2
    widen = 2                         # a best rate on the grid's edge adds the next one out, twice
    steps = 100                       # other keys: `sltrain train` flags of the tuning runs
    [[checks]]                        # optional: claims the report tests against the results
    claim = "SLTrain within 5% of full-rank"
    metric = "val_ppl"                # val_ppl, peak_memory, est_memory, tok_per_s, params
    left = "sltrain"
    op = "<="
    right = "full"
    factor = 1.05                     # left op factor * right

Keys are `sltrain train` flag names (`per-layer-updates`, `lr`, `method.rank`, ...); every run's
config is validated before anything starts. With [tune], a run may also set `lr-grid = [...]`
(its own learning rates to try) and `tune = { flag = value }` (flags of its tuning runs only);
the stage itself is `bench.tune`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sltrain.config import RunConfig, flag_for, flag_table, load_config, tomllib
from sltrain.errors import UserError

SUITE_KEYS = ("description", "seeds", "baseline", "common", "runs", "tune", "published", "checks")
# Keys the tuning runs take from the final runs' config or from the grid.
TUNE_FIXED = ("data.", "optimizer.lr", "train.seed", "train.out_dir")
METRICS = ("val_ppl", "val_loss", "peak_memory", "est_memory", "tok_per_s", "params")
OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
       ">=": lambda a, b: a >= b}


@dataclass
class Check:
    claim: str
    metric: str
    left: str
    op: str
    right: str
    factor: float = 1.0


@dataclass
class RunSpec:
    """One training run of a suite: a configuration (`variant`) at one seed."""

    variant: str
    seed: int
    overrides: dict[str, Any]  # dotted config keys
    tag: str = ""  # a tuning run's learning rate, `lr0.002`
    # Where its lr comes from: "suite", "tuned", "fallback" (no tuning run finished), "grid" (a
    # tuning run).
    lr_source: str = "suite"

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.variant, self.tag, f"seed{self.seed}") if p)

    def flags(self) -> list[str]:
        """The `sltrain train` flags of this run, in the suite's order."""
        out: list[str] = []
        for key, value in self.overrides.items():
            if isinstance(value, bool):
                value = str(value).lower()
            elif isinstance(value, list):
                value = ",".join(str(v) for v in value)
            out += [flag_for(key), str(value)]
        return out

    def config(self) -> RunConfig:
        return load_config(None, self.overrides)


@dataclass
class Tune:
    """A suite's tuning stage: the learning rates each variant tries, and the tuning runs' seeds
    and flags (the short budget), `budget` for all and `own` per variant."""

    seeds: list[int]
    budget: dict[str, Any]
    points: int = 4
    step: float = 2.0
    widen: int = 2
    grids: dict[str, list[float]] = field(default_factory=dict)
    own: dict[str, dict[str, Any]] = field(default_factory=dict)

    def widen_at(self, edges: dict[str, float]) -> bool:
        """Add to each variant's grid the next rate out beyond the edge its best rate `edges[v]`
        lies on (x or / step); whether any grid grew."""
        grew = False
        for variant, best in edges.items():
            grid = self.grids[variant]
            if best == grid[-1]:
                grid.append(float(f"{best * self.step:.6g}"))
            elif best == grid[0]:
                grid.insert(0, float(f"{best / self.step:.6g}"))
            else:
                continue
            grew = True
        return grew


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    seeds: list[int]
    baseline: str
    variants: dict[str, dict[str, Any]]  # variant -> dotted overrides (common ones included)
    published: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    tune: Tune | None = None

    def chosen(self, only: list[str] | None = None) -> list[str]:
        """The variants `--only` names (all when None), refusing names the suite lacks."""
        unknown = sorted(set(only or ()) - set(self.variants))
        if unknown:
            raise UserError(f"suite {self.name} has no run {', '.join(unknown)}; "
                            f"choose from {', '.join(self.variants)}")
        return [v for v in self.variants if not only or v in only]

    def runs(self, seeds: list[int] | None = None, only: list[str] | None = None,
             lrs: dict[str, float | str | None] | None = None) -> list[RunSpec]:
        """The final runs; with a tuning stage, each at its variant's tuned rate in `lrs` (None:
        no tuning run finished, so the suite's own rate) and evaluated on the report slice."""
        out = []
        for v in self.chosen(only):
            extra: dict[str, Any] = {}
            source = "suite"
            if self.tune is not None:
                lr = (lrs or {}).get(v)
                source = "fallback" if lr is None else "tuned"
                extra = {"data.val_slice": "report", **({} if lr is None else {"optimizer.lr": lr})}
            out += [RunSpec(v, s, {**self.variants[v], **extra, "train.seed": s}, lr_source=source)
                    for s in (seeds if seeds is not None else self.seeds)]
        return out

    def tune_runs(self, only: list[str] | None = None) -> list[RunSpec]:
        """The tuning stage's runs: each variant at each rate of its grid and each tuning seed,
        with the [tune] flags, evaluated on the tune slice."""
        t = self.tune
        if t is None:
            return []
        return [RunSpec(v, s, {**self.variants[v], **t.budget, **t.own[v], "optimizer.lr": lr,
                               "data.val_slice": "tune", "train.seed": s}, lr_tag(lr), "grid")
                for v in self.chosen(only) for lr in t.grids[v] for s in t.seeds]


def builtin_suites() -> dict[str, Path]:
    folder = resources.files("sltrain.bench") / "suites"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def list_suites() -> list[Suite]:
    """The built-in suites, by name (`sltrain bench list`)."""
    return [load_suite(str(path)) for _, path in sorted(builtin_suites().items())]


def _dotted(table: dict[str, Any], where: str) -> dict[str, Any]:
    flags = flag_table()
    out = {}
    for k, v in table.items():
        if k not in flags:
            raise UserError(f"{where}: '{k}' is not a `sltrain train` flag; see "
                            "`sltrain train --help` for the valid names")
        out[flags[k]] = v
    return out


def _expand_sweep(name: str, table: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    sweep = table.pop("sweep", None)
    if not sweep:
        return {name: table}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise UserError(f"{where}: sweep must map flags to non-empty lists, e.g. "
                        "sweep = {{ density = [0.01, 0.03] }}")
    out = {}
    for values in itertools.product(*sweep.values()):
        label = "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                         for k, v in zip(sweep, values, strict=True))
        out[f"{name}-{label}"] = {**table, **dict(zip(sweep, values, strict=True))}
    return out


def _read(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    builtin = builtin_suites()
    path = builtin.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise UserError(f"no suite '{name_or_path}': pass a suite file or one of "
                        f"{', '.join(sorted(builtin))} (`sltrain bench list`)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"suite file {path} cannot be parsed ({e}); fix its TOML syntax") from None
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        raise UserError(f"suite file {path}: unknown key {', '.join(unknown)}; allowed: "
                        f"{', '.join(SUITE_KEYS)}")
    if not isinstance(data.get("runs"), dict) or not data["runs"]:
        raise UserError(f"suite file {path} has no runs; add a [runs.NAME] table per run")
    return path, data


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise UserError(f"{where}: seeds must be a non-empty list of integers, e.g. [0, 1]")
    return value


def _checks(data: dict[str, Any], variants: dict[str, Any], path: Path) -> list[Check]:
    checks = []
    for i, c in enumerate(data.get("checks", [])):
        try:
            check = Check(**c)
        except TypeError as e:
            raise UserError(f"suite file {path}: check {i + 1} is malformed ({e}); it needs "
                            "claim, metric, left, op, right and optionally factor") from None
        if check.metric not in METRICS or check.op not in OPS:
            raise UserError(f"suite file {path}: check '{check.claim}' needs metric in "
                            f"{', '.join(METRICS)} and op in {', '.join(OPS)}")
        if not {check.left, check.right} <= set(variants):
            raise UserError(f"suite file {path}: check '{check.claim}' names a run the suite "
                            f"does not have; runs: {', '.join(variants)}")
        checks.append(check)
    return checks


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (`quick`) or a suite file by path; every run's config validated."""
    path, data = _read(name_or_path)
    seeds = _seeds(data.get("seeds", [0]), f"suite file {path}")
    common = _dotted(data.get("common", {}), f"suite file {path} [common]")
    tune = _tune(data.get("tune"), f"suite file {path} [tune]")
    variants: dict[str, dict[str, Any]] = {}
    tuning: dict[str, dict[str, Any]] = {}  # variant -> its lr-grid and tune flags
    for name, table in data["runs"].items():
        where = f"suite file {path} [runs.{name}]"
        table = dict(table)
        own = {k: table.pop(k) for k in ("lr-grid", "tune") if k in table}
        if own and tune is None:
            raise UserError(f"{where}: {', '.join(own)} needs a [tune] table in the suite")
        for variant, flags in _expand_sweep(name, table, where).items():
            variants[variant] = {**common, **_dotted(flags, where)}
            tuning[variant] = own
    baseline = data.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise UserError(f"suite file {path}: baseline '{baseline}' is not one of its runs "
                        f"({', '.join(variants)})")
    suite = Suite(path.stem, path, data.get("description", ""), seeds, baseline, variants,
                  data.get("published", {}), _checks(data, variants, path))
    for run in suite.runs(seeds=suite.seeds[:1]):
        cfg = _validated(run, f"suite file {path} [runs.{run.variant}]")
        if tune is not None:
            _add_grid(tune, run.variant, cfg, tuning[run.variant],
                      f"suite file {path} [runs.{run.variant}]")
    suite.tune = tune
    if tune is not None:  # one tuning run per variant: only the lr differs between the others
        for run in suite.tune_runs():
            if run.tag == lr_tag(tune.grids[run.variant][0]) and run.seed == tune.seeds[0]:
                _validated(run, f"suite file {path} [tune] (run {run.name})")
    return suite


def lr_tag(lr: float) -> str:
    """A tuning run's name part: `lr0.002`."""
    return f"lr{lr:g}"


def lr_grid(lr: float, points: int, step: float) -> list[float]:
    """`points` rates `step` apart with `lr` the ((points - 1) // 2)-th from the lowest: 4 points
    of step 2 are lr x 1/2, 1, 2, 4 (6 significant digits)."""
    below = (points - 1) // 2
    return [float(f"{lr * step ** (k - below):.6g}") for k in range(points)]


def _tune(table: Any, where: str) -> Tune | None:
    """The [tune] table: its own keys, then `sltrain train` flags of the tuning runs."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table of lr-points, lr-step, widen, seeds and train "
                        "flags")
    table = dict(table)
    points, step = table.pop("lr-points", 4), table.pop("lr-step", 2.0)
    if not isinstance(points, int) or isinstance(points, bool) or points < 2:
        raise UserError(f"{where}: lr-points = {points!r} must be a whole number of at least 2 "
                        "(4 or more for a comparison)")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not step > 1:
        raise UserError(f"{where}: lr-step = {step!r} must be a ratio above 1 between "
                        "neighbouring rates, e.g. 2")
    widen = table.pop("widen", 2)
    if not isinstance(widen, int) or isinstance(widen, bool) or widen < 0:
        raise UserError(f"{where}: widen = {widen!r} must be a whole number of grid points to add "
                        "beyond an edge (0: never)")
    seeds = _seeds(table.pop("seeds", [0]), where)
    return Tune(seeds, _tune_flags(table, where), points, float(step), widen)


def _tune_flags(table: dict[str, Any], where: str) -> dict[str, Any]:
    flags = _dotted(table, where)
    # Both stages must read the same validation stream, so that its halves are the same tokens.
    fixed = [k for k in flags if k.startswith(TUNE_FIXED)]
    if fixed:
        raise UserError(f"{where}: {flag_for(fixed[0])} cannot differ in the tuning runs (they "
                        "read the final runs' data and take lr and seed from the grid); set it in "
                        "[common] or the run's table")
    return flags


def _add_grid(tune: Tune, variant: str, cfg: RunConfig, own: dict[str, Any], where: str) -> None:
    """The variant's rates: its `lr-grid`, else the [tune] grid around its own lr."""
    if cfg.data.val_slice != "all":
        raise UserError(f"{where}: val-slice is the tuning stage's to set (tune, then report); "
                        "drop it")
    lr = cfg.optimizer.lr
    grid = own.get("lr-grid")
    if grid is None:
        grid = lr_grid(lr, tune.points, tune.step)
    elif not (isinstance(grid, list) and len(grid) >= 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in grid)):
        raise UserError(f"{where}: lr-grid = {grid!r} must list two or more positive rates")
    grid = sorted({float(x) for x in grid})
    if not grid[0] <= lr <= grid[-1]:
        raise UserError(f"{where}: lr-grid {grid} does not bracket the run's lr {lr:g}; include "
                        "rates on both sides of it")
    flags = own.get("tune", {})
    if not isinstance(flags, dict):
        raise UserError(f"{where}: tune = {flags!r} must be a table of flags, e.g. "
                        "tune = { reset-every = 20 }")
    tune.grids[variant] = grid
    tune.own[variant] = _tune_flags(flags, f"{where} tune")


def _validated(run: RunSpec, where: str) -> RunConfig:
    try:
        cfg = run.config()
        validate_run(cfg)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


def validate_run(cfg: RunConfig) -> None:
    """The checks `sltrain train` makes before touching data: ranks against shapes, optimizer."""
    from sltrain.model import build_model
    from sltrain.optim import validate

    validate(cfg, build_model(cfg, device="meta"))
