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
    [[checks]]                        # optional: claims the report tests against the results
    claim = "SLTrain within 5% of full-rank"
    metric = "val_ppl"                # val_ppl, peak_memory, est_memory, tok_per_s, params
    left = "sltrain"
    op = "<="
    right = "full"
    factor = 1.05                     # left op factor * right

Keys are `sltrain train` flag names (`per-layer-updates`, `lr`, `method.rank`, ...); every run's
config is validated before anything starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sltrain.config import RunConfig, flag_for, flag_table, load_config, tomllib
from sltrain.errors import UserError

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

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

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
class Suite:
    name: str
    path: Path
    description: str
    seeds: list[int]
    baseline: str
    variants: dict[str, dict[str, Any]]  # variant -> dotted overrides (common ones included)
    published: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def runs(self, seeds: list[int] | None = None, only: list[str] | None = None) -> list[RunSpec]:
        if only:
            unknown = sorted(set(only) - set(self.variants))
            if unknown:
                raise UserError(f"suite {self.name} has no run {', '.join(unknown)}; "
                                f"choose from {', '.join(self.variants)}")
        return [RunSpec(v, s, {**o, "train.seed": s})
                for v, o in self.variants.items() if not only or v in only
                for s in (seeds if seeds is not None else self.seeds)]


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


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (`quick`) or a suite file by path; every run's config validated."""
    builtin = builtin_suites()
    path = builtin.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise UserError(f"no suite '{name_or_path}': pass a suite file or one of "
                        f"{', '.join(sorted(builtin))} (`sltrain bench list`)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"suite file {path} cannot be parsed ({e}); fix its TOML syntax") from None
    unknown = sorted(set(data) - {"description", "seeds", "baseline", "common", "runs",
                                  "published", "checks"})
    if unknown:
        raise UserError(f"suite file {path}: unknown key {', '.join(unknown)}; allowed: "
                        "description, seeds, baseline, common, runs, published, checks")
    if not isinstance(data.get("runs"), dict) or not data["runs"]:
        raise UserError(f"suite file {path} has no runs; add a [runs.NAME] table per run")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"suite file {path}: seeds must be a non-empty list of integers")
    common = _dotted(data.get("common", {}), f"suite file {path} [common]")
    variants: dict[str, dict[str, Any]] = {}
    for name, table in data["runs"].items():
        where = f"suite file {path} [runs.{name}]"
        for variant, flags in _expand_sweep(name, dict(table), where).items():
            variants[variant] = {**common, **_dotted(flags, where)}
    baseline = data.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise UserError(f"suite file {path}: baseline '{baseline}' is not one of its runs "
                        f"({', '.join(variants)})")
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
    suite = Suite(path.stem, path, data.get("description", ""), seeds, baseline, variants,
                  data.get("published", {}), checks)
    for run in suite.runs(seeds=suite.seeds[:1]):
        try:
            validate_run(run.config())
        except UserError as e:
            raise UserError(f"suite file {path} [runs.{run.variant}]: {e}") from None
    return suite


def validate_run(cfg: RunConfig) -> None:
    """The checks `sltrain train` makes before touching data: ranks against shapes, optimizer."""
    from sltrain.model import build_model
    from sltrain.optim import validate

    validate(cfg, build_model(cfg, device="meta"))
