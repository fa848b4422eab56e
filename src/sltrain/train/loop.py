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

from sltrain.config import RunConfig, run_clashes
from sltrain.data import Blocks, BlockSampler, prepare, prepare_options, save_tokenizer
from sltrain.errors import UserError
from sltrain.files import writable_dir
from sltrain.measure import PeakMemory, count_parameters, estimate_memory, measure_memory
from sltrain.measure.health import health_record
from sltrain.model import build_model, param_spec
from sltrain.optim import build_optimizer
from sltrain.optim import validate as validate_optimizer
from sltrain.optim.tricks import CycleTricks, include_warm_start_params
from sltrain.train import distributed
from sltrain.train.checkpoint import (
    STATE_FILE,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sltrain.train.evaluate import evaluate
from sltrain.train.loggers import MetricLoggers
from sltrain.train.losses import build_loss
from sltrain.train.prune import Pruner
from sltrain.train.prune import validate as validate_pruning
from sltrain.train.schedule import build_scheduler, schedule_options


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
        clashes = run_clashes(run_dir, cfg)
        why = (f" made by another config ({', '.join(clashes)})" if clashes else "")
        raise UserError(
            f"run folder {run_dir} already holds checkpoints{why}; continue it with --resume "
            f"{run_dir} (or --resume auto), or pass another --out-dir"
        )
    # A damaged checkpoint (no training state) is still work: never train over it.
    damaged = sorted((run_dir / "checkpoints").glob("step_*")) if run_dir.is_dir() else []
    if damaged:
        raise UserError(f"run folder {run_dir} holds the incomplete checkpoint {damaged[-1]} (no "
                        f"{STATE_FILE}); move it away to start over, or pass another --out-dir")
    return writable_dir(run_dir, "--out-dir", create=False)


def _write_config(run_dir: Path, cfg: RunConfig) -> None:
    derived = {"rank": cfg.rank, "lora_alpha": cfg.lora_alpha, "density": cfg.density,
               "warmup_steps": cfg.warmup_steps, "tokens_per_step": cfg.tokens_per_step}
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "derived": derived}, indent=2))


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


