"""The pretraining loop, top to bottom: data, model, optimizer, schedule, steps, eval, checkpoints.

One update step = `grad_accum` micro-batches; warm-up, schedule, logging and checkpoints all count
update steps. SIGINT/SIGTERM finish the current step, save a checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sltrain.config import RunConfig
from sltrain.data import Blocks, BlockSampler, prepare, prepare_options, save_tokenizer
from sltrain.errors import UserError
from sltrain.measure import PeakMemory, count_parameters, estimate_memory, measure_memory
from sltrain.model import build_model, param_spec
from sltrain.optim import build_optimizer
from sltrain.optim import validate as validate_optimizer
from sltrain.optim.tricks import CycleTricks, include_warm_start_params
from sltrain.train.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sltrain.train.evaluate import evaluate, lm_loss
from sltrain.train.schedule import build_scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no GPU is available; use --device cpu")
    return device


def autocast_for(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (and on CPU when asked), plain float32 otherwise."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def new_run_dir(cfg: RunConfig) -> Path:
    if cfg.train.out_dir:
        run_dir = Path(cfg.train.out_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.model.preset}-{cfg.method.name}-{stamp}"
    if list_checkpoints(run_dir):
        raise UserError(
            f"run folder {run_dir} already holds checkpoints; continue it with --resume {run_dir} "
            "or pass another --out-dir"
        )
    return run_dir


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop at the next step boundary (a second SIGINT
    interrupts at once)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records a resumed run will write again (those after its checkpoint)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def train(
    cfg: RunConfig,
    run_dir: Path | None = None,
    resume: Path | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Pretrain the model `cfg` describes; return the run summary (also in summary.json).

    `resume` is a run folder or checkpoint folder to continue from; `run_dir` defaults to a new
    folder under runs/ (or the resumed run's folder). `on_step(step, record)` runs after each
    update step.
    """
    wall_start = time.perf_counter()
    tc = cfg.train
    device = resolve_device(tc.device)
    autocast = autocast_for(cfg, device)
    ckpt = find_checkpoint(resume) if resume else None
    if run_dir is None:
        run_dir = ckpt.parent.parent if ckpt else new_run_dir(cfg)

    # Rank/density against the shapes and the optimizer settings, before any data work.
    validate_optimizer(cfg, build_model(cfg, device="meta"))
    vocab = cfg.model_dims()["vocab_size"]
    tokenizer_file = run_dir / "tokenizer.json"
    data = prepare(cfg.data, vocab, tokenizer_file if ckpt else None, **prepare_options(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs have proven valid
    save_tokenizer(data.tokenizer, data.eos_token, run_dir, cfg.data.tokenizer)
    derived = {"rank": cfg.rank, "lora_alpha": cfg.lora_alpha, "density": cfg.density,
               "warmup_steps": cfg.warmup_steps, "tokens_per_step": cfg.tokens_per_step}
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "derived": derived}, indent=2))

    sampler = BlockSampler(Blocks(data.train, cfg.data.seq_len), tc.batch_size, tc.seed)
    val_blocks = Blocks(data.val, cfg.data.seq_len)
    if len(val_blocks) == 0:
        raise UserError("the validation split is shorter than one block; raise --val-fraction "
                        "or lower --seq-len")
    # The peak is measured from here on: model, gradients, optimizer states and activations.
    peak_memory = PeakMemory(device).start()
    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    include_warm_start_params(model, cfg)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.rank, tc.grad_accum)
    tricks: CycleTricks | None = None  # built once the resumed step is known
    scheduler = build_scheduler(optimizer, cfg.schedule.name, tc.steps, cfg.warmup_steps,
                                cfg.schedule.min_lr_ratio, cfg.schedule.restart_warmup,
                                lambda s: tricks.cycle_start(s) if tricks else None)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt:
        state = load_checkpoint(ckpt, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        _truncate_metrics(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()
    tricks = CycleTricks(model, optimizer, cfg, start_step=step)

    params = count_parameters(model)
    meta = {"config": cfg.to_dict(), "param_spec": param_spec(cfg).to_dict()}

    def checkpoint(at_step: int, sampler_state: dict[str, int]) -> Path:
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        state = {"step": at_step, "tokens_seen": tokens_seen, "sampler": sampler_state,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng, "elapsed_s": elapsed_before + time.perf_counter() - loop_start}
        return save_checkpoint(run_dir, at_step, model, state, meta, tc.keep_checkpoints)

    last_eval: dict[str, float] = {}
    eval_step = -1
    interrupted = None
    bar = tqdm(total=tc.steps, initial=step, disable=not tc.progress, unit="step",
               dynamic_ncols=True, desc=f"{cfg.method.name}")
    loop_start = time.perf_counter()
    step_time, step_tokens = 0.0, 0  # this invocation's update steps only (no eval, no saving)
    model.train()
    with _StopFlag() as stop:
        while step < tc.steps:
            t0 = time.perf_counter()
            sampler_state = sampler.state_dict()
            loss_sum = 0.0
            for _ in range(tc.grad_accum):
                x, y = sampler.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast:
                    logits = model(x)
                loss = lm_loss(logits, y)
                (loss / tc.grad_accum).backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                optimizer.zero_grad(set_to_none=True)
                saved = checkpoint(step, sampler_state)
                raise UserError(f"loss became {loss_sum} at step {step + 1}; the last good state "
                                f"is saved in {saved}; lower --lr or raise --warmup-steps")
            clip = cfg.optimizer.grad_clip
            # Which parameters train can change during a run (ReLoRA's warm start): ask each step.
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip).item() if clip else None
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            events = tricks.after_step(step)
            tokens_seen += cfg.tokens_per_step
            dt = time.perf_counter() - t0
            step_time, step_tokens = step_time + dt, step_tokens + cfg.tokens_per_step
            record = {"step": step, "loss": loss_sum / tc.grad_accum, "lr": lr,
                      "grad_norm": grad_norm, "tokens": tokens_seen,
                      "tok_per_s": cfg.tokens_per_step / dt,
                      "elapsed_s": elapsed_before + time.perf_counter() - loop_start, **events}
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                last_eval = evaluate(model, val_blocks, tc.batch_size, tc.eval_batches,
                                     device, autocast)
                record.update(last_eval)
                eval_step = step
                bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, "
                          f"ppl {last_eval['val_ppl']:.2f}")
            _write_jsonl(metrics_path, record)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
            if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
                checkpoint(step, sampler.state_dict())
            if on_step:
                on_step(step, record)
            if stop.signal is not None:
                interrupted = signal.Signals(stop.signal).name
                break
        bar.close()
        final_ckpt = checkpoint(step, sampler.state_dict())

    peak, peak_kind = peak_memory.result()
    if eval_step != step:
        last_eval = evaluate(model, val_blocks, tc.batch_size, tc.eval_batches, device, autocast)
    elapsed = elapsed_before + time.perf_counter() - loop_start
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": str(final_ckpt),
        "status": f"interrupted by {interrupted}" if interrupted else "finished",
        "step": step,
        "steps": tc.steps,
        "method": cfg.method.name,
        "preset": cfg.model.preset,
        **{k: v for k, v in last_eval.items()},
        "params": params,
        "training_state_bytes": measure_memory(model, optimizer).to_dict(),
        "estimated_state_bytes": estimate_memory(model, next(model.parameters()).dtype,
                                                 cfg.optimizer, cfg.rank, tc.grad_accum).to_dict(),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "tokens_seen": tokens_seen,
        "train_time_s": elapsed,
        "tok_per_s": step_tokens / step_time if step_time > 0 else 0.0,
        "wall_time_s": time.perf_counter() - wall_start,
        "device": str(device),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
