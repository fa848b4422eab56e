"""Run a suite: each run in its own `sltrain train` process, resumable, and collected into a CSV.

A finished run (summary.json with status "finished") is skipped; an interrupted one (a checkpoint
but no finished summary) is resumed; a crashed run is recorded with its error and the suite goes
on. Results are rewritten to `results.csv` after every run, so a suite stopped at any point loses
at most the runs in flight (and those resume from their last checkpoint).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sltrain.bench.report import render
from sltrain.bench.suite import RunSpec, Suite, load_suite
from sltrain.bench.tune import TUNE_DIR, choose, tuned_lrs
from sltrain.config import RunConfig, flag_for, flatten, load_config, saved_config
from sltrain.errors import UserError
from sltrain.files import read_json, read_jsonl, writable_dir
from sltrain.run.checkpoint import list_checkpoints

COLUMNS = [
    "suite", "run", "variant", "seed", "status", "method", "optimizer", "lr", "lr_source",
    "per_layer_updates",
    "preset", "steps", "tokens", "val_loss", "val_ppl", "params_total", "params_trainable",
    "est_memory_bytes", "peak_memory_bytes", "peak_memory_kind", "tok_per_s", "wall_time_s",
    "device", "jobs", "baseline", "published_ppl", "published_memory_gb", "val_curve",
    "command", "error",
]


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    try:
        return read_json(path, "") if path.is_file() else None
    except UserError:  # damaged: the run counts as unfinished
        return None


def _finished(run_dir: Path) -> bool:
    s = _read_summary(run_dir)
    return s is not None and s.get("status") == "finished"


def _config_clash(run_dir: Path, wanted: dict[str, Any]) -> list[str]:
    """Keys where the config saved in `run_dir` differs from the one the suite asks for."""
    if not (run_dir / "config.json").is_file():
        return []
    # A key the saved config lacks (a run made before the key existed) counts as its default.
    saved_flat = {**flatten(RunConfig().to_dict()), **flatten(saved_config(run_dir))}
    wanted_flat = flatten(wanted)
    ignore = ("train.out_dir", "train.progress")
    return [k for k in sorted(set(saved_flat) | set(wanted_flat))
            if k not in ignore and saved_flat.get(k) != wanted_flat.get(k)]


def _val_curve(run_dir: Path) -> str:
    """'tokens:val_loss' pairs of the evaluations in metrics.jsonl, space-separated."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return ""
    points = []
    for r in read_jsonl(path, "delete that run's folder to run it again", torn_tail_ok=True):
        if "val_loss" in r:
            points.append(f"{r['tokens']}:{r['val_loss']:.5f}")
    return " ".join(points)


def _previous_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != COLUMNS:
                return {}  # written by another version: rebuilt from the run folders
            return {r["run"]: r for r in reader}
    except (ValueError, csv.Error):  # damaged (UnicodeDecodeError is a ValueError): rebuilt too
        return {}


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:500]