def train(
    cfg: RunConfig,
    run_dir: Path | None = None,
    resume: Path | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Pretrain the model `cfg` describes; return the run summary (also in summary.json).

    `resume` is a run folder or checkpoint folder to continue from; `run_dir` defaults to a new
    folder under runs/ (or the resumed run's folder). `on_step(step, record)` runs after each
    update step. Under torchrun every process calls this; rank 0 writes the files.
    """
    wall_start = time.perf_counter()
    tc = cfg.train
    world, device = distributed.init(cfg, resolve_device(tc.device))
    autocast = autocast_for(cfg, device)
    ckpt = find_checkpoint(resume) if resume else None
    if run_dir is None:
        run_dir = ckpt.parent.parent if ckpt else world.broadcast(new_run_dir(cfg) if world.main
                                                                  else None)

    # Rank/density against the shapes and the optimizer settings, before any data work.
    validate_optimizer(cfg, build_model(cfg, device="meta"))
    validate_pruning(cfg)
    init_from = Path(tc.init_from) if tc.init_from and not ckpt else None
    if init_from:
        from sltrain.densify import init_tokenizer_dir

        if not init_from.exists():
            raise UserError(f"--init-from {init_from} does not exist; pass a run or checkpoint folder")
        # The new run reads the data with the tokenizer its initial weights learned.
        init_tokenizer = init_tokenizer_dir(init_from) / "tokenizer.json"
    vocab = cfg.model_dims()["vocab_size"]
    tokenizer_file = run_dir / "tokenizer.json"
    if not world.main:
        world.barrier()  # rank 0 tokenises and fills the cache first; the others read it
    data = prepare(cfg.data, vocab,
                   tokenizer_file if ckpt else init_tokenizer if init_from else None,
                   **prepare_options(cfg))
    if world.main:
        writable_dir(run_dir, "--out-dir")  # made only once the inputs have proven valid
        save_tokenizer(data.tokenizer, data.eos_token, run_dir, cfg.data.tokenizer)
        if not ckpt:
            _write_config(run_dir, cfg)
        world.barrier()

    sampler = BlockSampler(Blocks(data.train, cfg.data.seq_len), tc.batch_size, tc.seed)
    val_blocks = Blocks(data.val, cfg.data.seq_len)
    if len(val_blocks) == 0:
        raise UserError("the validation split is shorter than one block; raise --val-fraction "
                        "or lower --seq-len")
    # The peak is measured from here on: model, gradients, optimizer states and activations.
    peak_memory = PeakMemory(device).start()
    torch.manual_seed(tc.seed)
    raw_model = build_model(cfg).to(device)
    if init_from:
        from sltrain.densify import init_weights_from

        init_weights_from(raw_model, init_from)
    include_warm_start_params(raw_model, cfg)
    model = distributed.wrap(raw_model, world, device)
    optimizer = build_optimizer(raw_model, cfg.optimizer, cfg.rank, tc.grad_accum)
    loss_fn = build_loss(cfg, world)  # the training objective; evaluation reports cross-entropy
    tricks: CycleTricks | None = None  # built once the resumed step is known
    scheduler = build_scheduler(optimizer, cfg.schedule.name, tc.steps, cfg.warmup_steps,
                                cfg.schedule.min_lr_ratio, cfg.schedule.restart_warmup,
                                lambda s: tricks.cycle_start(s) if tricks else None,
                                **schedule_options(cfg))

    pruner = Pruner(raw_model, cfg)
    step, tokens_seen, elapsed_before, skipped = 0, 0, 0.0, 0
    if ckpt:
        state = load_checkpoint(ckpt, lambda t: distributed.load_model_state(model, world, t))
        if state.get("model_only") or "optimizer" not in state:
            raise UserError(f"{ckpt} holds weights without a training state (written by convert, "
                            f"densify or soup); start a new run from it with --init-from "
                            f"{ckpt.parent.parent}")
        distributed.load_optimizer_state(model, optimizer, world, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        skipped = state.get("skipped_nonfinite", 0)
        pruner.load_state_dict(state.get("prune"), step)
    tricks = CycleTricks(raw_model, optimizer, cfg, start_step=step)
    loggers = MetricLoggers(run_dir, cfg, step if ckpt else None) if world.main else None
    if ckpt and world.main:  # a resume that fails on a damaged checkpoint or log keeps its config
        _write_config(run_dir, cfg)

    params = count_parameters(raw_model)
    meta = {"config": cfg.to_dict(), "param_spec": param_spec(cfg).to_dict()}

    def checkpoint(at_step: int) -> Path:
        """Every rank gathers (FSDP needs all); rank 0 writes; all wait for the file."""
        weights = distributed.model_state(model, world)
        optim_state = distributed.optimizer_state(model, optimizer, world)
        path = run_dir / "checkpoints" / f"step_{at_step:07d}"
        if world.main:
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            state = {"step": at_step, "tokens_seen": tokens_seen, "sampler": sampler.state_dict(),
                     "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng,
                     "elapsed_s": elapsed_before + time.perf_counter() - loop_start,
                     "skipped_nonfinite": skipped, "prune": pruner.state_dict()}
            path = save_checkpoint(run_dir, at_step, weights, state, meta, tc.keep_checkpoints)
        world.barrier()
        return path

    last_eval: dict[str, float] = {}
    eval_step = -1
    interrupted = None
    bar = tqdm(total=tc.steps, initial=step, disable=not (tc.progress and world.main), unit="step",
               dynamic_ncols=True, desc=f"{cfg.method.name}")
    loop_start = time.perf_counter()
    step_time, step_tokens = 0.0, 0  # this invocation's update steps only (no eval, no saving)
    in_a_row = 0  # non-finite losses since the last good step
    model.train()
    with _StopFlag() as stop:
        while step < tc.steps:
            t0 = time.perf_counter()
            loss_sum = 0.0
            loss_fn.step = step  # sample reweighting's warm-up counts update steps
            for micro in range(tc.grad_accum):
                x, y = sampler.next_batch(world.rank, world.size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with distributed.no_sync(model, last=micro == tc.grad_accum - 1):
                    with autocast:
                        logits = model(x)
                    loss = loss_fn(logits, y)
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.item()
            loss_sum = world.mean(loss_sum)
            if not math.isfinite(loss_sum):
                # Skip the update: the weights, optimizer and schedule stay at the last good step.
                optimizer.zero_grad(set_to_none=True)
                skipped, in_a_row = skipped + 1, in_a_row + 1
                bar.write(f"step {step + 1}: loss {loss_sum}, update skipped ({in_a_row} in a row)")
                if in_a_row >= tc.max_nonfinite_steps:
                    saved = checkpoint(step)
                    raise UserError(
                        f"loss was {loss_sum} for {in_a_row} update steps in a row at step "
                        f"{step + 1}; the last good state is saved in {saved}; resume it with a "
                        "lower --lr or a higher --warmup-steps")
                continue
            in_a_row = 0
            clip = cfg.optimizer.grad_clip
            # Which parameters train can change during a run (ReLoRA's warm start): ask each step.
            trainable = [p for p in raw_model.parameters() if p.requires_grad]
            pruner.before_step()
            grad_norm = _total_norm(torch.nn.utils.clip_grad_norm_(trainable, clip)) if clip else None
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            events = {**tricks.after_step(step), **pruner.after_step(step, optimizer)}
            tokens_seen += cfg.tokens_per_step
            dt = time.perf_counter() - t0
            step_time, step_tokens = step_time + dt, step_tokens + cfg.tokens_per_step
            record = {"step": step, "loss": loss_sum / tc.grad_accum,
                      **loss_fn.step_metrics(world.mean), "lr": lr,
                      "grad_norm": grad_norm, "tokens": tokens_seen,
                      "tok_per_s": cfg.tokens_per_step / dt,
                      "elapsed_s": elapsed_before + time.perf_counter() - loop_start, **events}
            if skipped:
                record["skipped_nonfinite"] = skipped
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                last_eval = evaluate(model, val_blocks, tc.batch_size, tc.eval_batches,
                                     device, autocast, world)
                record.update(last_eval)
                eval_step = step
                if tc.health and world.parallel != "fsdp":  # FSDP forwards need every rank
                    x_val, _ = val_blocks.batch(range(min(len(val_blocks), tc.batch_size)))
                    record.update(health_record(raw_model, x_val.to(device)))
                bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, "
                          f"ppl {last_eval['val_ppl']:.2f}")
            if loggers:
                loggers.log(record)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
            if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
                checkpoint(step)
            if on_step:
                on_step(step, record)
            # Every rank stops at the same step (torchrun signals each process on its own).
            if world.any(stop.signal is not None):
                interrupted = signal.Signals(stop.signal or signal.SIGTERM).name
                break
        bar.close()
        final_ckpt = checkpoint(step)

    peak, peak_kind = peak_memory.result()
    if eval_step != step:
        last_eval = evaluate(model, val_blocks, tc.batch_size, tc.eval_batches, device, autocast,
                             world)
    elapsed = elapsed_before + time.perf_counter() - loop_start
    if hasattr(model, "reshard"):  # FSDP2 leaves the root's weights gathered after a forward
        model.reshard()
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
        **pruner.summary(),
        "training_state_bytes": measure_memory(raw_model, optimizer).to_dict(),
        "estimated_state_bytes": estimate_memory(raw_model, next(raw_model.parameters()).dtype,
                                                 cfg.optimizer, cfg.rank, tc.grad_accum).to_dict(),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "tokens_seen": tokens_seen,
        "skipped_nonfinite": skipped,
        "train_time_s": elapsed,
        "tok_per_s": step_tokens / step_time if step_time > 0 else 0.0,
        "wall_time_s": time.perf_counter() - wall_start,
        "device": str(device),
        "world_size": world.size,
        "parallel": world.parallel if world.active else "none",
    }
    if loggers:
        loggers.close(summary)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _total_norm(norm: torch.Tensor) -> float:
    """The gradient norm clip_grad_norm_ returns, as a number (a DTensor under FSDP)."""
    full = getattr(norm, "full_tensor", None)
    return (full() if full else norm).item()
