"""Every subcommand refuses bad input in one line: a damaged file of a run folder, a model shape
that cannot be built, an output path that cannot be written, a bad value. Exit status 2, one
`sltrain: error:` line on stderr, no traceback, and the run folder it was given left untouched.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sltrain.cli import main

TINY = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--vocab-size", "256", "--rank", "8",
        "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
        "--progress", "false"]
CKPT = "checkpoints/step_0000002"
NO_DIR = "/proc/sltrain-no-such-dir/out"  # cannot be made, not even by root


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """One tiny trained run (pre_rmsnorm), one Pre-LN run (for convert) and one token folder,
    made once; each row works on copies."""
    root = tmp_path_factory.mktemp("built")
    for name, extra in (("run", []), ("ln", ["--norm", "pre_ln"])):
        argv = ["train", *TINY, *extra, "--data", str(small_corpus), "--out-dir", str(root / name)]
        assert main(argv) == 0
    assert main(["data", "prepare", *TINY, "--data", str(small_corpus), "--out", str(root / "tok")]) == 0
    return {"run": root / "run", "ln": root / "ln", "tok": root / "tok", "data": small_corpus}


def _synthetic_runs(folder: Path) -> list[Path]:
    """Six run folders whose summary.json follows L = 1.7 + 400/N^0.34 + 410/D^0.28."""
    runs = []
    for i, (n, d) in enumerate((n, d) for n in (1e6, 3e6, 1e7) for d in (1e7, 1e8)):
        run = folder / f"s{i}"
        run.mkdir(parents=True)
        loss = 1.7 + 400 / n**0.34 + 410 / d**0.28
        (run / "summary.json").write_text(json.dumps({"val_loss": loss, "tokens_seen": d,
                                                      "params_avg": n}))
        runs.append(run)
    return runs


@pytest.fixture
def ctx(built, tmp_path) -> dict:
    """The placeholders of a row's argv: copies of the built folders and some awkward paths."""
    for name in ("run", "ln", "tok"):
        shutil.copytree(built[name], tmp_path / name)
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("someone's files\n")
    runs = _synthetic_runs(tmp_path / "fits")
    return {"run": str(tmp_path / "run"), "ln": str(tmp_path / "ln"), "tok": str(tmp_path / "tok"),
            "data": str(built["data"]), "tmp": str(tmp_path), "file": str(tmp_path / "afile"),
            "full": str(tmp_path / "full"), "nodir": NO_DIR, "ckpt": CKPT,
            "fits": [str(r) for r in runs]}


def _write(rel: str, content: str | bytes | None):
    """A setup step: write `content` to the placeholder path `rel` (None: delete it)."""
    def damage(ctx: dict) -> None:
        path = Path(rel.format(**ctx))
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return damage


GARBAGE = b"\x00\xffnot what this file should hold{["
TORN_METRICS = '{"step": 1, "loss": 5.5}\n{"step": 2, "lo\n{"step": 3, "loss": 5.1}\n'

