"""The Trainer: build a run once from its RunConfig, then step, evaluate and checkpoint it.

Modelled on torchtitan's Trainer. One update step = `grad_accum` micro-batches; warm-up, schedule,
logging and checkpoints all count update steps. SIGINT/SIGTERM finish the current step, save a
checkpoint and stop. Everything a checkpoint restores is one `TrainState`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from sltrain.config import RunConfig
from sltrain.data import Blocks, BlockSampler, prepare, prepare_options
from sltrain.device import (
    autocast_for,
    enable_tf32,
    resolve_device,
    resolve_precision,
    weight_dtype,
)
from sltrain.errors import UserError
from sltrain.measure import PeakMemory, count_parameters, estimate_memory, measure_memory
from sltrain.measure.flops import device_peak, model_flops
from sltrain.measure.health import health_record
from sltrain.measure.loss import evaluate, plain_head
from sltrain.model import build_model
from sltrain.model.llama import cast_parameters_
from sltrain.optim import build_optimizer
from sltrain.optim import validate as validate_optimizer
from sltrain.optim.rounding import ROUNDING
from sltrain.optim.tricks import CycleTricks, include_warm_start_params
from sltrain.run.checkpoint import find_checkpoint, read_checkpoint, refusing_damage, save_checkpoint
from sltrain.run.folder import (
    checkpoint_meta,
    init_tokenizer_dir,
    init_weights_from,
    new_run_dir,
    write_run_config,
    write_run_files,
)
from sltrain.train import distributed
from sltrain.train.checkpointing import apply_activation_checkpointing
from sltrain.train.compile import compile_blocks
from sltrain.train.loggers import MetricLoggers
from sltrain.train.losses import build_loss
from sltrain.train.prune import Pruner
from sltrain.train.prune import validate as validate_pruning
from sltrain.train.schedule import build_scheduler, schedule_options


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


class Part:
    """A stateful part made of two functions: for parts that save through the distributed
    gathers, or whose restore needs another part's value."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], Any]) -> None:
        self.save, self.load = save, load

    def state_dict(self) -> Any:
        return self.save()

    def load_state_dict(self, state: Any) -> None:
        self.load(state)