class SuiteRunner:
    """Runs `runs` of `suite` into `out`: the final runs, or with `stage="tune"` the tuning runs
    (into the suite folder's tune/)."""

    def __init__(self, suite: Suite, out: Path, runs: list[RunSpec], jobs: int = 1,
                 extra: dict[str, Any] | None = None, progress: bool = True,
                 stage: str = "final") -> None:
        if jobs < 1:
            raise UserError(f"--jobs {jobs} is not a number of parallel runs; pass 1 or more")
        self.suite, self.out, self.runs, self.jobs = suite, out, runs, jobs
        self.extra = extra or {}
        self.progress, self.stage = progress, stage
        # Rows of earlier invocations (other seeds, `--only` subsets) stay in results.csv.
        self.rows: dict[str, dict[str, Any]] = _previous_rows(out / "results.csv")
        every = suite.tune_runs() if stage == "tune" else suite.runs()
        self.order = [r.name for r in every] + [r.name for r in runs]
        if stage == "tune":  # rows of another grid or other tuning seeds would skew the choice
            self.rows = {k: v for k, v in self.rows.items() if k in self.order}
        self.stopping = threading.Event()  # set by Ctrl-C: runs not yet started are skipped
        self.steps: dict[str, int] = {}  # update steps of each run, for the progress bar
        self._lock = threading.Lock()

    # ---- one run -----------------------------------------------------------------------------
    def run_dir(self, run: RunSpec) -> Path:
        return self.out / "runs" / run.name

    def overrides(self, run: RunSpec) -> dict[str, Any]:
        return {**run.overrides, **self.extra}

    def command(self, run: RunSpec) -> list[str]:
        """The `sltrain train` arguments of `run` (a fresh start)."""
        spec = RunSpec(run.variant, run.seed, self.overrides(run))
        return ["train", *spec.flags(), "--out-dir", str(self.run_dir(run))]

    def check_reusable(self) -> None:
        """Refuse to mix results: a run folder made by a different config must not be reused."""
        writable_dir(self.out, "--out", create=False)
        for run in self.runs:
            wanted = load_config(None, self.overrides(run)).to_dict()
            clash = _config_clash(self.run_dir(run), wanted)
            if clash:
                raise UserError(
                    f"{self.run_dir(run)} was made with a different config ({', '.join(clash[:5])}"
                    f"{', ...' if len(clash) > 5 else ''}); use another --out or delete that "
                    "folder to run it again")

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.jobs > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.jobs)))
            gpus = _gpu_count()
            if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        return env

    def execute(self, run: RunSpec, slot: int = 0) -> dict[str, Any]:
        run_dir = self.run_dir(run)
        log = self.out / "logs" / f"{run.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if not _finished(run_dir):
            args = (["train", "--resume", str(run_dir)] if list_checkpoints(run_dir)
                    else self.command(run))
            with log.open("a") as f:
                f.write(f"$ sltrain {' '.join(args)}\n")
                f.flush()
                proc = subprocess.run([sys.executable, "-m", "sltrain", *args, "--progress", "false"],
                                      stdout=f, stderr=subprocess.STDOUT, env=self._env(slot))
            if not _finished(run_dir):
                if proc.returncode == 130 or self.stopping.is_set():
                    return self.row(run, status="interrupted", error="stopped; rerun to resume")
                return self.row(run, status="failed", error=f"exit {proc.returncode}: "
                                f"{_last_error(log)}")
        return self.row(run, status="finished")

    def row(self, run: RunSpec, status: str, error: str = "") -> dict[str, Any]:
        cfg = load_config(None, self.overrides(run))
        published = self.suite.published.get(run.variant, {}).get(cfg.model.preset, {})
        row: dict[str, Any] = {
            "suite": self.suite.name, "run": run.name, "variant": run.variant, "seed": run.seed,
            "status": status, "method": cfg.method.name, "optimizer": cfg.optimizer.name,
            "lr": cfg.optimizer.lr, "lr_source": run.lr_source,
            "per_layer_updates": cfg.optimizer.per_layer_updates, "preset": cfg.model.preset,
            "steps": cfg.train.steps, "jobs": self.jobs,
            "baseline": run.variant == self.suite.baseline,
            "published_ppl": published.get("ppl", ""),
            "published_memory_gb": published.get("memory_gb", ""),
            "command": "sltrain " + " ".join(self.command(run)), "error": error,
        }
        summary = _read_summary(self.run_dir(run)) if status == "finished" else None
        if summary:
            row.update(
                tokens=summary["tokens_seen"], val_loss=summary["val_loss"],
                val_ppl=summary["val_ppl"], params_total=summary["params"]["total"],
                params_trainable=summary["params"]["trainable"],
                est_memory_bytes=summary["estimated_state_bytes"]["total"],
                peak_memory_bytes=summary["peak_memory_bytes"],
                peak_memory_kind=summary["peak_memory_kind"],
                # A run resumed at its last step has no steps to time in its last process.
                tok_per_s=summary["tok_per_s"] or "",
                wall_time_s=summary["wall_time_s"], device=summary["device"],
                val_curve=_val_curve(self.run_dir(run)))
        return row

    # ---- the suite ---------------------------------------------------------------------------
    def write_results(self) -> Path:
        path = self.out / "results.csv"
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            names = list(dict.fromkeys([*self.order, *self.rows]))
            for name in names:
                if name in self.rows:
                    writer.writerow({c: self.rows[name].get(c, "") for c in COLUMNS})
        tmp.replace(path)
        return path

    def _steps_done(self, run: RunSpec) -> int:
        path = self.run_dir(run) / "metrics.jsonl"
        if _finished(self.run_dir(run)):
            return self.steps[run.name]
        try:
            with path.open() as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def run(self) -> list[dict[str, Any]]:
        writable_dir(self.out, "--out")
        shutil.copyfile(self.suite.path, self.out / "suite.toml")
        self.steps = {r.name: load_config(None, self.overrides(r)).train.steps for r in self.runs}
        bar = tqdm(total=sum(self.steps.values()), unit="step", disable=not self.progress, dynamic_ncols=True,
                   desc=f"bench {self.suite.name}" + (" (tuning)" if self.stage == "tune" else ""))
        slots = list(range(self.jobs))
        done_now: set[str] = set()

        def work(run: RunSpec) -> None:
            if self.stopping.is_set():
                return
            with self._lock:
                slot = slots.pop()
            try:
                row = self.execute(run, slot)
            finally:
                with self._lock:
                    slots.append(slot)
            with self._lock:
                self.rows[run.name] = row
                done_now.add(run.name)
                self.write_results()
                if row["status"] != "finished":
                    bar.write(f"{run.name} failed: {row['error']}")

        pool = ThreadPoolExecutor(self.jobs)
        futures = [pool.submit(work, r) for r in self.runs]
        try:
            while not all(f.done() for f in futures):
                done = sum(self._steps_done(r) for r in self.runs)
                finished = sum(1 for r in self.runs if r.name in done_now)
                bar.set_postfix_str(f"{finished}/{len(self.runs)} runs")
                bar.update(done - bar.n)
                time.sleep(0.5)
        except KeyboardInterrupt:
            # The runs in flight got the same SIGINT: they save a checkpoint and exit.
            self.stopping.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for f in futures:
            if not f.cancelled():
                f.result()
        bar.update(sum(self._steps_done(r) for r in self.runs) - bar.n)
        bar.close()
        self.write_results()
        return [self.rows[r.name] for r in self.runs if r.name in done_now]