# (id, argv with {placeholders}, setup or None, a phrase the one line must hold)
ROWS = [
    # ---- train --------------------------------------------------------------------------------
    ("train-dim-heads", ["train", *TINY, "--dim", "30", "--n-heads", "4", "--data", "{data}",
                         "--out-dir", "{tmp}/new"], None, "does not split into 4 heads"),
    ("train-odd-head", ["train", *TINY, "--dim", "6", "--n-heads", "2", "--rank", "2",
                        "--data", "{data}", "--out-dir", "{tmp}/new"], None, "odd size 3"),
    ("train-vocab-huge", ["train", *TINY, "--vocab-size", "100000000000", "--data", "{data}",
                          "--out-dir", "{tmp}/new"], None, "--vocab-size 100000000000"),
    ("train-dim-no-memory", ["train", *TINY, "--dim", "1000000000", "--data", "{data}",
                             "--out-dir", "{tmp}/new"], None, "does not fit in cpu memory"),
    ("train-out-is-file", ["train", *TINY, "--data", "{data}", "--out-dir", "{file}"], None,
     "cannot write to"),
    ("train-out-under-file", ["train", *TINY, "--data", "{data}", "--out-dir", "{file}/run"], None,
     "is a file, not a folder"),
    ("train-out-cannot-make", ["train", *TINY, "--data", "{data}", "--out-dir", "{nodir}"], None,
     "cannot write to /proc/"),
    ("train-steps-zero", ["train", *TINY, "--steps", "0", "--data", "{data}",
                          "--out-dir", "{tmp}/new"], None, "train.steps"),
    ("train-resume-config-garbage", ["train", "--resume", "{run}"],
     _write("{run}/config.json", GARBAGE), "config.json is damaged"),
    ("train-resume-config-list", ["train", "--resume", "{run}"],
     _write("{run}/config.json", "[1, 2]"), "holds a JSON list"),
    ("train-resume-state-garbage", ["train", "--resume", "{run}", "--steps", "3"],
     _write("{run}/{ckpt}/training_state.pt", GARBAGE), "cannot be loaded (not a torch file)"),
    ("train-resume-model-missing", ["train", "--resume", "{run}", "--steps", "3"],
     _write("{run}/{ckpt}/model.safetensors", None), "model.safetensors missing"),
    ("train-resume-metrics-garbage", ["train", "--resume", "{run}", "--steps", "3"],
     _write("{run}/metrics.jsonl", TORN_METRICS), "metrics.jsonl is damaged (line 2"),
    ("train-resume-tokenizer-garbage", ["train", "--resume", "{run}", "--steps", "3"],
     _write("{run}/tokenizer.json", GARBAGE), "tokenizer.json"),
    ("train-auto-incomplete-checkpoint", ["train", "--resume", "auto", *TINY, "--data", "{data}",
                                          "--out-dir", "{run}"],
     _write("{run}/{ckpt}/training_state.pt", None), "incomplete checkpoint"),
    ("train-over-checkpoints", ["train", *TINY, "--data", "{data}", "--out-dir", "{run}"], None,
     "already holds checkpoints"),
    ("train-init-from-tokenizer-missing", ["train", *TINY, "--method", "full", "--data", "{data}",
                                           "--init-from", "{run}", "--out-dir", "{tmp}/new"],
     _write("{run}/tokenizer.json", None), "tokenizer.json is missing"),
    ("train-token-folder-meta", ["train", *TINY, "--data", "{tok}", "--out-dir", "{tmp}/new"],
     _write("{tok}/meta.json", GARBAGE), "meta.json is damaged"),
    # ---- memory -------------------------------------------------------------------------------
    ("memory-dim-heads", ["memory", "--dim", "30", "--n-heads", "4"], None, "--n-heads 3"),
    ("memory-odd-head", ["memory", "--dim", "6", "--n-heads", "2", "--rank", "2"], None,
     "rotary embeddings need an even size"),
    ("memory-vocab-huge", ["memory", "--vocab-size", str(2**33)], None, "token ids"),
    ("memory-dtype", ["memory", "--dtype", "int8"], None, "invalid choice"),
    # ---- data prepare -------------------------------------------------------------------------
    ("prepare-out-under-file", ["data", "prepare", *TINY, "--data", "{data}", "--out", "{file}/tok"],
     None, "cannot write to"),
    ("prepare-out-cannot-make", ["data", "prepare", *TINY, "--data", "{data}", "--out", "{nodir}"],
     None, "cannot write to /proc/"),
    ("prepare-out-foreign-folder", ["data", "prepare", *TINY, "--data", "{data}", "--out", "{full}"],
     None, "not a prepared data folder"),
    ("prepare-dim-heads", ["data", "prepare", *TINY, "--dim", "30", "--n-heads", "4",
                           "--data", "{data}"], None, "does not split"),
    ("prepare-token-folder-list", ["data", "prepare", *TINY, "--data", "{tok}", "--out", "{tmp}/t2"],
     _write("{tok}/meta.json", "[]"), "holds a JSON list"),
    # ---- data score ---------------------------------------------------------------------------
    ("score-tokenizer-garbage", ["data", "score", "{run}", "--keep", "0.5", "--out", "{tmp}/sc"],
     _write("{run}/tokenizer.json", GARBAGE), "tokenizer.json cannot be read"),
    ("score-model-garbage", ["data", "score", "{run}", "--keep", "0.5", "--out", "{tmp}/sc"],
     _write("{run}/{ckpt}/model.safetensors", GARBAGE), "it is damaged"),
    ("score-out-under-file", ["data", "score", "{run}", "--keep", "0.5", "--out", "{file}/sc"],
     None, "is a file, not a folder"),
    ("score-out-cannot-make", ["data", "score", "{run}", "--keep", "0.5", "--max-blocks", "4",
                               "--out", "{nodir}"], None, "cannot write to /proc/"),
    ("score-keep", ["data", "score", "{run}", "--keep", "2", "--out", "{tmp}/sc"], None, "--keep 2"),
    # ---- bench --------------------------------------------------------------------------------
    ("bench-suite-garbage", ["bench", "{tmp}/suite.toml"], _write("{tmp}/suite.toml", "[runs\n"),
     "cannot be parsed"),
    ("bench-report-csv-garbage", ["bench", "report", "{tmp}"],
     _write("{tmp}/results.csv", GARBAGE), "results.csv is damaged"),
    ("bench-out-under-file", ["bench", "quick", "--out", "{file}/b", "--steps", "2",
                              "--warmup-steps", "0"], None, "is a file, not a folder"),
    ("bench-dim-heads", ["bench", "quick", "--dim", "30", "--n-heads", "4"], None, "does not split"),
    ("bench-jobs", ["bench", "quick", "--jobs", "0", "--out", "{tmp}/b"], None, "--jobs 0"),
    # ---- export -------------------------------------------------------------------------------
    ("export-model-garbage", ["export", "{run}", "{tmp}/hf"],
     _write("{run}/{ckpt}/model.safetensors", GARBAGE), "it is damaged"),
    ("export-tokenizer-meta-garbage", ["export", "{run}", "{tmp}/hf"],
     _write("{run}/tokenizer_meta.json", GARBAGE), "tokenizer_meta.json is damaged"),
    ("export-out-under-file", ["export", "{run}", "{file}/hf"], None, "is a file, not a folder"),
    ("export-out-cannot-make", ["export", "{run}", "{nodir}"], None, "cannot write to /proc/"),
    ("export-out-not-empty", ["export", "{run}", "{full}"], None, "--force"),
    # ---- convert ------------------------------------------------------------------------------
    ("convert-model-garbage", ["convert", "{ln}", "--to", "pre_rmsnorm", "--out", "{tmp}/c"],
     _write("{ln}/{ckpt}/model.safetensors", GARBAGE), "it is damaged"),
    ("convert-state-garbage", ["convert", "{ln}", "--to", "pre_rmsnorm", "--out", "{tmp}/c"],
     _write("{ln}/{ckpt}/training_state.pt", GARBAGE), "not a torch file"),
    ("convert-out-under-file", ["convert", "{ln}", "--to", "pre_rmsnorm", "--out", "{file}/c"],
     None, "is a file, not a folder"),
    ("convert-out-cannot-make", ["convert", "{ln}", "--to", "pre_crmsnorm", "--out", "{nodir}"],
     None, "cannot write to /proc/"),
    ("convert-not-pre-ln", ["convert", "{run}", "--to", "pre_rmsnorm", "--out", "{tmp}/c"], None,
     "only a pre_ln run converts"),
    # ---- densify ------------------------------------------------------------------------------
    ("densify-state-garbage", ["densify", "{run}", "--out", "{tmp}/d"],
     _write("{run}/{ckpt}/training_state.pt", GARBAGE), "not a torch file"),
    ("densify-tokenizer-meta-list", ["densify", "{run}", "--out", "{tmp}/d"],
     _write("{run}/tokenizer_meta.json", "[]"), "tokenizer_meta.json is damaged"),
    ("densify-out-under-file", ["densify", "{run}", "--out", "{file}/d"], None,
     "is a file, not a folder"),
    ("densify-out-cannot-make", ["densify", "{run}", "--out", "{nodir}"], None,
     "cannot write to /proc/"),
    ("densify-out-not-empty", ["densify", "{run}", "--out", "{full}"], None, "not an empty folder"),
    # ---- eval ---------------------------------------------------------------------------------
    ("eval-model-garbage", ["eval", "{run}"], _write("{run}/{ckpt}/model.safetensors", GARBAGE),
     "it is damaged"),
    ("eval-tokenizer-garbage", ["eval", "{run}"], _write("{run}/tokenizer.json", GARBAGE),
     "tokenizer.json cannot be read"),
    ("eval-token-folder-meta", ["eval", "{run}", "--data", "{tok}"],
     _write("{tok}/meta.json", "{}"), "meta.json is damaged"),
    ("eval-seq-len", ["eval", "{run}", "--seq-len", "1000"], None, "--seq-len 1000"),
    ("eval-max-batches", ["eval", "{run}", "--max-batches", "0"], None, "--max-batches 0"),
    # ---- health -------------------------------------------------------------------------------
    ("health-model-garbage", ["health", "{run}"], _write("{run}/{ckpt}/model.safetensors", GARBAGE),
     "it is damaged"),
    ("health-out-under-file", ["health", "{run}", "--blocks", "2", "--out", "{file}/h"], None,
     "afile/h"),
    ("health-out-is-file", ["health", "{run}", "--blocks", "2", "--out", "{file}"], None, "afile"),
    ("health-out-cannot-make", ["health", "{run}", "--blocks", "2", "--out", "{nodir}"], None,
     "cannot write to /proc/"),
    ("health-layers", ["health", "{run}", "--blocks", "2", "--layers", "nope"], None,
     "no learned weight named nope"),
    # ---- schedule -----------------------------------------------------------------------------
    ("schedule-plot-under-file", ["schedule", "--steps", "10", "--plot", "{file}/lr.png"], None,
     "afile"),
    ("schedule-plot-cannot-make", ["schedule", "--steps", "10", "--plot", "{nodir}/lr.png"], None,
     "/proc/"),
    ("schedule-plot-is-dir", ["schedule", "--steps", "10", "--plot", "{full}"], None,
     "it is a folder; pass a file name as --plot"),
    ("schedule-config-garbage", ["schedule", "--config", "{tmp}/c.toml"],
     _write("{tmp}/c.toml", GARBAGE), "cannot be parsed"),
    ("schedule-warmup", ["schedule", "--steps", "10", "--warmup-steps", "20"], None, "warm-up (20)"),
    ("schedule-compare", ["schedule", "--compare"], None, "--plot"),
    # ---- scaling fit --------------------------------------------------------------------------
    ("scaling-summary-garbage", ["scaling", "fit", "{fits}", "--bootstrap", "0"],
     _write("{tmp}/fits/s0/summary.json", GARBAGE), "summary.json is damaged"),
    ("scaling-summary-list", ["scaling", "fit", "{fits}", "--bootstrap", "0"],
     _write("{tmp}/fits/s1/summary.json", "[]"), "holds a JSON list"),
    ("scaling-summary-value", ["scaling", "fit", "{fits}", "--bootstrap", "0"],
     _write("{tmp}/fits/s2/summary.json", '{"val_loss": "low", "tokens_seen": 1, "params_avg": 2}'),
     "summary.json is damaged"),
    ("scaling-json-under-file", ["scaling", "fit", "{fits}", "--bootstrap", "0",
                                 "--json", "{file}/fit.json"], None, "afile"),
    ("scaling-plot-under-file", ["scaling", "fit", "{fits}", "--bootstrap", "0",
                                 "--plot", "{file}/fit.png"], None, "is a file, not a folder"),
    ("scaling-json-is-dir", ["scaling", "fit", "{fits}", "--bootstrap", "0", "--json", "{full}"],
     None, "it is a folder; pass a file name as --json"),
    ("scaling-plot-cannot-make", ["scaling", "fit", "{fits}", "--bootstrap", "0",
                                  "--plot", "{nodir}/fit.png"], None, "cannot write to /proc/"),
    ("scaling-predict", ["scaling", "fit", "{fits}", "--predict", "many"], None, "N,D"),
    # ---- soup ---------------------------------------------------------------------------------
    ("soup-state-garbage", ["soup", "{run}", "{run}", "--out", "{tmp}/soup"],
     _write("{run}/{ckpt}/training_state.pt", GARBAGE), "not a torch file"),
    ("soup-tokenizer-missing", ["soup", "{run}", "--out", "{tmp}/soup"],
     _write("{run}/tokenizer.json", None), "tokenizer.json is missing"),
    ("soup-out-under-file", ["soup", "{run}", "--out", "{file}/soup"], None,
     "is a file, not a folder"),
    ("soup-out-cannot-make", ["soup", "{run}", "--out", "{nodir}", "--max-batches", "1"], None,
     "cannot write to /proc/"),
    ("soup-max-batches", ["soup", "{run}", "--out", "{tmp}/soup", "--max-batches", "0"], None,
     "--max-batches 0"),
]
# Rows also run as a real `python -m sltrain` process: no traceback escapes at that level either.
SUBPROCESS = {"train-out-under-file", "export-model-garbage", "memory-dim-heads",
              "schedule-plot-under-file"}