class RNGState:
    """The global torch generators (CPU, and the device's on CUDA): dropout and ReLoRA's first
    factors draw from them, so a resumed run draws what the uninterrupted one would have."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)


class Counters:
    """Update steps done, tokens trained on, training seconds (over all invocations of the run)
    and updates skipped for a non-finite loss."""

    def __init__(self) -> None:
        self.step, self.tokens_seen, self.skipped_nonfinite = 0, 0, 0
        self._elapsed_before, self._since = 0.0, time.perf_counter()

    def start_clock(self) -> None:
        self._since = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._since

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_s,
                "skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._elapsed_before = state["elapsed_s"]
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)  # older runs never skipped


class TrainState:
    """Everything a checkpoint saves and a resume restores: the counters and named parts, each
    saving and restoring itself, so a new part is one line and resume cannot forget one.

    The layout is training_state.pt's: the counters at the top level, each part under its name
    ("model" goes to model.safetensors instead). Parts load in order, after the counters. A
    part in `later` was added after the first checkpoints: an older file lacks it, and the part
    is handed None.
    """

    def __init__(self, counters: Counters, parts: dict[str, Stateful],
                 later: tuple[str, ...] = ()) -> None:
        self.counters, self.parts, self.later = counters, parts, later

    def state_dict(self) -> dict[str, Any]:
        parts = {name: part.state_dict() for name, part in self.parts.items()}
        return {**self.counters.state_dict(), **parts}

    def missing(self, state: dict[str, Any]) -> list[str]:
        """The parts `state` lacks that no older checkpoint lacked."""
        return [n for n in self.parts if n not in state and n not in self.later]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if missing := self.missing(state):
            raise KeyError(f"the training state lacks {', '.join(missing)}")
        self.counters.load_state_dict(state)
        for name, part in self.parts.items():
            part.load_state_dict(state.get(name))


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


class Trainer:
    """Pretrain the model `cfg` describes. `resume` is a run folder or checkpoint folder to
    continue from; `run_dir` defaults to a new folder under runs/ (or the resumed run's folder).
    Under torchrun every process builds one; rank 0 writes the files."""

    def __init__(self, cfg: RunConfig, run_dir: Path | None = None,
                 resume: Path | None = None) -> None:
        self.wall_start = time.perf_counter()
        self.cfg = cfg
        self.world, self.device = distributed.init(cfg, resolve_device(cfg.train.device))
        self.autocast = autocast_for(cfg, self.device)
        self.tf32 = enable_tf32(self.device, cfg.train.precision)
        ckpt = find_checkpoint(resume) if resume else None
        if run_dir is None:
            run_dir = ckpt.parent.parent if ckpt else self.world.broadcast(
                new_run_dir(cfg) if self.world.main else None)
        self.run_dir = run_dir
        # Rank/density against the shapes and the optimizer settings, before any data work.
        validate_optimizer(cfg, build_model(cfg, device="meta"))
        validate_pruning(cfg)
        init_from = Path(cfg.train.init_from) if cfg.train.init_from and not ckpt else None
        self._build_data(ckpt, init_from)
        # The peak is measured from here on: model, gradients, optimizer states and activations.
        self.peak_memory = PeakMemory(self.device).start()
        try:
            self._build_model(init_from)
            self.state = self._train_state()
            if ckpt:
                self.load_checkpoint(ckpt)
            self.params = count_parameters(self.raw_model)  # trainable as of the (resumed) step
            self._measure_compute()
            self.loggers = (MetricLoggers(run_dir, cfg, self.state.counters.step if ckpt else None)
                            if self.world.main else None)
            if ckpt and self.world.main:  # a resume that fails on a damaged checkpoint or log keeps it
                write_run_config(run_dir, cfg, derived=_derived(cfg))
        except BaseException:
            self.peak_memory.stop()  # a failed start leaves no sampler behind
            raise
        self.last_eval: dict[str, float] = {}
        self.eval_step = -1
        self.step_time, self.step_tokens = 0.0, 0  # this invocation's update steps only
        self.in_a_row = 0  # non-finite losses since the last good step

    def _measure_compute(self) -> None:
        """The model FLOPs of a trained token (each rank's micro-batches of batch_size / world
        sequences) and the device's peak, for the FLOP/s and MFU of the records and summary."""
        cfg, world = self.cfg, self.world
        sequences = max(1, cfg.train.batch_size // world.size)
        self.flops_per_token = model_flops(self.raw_model, cfg.data.seq_len, sequences)["train"]
        precision = resolve_precision(cfg.train.precision, self.device)
        self.peak_flops, self.peak_note = device_peak(self.device, precision, self.tf32)

    def compute_rate(self, tok_per_s: float) -> dict[str, float]:
        """flops_per_s (model FLOPs, the whole job) at `tok_per_s`, and mfu (of the peak of all
        the job's devices) where the device's peak is known."""
        rate = {"flops_per_s": self.flops_per_token * tok_per_s}
        if self.peak_flops:
            rate["mfu"] = rate["flops_per_s"] / (self.peak_flops * self.world.size)
        return rate

    def _build_data(self, ckpt: Path | None, init_from: Path | None) -> None:
        cfg, world, tc = self.cfg, self.world, self.cfg.train
        # A resumed run reads with its own tokenizer, one started --init-from with its source's.
        tokenizer_file = (self.run_dir / "tokenizer.json" if ckpt else
                          init_tokenizer_dir(init_from) / "tokenizer.json" if init_from else None)
        if not world.main:
            world.barrier()  # rank 0 tokenises and fills the cache first; the others read it
        data = prepare(cfg.data, cfg.model_dims()["vocab_size"], tokenizer_file,
                       **prepare_options(cfg))
        if world.main:
            # Only once the inputs have proven valid; a resume's config.json once its checkpoint has.
            write_run_files(self.run_dir, cfg, data.tokenizer, data.eos_token, config=not ckpt,
                            derived=_derived(cfg))
            world.barrier()
        self.sampler = BlockSampler(Blocks(data.train, cfg.data.seq_len), tc.batch_size, tc.seed)
        self.val_blocks = Blocks(data.val, cfg.data.seq_len)
        if len(self.val_blocks) == 0:
            raise UserError("the validation split is shorter than one block; raise --val-fraction "
                            "or lower --seq-len")

    def _build_model(self, init_from: Path | None) -> None:
        cfg, tc = self.cfg, self.cfg.train
        torch.manual_seed(tc.seed)
        dtype = weight_dtype(resolve_precision(tc.precision, self.device))
        self.raw_model = build_model(cfg, device=self.device, param_dtype=dtype)
        cast_parameters_(self.raw_model.parameters(), dtype)  # a plugin layer built the old way
        if init_from:
            init_weights_from(self.raw_model, init_from)
        include_warm_start_params(self.raw_model, cfg)
        apply_activation_checkpointing(self.raw_model, tc.activation_checkpointing)
        if tc.compile:  # after checkpointing's flags, before FSDP shards the blocks (torchtitan's order)
            compile_blocks(self.raw_model)
        self.model = distributed.wrap(self.raw_model, self.world, self.device)
        self.optimizer = build_optimizer(self.raw_model, cfg.optimizer, cfg.rank, tc.grad_accum)
        self.loss_fn = build_loss(cfg, self.world)  # the objective; evaluation reports cross-entropy
        self.tricks = CycleTricks(self.raw_model, self.optimizer, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule.name, tc.steps,
                                         cfg.warmup_steps, cfg.schedule.min_lr_ratio,
                                         cfg.schedule.restart_warmup, self.tricks.cycle_start,
                                         **schedule_options(cfg))
        self.pruner = Pruner(self.raw_model, cfg)
        self.meta = checkpoint_meta(cfg)

    def _train_state(self) -> TrainState:
        model, optimizer, world = self.model, self.optimizer, self.world
        counters = Counters()
        return TrainState(counters, {
            "model": Part(lambda: distributed.model_state(model, world),
                          lambda w: distributed.load_model_state(model, world, w)),
            "optimizer": Part(lambda: distributed.optimizer_state(model, optimizer, world),
                              lambda s: distributed.load_optimizer_state(model, optimizer, world, s)),
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "rng": RNGState(self.device),
            # A checkpoint from before pruning existed counts its earlier steps at full size.
            "prune": Part(self.pruner.state_dict,
                          lambda s: self.pruner.load_state_dict(s, counters.step)),
            # A checkpoint from before the tricks saved their step resumes them at its own.
            "tricks": Part(self.tricks.state_dict,
                           lambda s: self.tricks.load_state_dict(s or {"step": counters.step})),
            "rounding": ROUNDING.seed(self.cfg.train.seed),  # bf16 weights' stochastic rounding
        }, later=("prune", "tricks", "rounding"))

    def state_dict(self) -> dict[str, Any]:
        """The whole training state (gathered on every rank: FSDP needs all of them)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    def load_checkpoint(self, ckpt: Path) -> None:
        state = read_checkpoint(ckpt)
        if state.get("model_only") or "optimizer" not in state:
            raise UserError(f"{ckpt} holds weights without a training state (written by convert, "
                            f"densify or soup); start a new run from it with --init-from "
                            f"{ckpt.parent.parent}")
        if missing := self.state.missing(state):
            raise UserError(f"checkpoint {ckpt} lacks {', '.join(missing)}; it is damaged, resume "
                            "from an earlier checkpoint")
        with refusing_damage(ckpt):
            self.load_state_dict(state)

    def save_checkpoint(self) -> Path:
        """Every rank gathers (FSDP needs all); rank 0 writes; all wait for the file."""
        state = self.state_dict()
        weights = state.pop("model")
        step = self.state.counters.step
        path = self.run_dir / "checkpoints" / f"step_{step:07d}"
        if self.world.main:
            path = save_checkpoint(self.run_dir, step, weights, state, self.meta,
                                   self.cfg.train.keep_checkpoints)
        self.world.barrier()
        return path

    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor, sync: bool = True,
                              check: bool = False) -> torch.Tensor | None:
        """One micro-batch: forward, loss, backward of loss / grad_accum; returns the loss
        (detached, on the device: reading it is a host sync, which the step does once).
        `sync=False` defers DDP's gradient reduction to the last micro-batch. With `check` the
        loss is read before its backward, and a non-finite one skips it (None is returned)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        head = plain_head(self.raw_model) if self.loss_fn.chunked else None
        with distributed.no_sync(self.model, last=sync):
            if head is None:
                with self.autocast:
                    logits = self.model(x)
                loss = self.loss_fn(logits, y)
            else:  # never the whole batch's logits: the loss forms them chunk by chunk
                with self.autocast:
                    hidden = self.model(x, return_hidden=True)
                    loss = self.loss_fn.from_hidden(hidden, head.weight, y)
            if check and not math.isfinite(loss.item()):
                return None
            backward = getattr(self.optimizer, "backward", torch.Tensor.backward)  # per-layer's
            backward(loss / self.cfg.train.grad_accum)
        return loss.detach()

    def _micro_batches(self) -> torch.Tensor:
        """Forward and backward of the step's `grad_accum` micro-batches; returns their summed
        loss (float64, on the device; non-finite if any loss was).

        Each loss is read before its backward only under per-layer updates (never data-parallel):
        without accumulation their hooks step during that backward, with it the check spares the
        rest of a lost step. Otherwise a non-finite loss's backward runs (NaN gradients, dropped
        with the step) and the step reads the sum once: no host sync per micro-batch."""
        tc = self.cfg.train
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        micro_batch = getattr(self.optimizer, "micro_batch", None)  # per-layer: is it the last?
        check, lost = micro_batch is not None and not self.world.active, False
        for micro in range(tc.grad_accum):
            x, y = self.sampler.next_batch(self.world.rank, self.world.size)
            if lost:
                continue  # the step is lost: draw its batches (the same data after), skip the work
            last = micro == tc.grad_accum - 1
            if micro_batch:
                micro_batch(last)
            loss = self.forward_backward_step(x, y, sync=last, check=check)
            lost = loss is None
            total += float("nan") if lost else loss.double()
        return total

    def train_step(self) -> dict[str, Any] | None:
        """One update step; returns its record, or None when a non-finite loss skipped it."""
        cfg, tc, c = self.cfg, self.cfg.train, self.state.counters
        t0 = time.perf_counter()
        self.loss_fn.step = c.step  # sample reweighting's warm-up counts update steps
        total = self._micro_batches()
        # Which parameters train can change during a run (ReLoRA's warm start): ask each step.
        trainable = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.pruner.before_step()
        # Per-layer hooks that step during backward have clipped on their own. Clipping before
        # the finite check touches only gradients, which a skipped step drops.
        in_hooks = getattr(self.optimizer, "steps_in_hooks", False)
        clip = 0.0 if in_hooks else cfg.optimizer.grad_clip
        norm = _full(torch.nn.utils.clip_grad_norm_(trainable, clip)) if clip else None
        # The step's one host sync: whether it updates, and what it logs.
        loss_sum, grad_norm = _read(total, norm)
        loss_sum = self.world.mean(loss_sum)
        if not math.isfinite(loss_sum):
            self._skip(loss_sum)
            return None
        self.in_a_row = 0
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        grad_norm = getattr(self.optimizer, "grad_norm", None) if grad_norm is None else grad_norm
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        c.step += 1
        events = {**self.tricks.after_step(c.step), **self.pruner.after_step(c.step, self.optimizer)}
        c.tokens_seen += cfg.tokens_per_step
        dt = time.perf_counter() - t0
        self.step_time, self.step_tokens = self.step_time + dt, self.step_tokens + cfg.tokens_per_step
        record = {"step": c.step, "loss": loss_sum / tc.grad_accum,
                  **self.loss_fn.step_metrics(self.world.mean), "lr": lr, "grad_norm": grad_norm,
                  "tokens": c.tokens_seen, "tok_per_s": cfg.tokens_per_step / dt,
                  **self.compute_rate(cfg.tokens_per_step / dt), "elapsed_s": c.elapsed_s, **events}
        if c.skipped_nonfinite:
            record["skipped_nonfinite"] = c.skipped_nonfinite
        return record

    def _skip(self, loss_sum: float) -> None:
        """Drop the update: the weights, optimizer and schedule stay at the last good step."""
        c = self.state.counters
        self.optimizer.zero_grad(set_to_none=True)
        c.skipped_nonfinite, self.in_a_row = c.skipped_nonfinite + 1, self.in_a_row + 1
        tqdm.write(f"step {c.step + 1}: loss {loss_sum}, update skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.cfg.train.max_nonfinite_steps:
            saved = self.save_checkpoint()
            raise UserError(
                f"loss was {loss_sum} for {self.in_a_row} update steps in a row at step "
                f"{c.step + 1}; the last good state is saved in {saved}; resume it with a "
                "lower --lr or a higher --warmup-steps")

    def evaluate(self) -> dict[str, float]:
        """val_loss, val_ppl and val_tokens on the run's fixed validation blocks."""
        tc = self.cfg.train
        self.last_eval = evaluate(self.model, self.val_blocks, tc.batch_size, tc.eval_batches,
                                  self.device, self.autocast, self.world,
                                  chunk_tokens=self.cfg.loss.chunk_tokens)
        self.eval_step = self.state.counters.step
        return self.last_eval

    def _eval_record(self) -> dict[str, Any]:
        """The validation loss, and the model's health when asked, for the step's record."""
        record: dict[str, Any] = dict(self.evaluate())
        tc = self.cfg.train
        if tc.health and self.world.parallel != "fsdp":  # FSDP forwards need every rank
            x_val, _ = self.val_blocks.batch(range(min(len(self.val_blocks), tc.batch_size)))
            record.update(health_record(self.raw_model, x_val.to(self.device)))
        tqdm.write(f"step {self.eval_step}: val loss {record['val_loss']:.4f}, "
                   f"ppl {record['val_ppl']:.2f}")
        return record

    def train(self, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Step until `train.steps` or a stop signal; return the run summary (also in
        summary.json). `on_step(step, record)` runs after each update step."""
        tc, c, world = self.cfg.train, self.state.counters, self.world
        bar = tqdm(total=tc.steps, initial=c.step, disable=not (tc.progress and world.main),
                   unit="step", dynamic_ncols=True, desc=f"{self.cfg.method.name}")
        c.start_clock()
        self.model.train()
        try:
            final_ckpt, interrupted = self._loop(bar, on_step)
        except BaseException:
            self.peak_memory.stop()
            raise
        return self._summary(final_ckpt, interrupted)

    def _loop(self, bar: tqdm, on_step: Callable[[int, dict[str, Any]], None] | None
              ) -> tuple[Path, str | None]:
        tc, c, world = self.cfg.train, self.state.counters, self.world
        interrupted = None
        with _StopFlag() as stop:
            while c.step < tc.steps:
                record = self.train_step()
                if record is None:
                    continue
                if tc.eval_every and (c.step % tc.eval_every == 0 or c.step == tc.steps):
                    record.update(self._eval_record())
                if self.loggers:
                    self.loggers.log(record)
                bar.update(1)
                if c.step % tc.log_every == 0 or c.step == tc.steps:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
                if tc.save_every and c.step % tc.save_every == 0 and c.step < tc.steps:
                    self.save_checkpoint()
                if on_step:
                    on_step(c.step, record)
                # Every rank stops at the same step (torchrun signals each process on its own).
                if world.any(stop.signal is not None):
                    interrupted = signal.Signals(stop.signal or signal.SIGTERM).name
                    break
            bar.close()
            return self.save_checkpoint(), interrupted

    def _summary(self, final_ckpt: Path, interrupted: str | None) -> dict[str, Any]:
        cfg, c = self.cfg, self.state.counters
        peak, peak_kind = self.peak_memory.result()
        if self.eval_step != c.step:
            self.evaluate()
        elapsed = c.elapsed_s
        if hasattr(self.model, "reshard"):  # FSDP2 leaves the root's weights gathered after a forward
            self.model.reshard()
        raw = self.raw_model
        tok_per_s = self.step_tokens / self.step_time if self.step_time > 0 else 0.0
        summary = {
            "run_dir": str(self.run_dir), "checkpoint": str(final_ckpt),
            "status": f"interrupted by {interrupted}" if interrupted else "finished",
            "step": c.step, "steps": cfg.train.steps, "method": cfg.method.name,
            "preset": cfg.model.preset, **self.last_eval, "params": self.params,
            **self.pruner.summary(),
            "training_state_bytes": measure_memory(raw, self.optimizer).to_dict(),
            "estimated_state_bytes": estimate_memory(raw, next(raw.parameters()).dtype, cfg.optimizer,
                                                     cfg.rank, cfg.train.grad_accum).to_dict(),
            "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
            "tokens_seen": c.tokens_seen, "skipped_nonfinite": c.skipped_nonfinite,
            "train_time_s": elapsed,
            "tok_per_s": tok_per_s, "flops_per_token": self.flops_per_token,
            "mfu": None, **self.compute_rate(tok_per_s), "mfu_note": self.peak_note,
            "wall_time_s": time.perf_counter() - self.wall_start, "device": str(self.device),
            "world_size": self.world.size,
            "parallel": self.world.parallel if self.world.active else "none",
        }
        if self.loggers:
            self.loggers.close(summary)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _derived(cfg: RunConfig) -> dict[str, Any]:
    """What config.json records beside the config: the values derived from it."""
    return {"rank": cfg.rank, "lora_alpha": cfg.lora_alpha, "density": cfg.density,
            "warmup_steps": cfg.warmup_steps, "tokens_per_step": cfg.tokens_per_step}


def _full(norm: torch.Tensor) -> torch.Tensor:
    """The gradient norm clip_grad_norm_ returns, as a plain tensor (a DTensor under FSDP)."""
    full = getattr(norm, "full_tensor", None)
    return full() if full else norm


def _read(total: torch.Tensor, norm: torch.Tensor | None) -> tuple[float, float | None]:
    """(summed loss, gradient norm) as numbers, in one host sync."""
    if norm is None:
        return total.item(), None
    loss_sum, grad_norm = torch.stack([total, norm.to(total)]).tolist()
    return loss_sum, grad_norm
