"""Suites of runs compared under one budget, and the paper-style report of their results.

`load_suite` reads a suite file, `SuiteRunner` runs it (one process per run, resumable) and
`render` writes the report and plots from `results.csv`; `run_suite` does all three.
"""

from sltrain.bench.report import render
from sltrain.bench.runner import SuiteRunner, run_suite
from sltrain.bench.suite import RunSpec, Suite, builtin_suites, list_suites, load_suite

__all__ = [
    "RunSpec", "Suite", "SuiteRunner", "builtin_suites", "list_suites", "load_suite", "render",
    "run_suite",
]