def _argv(argv: list[str], ctx: dict) -> list[str]:
    """The row's argv with its placeholders filled; {fits} stands for the six scaling runs."""
    return [word for arg in argv for word in (ctx["fits"] if arg == "{fits}" else [arg.format(**ctx)])]


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_one_line(code: int, out: str, err: str, needle: str) -> None:
    assert code == 2, err
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sltrain: error: "), err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("row_id,argv,setup,needle", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line(row_id, argv, setup, needle, ctx, capsys):
    if setup:
        setup(ctx)
    runs = {name: _fingerprint(Path(ctx[name])) for name in ("run", "ln", "tok")}
    args = _argv(argv, ctx)
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    _check_one_line(code, out, err, needle)
    for name, before in runs.items():  # no lost work: a refused command changes no input folder
        assert _fingerprint(Path(ctx[name])) == before, f"{row_id} changed {name}"
    assert not Path(NO_DIR).parent.exists()


@pytest.mark.parametrize("row", [r for r in ROWS if r[0] in SUBPROCESS], ids=lambda r: r[0])
def test_bad_input_is_one_line_in_a_process(row, ctx):
    row_id, argv, setup, needle = row
    if setup:
        setup(ctx)
    proc = subprocess.run([sys.executable, "-m", "sltrain", *_argv(argv, ctx)], capture_output=True,
                          text=True, cwd=ctx["tmp"], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _check_one_line(proc.returncode, proc.stdout, proc.stderr, needle)


def test_every_subcommand_has_three_rows():
    """The table covers the whole command line, not a sample of it."""
    counts: dict[str, int] = {}
    for _, argv, _, _ in ROWS:
        name = " ".join(argv[:2]) if argv[0] in ("data", "scaling") else argv[0]
        counts[name] = counts.get(name, 0) + 1
    expected = {"train", "memory", "data prepare", "data score", "bench", "export", "convert",
                "densify", "eval", "health", "schedule", "scaling fit", "soup"}
    assert set(counts) == expected and min(counts.values()) >= 3, counts


def test_resume_drops_a_torn_last_log_line(ctx, capsys):
    """A crash mid-append leaves half a record at the end of metrics.jsonl: that is not damage."""
    log = Path(ctx["run"]) / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')
    assert main(["train", "--resume", ctx["run"], "--steps", "3"]) == 0, capsys.readouterr().err
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3]