def _checked_extra(suite: Suite, overrides: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """The config flags for every run and whether to show the suite's progress bar."""
    extra = dict(overrides or {})
    progress = extra.pop("train.progress", True) not in (False, "false", "0", "no")
    for key in ("train.seed", "train.out_dir"):
        if key in extra:
            raise UserError(f"a suite sets {key} for each run; use --seeds and --out instead")
    for key in ("optimizer.lr", "data.val_slice") if suite.tune else ():
        if key in extra:
            raise UserError(f"suite {suite.name} has a tuning stage, which sets {flag_for(key)} "
                            "for each run; drop it")
    return extra, progress


def _tune_stage(suite: Suite, out: Path, only: list[str] | None, jobs: int, extra: dict[str, Any],
                progress: bool, dry_run: bool) -> tuple[SuiteRunner, dict[str, Any]]:
    """Run (or for a dry run, list) the tuning runs into `out`/tune; return their runner and each
    chosen variant's tuned rate (None: none finished; PENDING: a dry run before tuning).

    A variant whose best rate is the lowest or highest of its grid gets the next rate beyond that
    edge, up to [tune] `widen` times (a dry run lists the first grid only)."""
    for round_ in range(suite.tune.widen + 1):
        runner = SuiteRunner(suite, out / TUNE_DIR, suite.tune_runs(only), jobs, extra, progress,
                             stage="tune")
        if dry_run:
            break
        runner.check_reusable()
        runner.run()
        done = [runner.rows[r.name] for r in runner.runs if r.name in runner.rows]
        edges = {v: c.lr for v, c in choose(done).items() if c.at_edge}
        if runner.stopping.is_set() or round_ == suite.tune.widen or not suite.tune.widen_at(edges):
            break
    return runner, tuned_lrs(suite, runner.rows, only, pending=dry_run)


def run_suite(name: str, out: Path | None = None, seeds: list[int] | None = None,
              only: list[str] | None = None, jobs: int = 1, overrides: dict[str, Any] | None = None,
              dry_run: bool = False, report_dir: Path | None = None) -> dict[str, Any]:
    """`sltrain bench SUITE`: run the suite `name` (built-in or a file) into `out` (default
    runs/bench-SUITE) with `overrides` on every run, then write its report. With a [tune] table
    the tuning stage runs first and the final runs take its rates. Returns `commands` (all that a
    dry run does), or the final runs' result `rows`, the `results` and `report` paths, whether
    the suite was `interrupted` and the tuning runs' `tuning` rows."""
    suite = load_suite(name)
    extra, progress = _checked_extra(suite, overrides)
    out = out or Path(f"runs/bench-{suite.name}")
    tuner, lrs = (_tune_stage(suite, out, only, jobs, extra, progress, dry_run) if suite.tune
                  else (None, None))
    runner = SuiteRunner(suite, out, suite.runs(seeds, only, lrs), jobs, extra, progress=progress)
    if dry_run:
        stages = [tuner, runner] if tuner else [runner]
        return {"commands": ["sltrain " + " ".join(st.command(r)) for st in stages
                             for r in st.runs]}
    tuning = [tuner.rows[r.name] for r in tuner.runs if r.name in tuner.rows] if tuner else []
    if tuner and tuner.stopping.is_set():  # the final runs need every tuning run's result
        return {"commands": [], "rows": [], "out": str(out), "tuning": tuning,
                "results": str(tuner.out / "results.csv"), "interrupted": True,
                "report": "none yet (stopped in the tuning stage)"}
    runner.check_reusable()
    rows = runner.run()
    return {"commands": [], "rows": rows, "out": str(out), "results": str(out / "results.csv"),
            "report": str(render(out, report_dir)), "interrupted": runner.stopping.is_set(),
            "tuning": tuning}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