def test_a_damaged_tokenizer_cache_entry_is_rebuilt(ctx, capsys):
    """The cache is ours to rebuild: a damaged entry is trained again, not refused."""
    from sltrain.data.tokenizer import cache_dir

    entries = sorted((cache_dir() / "tokenizers").glob("bpe-256-*.json"))
    assert entries
    for entry in entries:
        entry.write_bytes(GARBAGE)
    out = Path(ctx["tmp"]) / "prepared"
    assert main(["data", "prepare", *TINY, "--data", ctx["data"], "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_text() == (Path(ctx["tok"]) / "tokenizer.json").read_text()


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`sltrain bench list | head`: the reader leaving early is no error worth a traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        proc = subprocess.run([sys.executable, "-m", "sltrain", "bench", "list"], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("argv", [["schedule", "--steps", "10", "--plot", "{tmp}/plots/lr.png"],
                                  ["scaling", "fit", "{fits}", "--bootstrap", "0", "--plot",
                                   "{tmp}/plots/fit.png", "--json", "{tmp}/plots/fit.json"],
                                  ["health", "{run}", "--blocks", "2", "--out", "{tmp}/plots/h"]],
                         ids=["schedule", "scaling", "health"])
def test_an_output_file_in_a_new_folder_is_written(argv, ctx, capsys):
    """The checks on output paths refuse unusable ones only: a new folder is made for the file."""
    assert main(_argv(argv, ctx)) == 0, capsys.readouterr().err
    assert any((Path(ctx["tmp"]) / "plots").rglob("*.png"))
