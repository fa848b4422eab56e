"""Typed run configuration: model presets, sections, loading a file plus command-line overrides.

One `RunConfig` drives a run (torchtitan-style); every field can be set in a TOML/YAML file or as a
flag, and every bad value is reported as one line naming the key, the value and the fix.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from sltrain.errors import UserError
from sltrain.files import read_json
from sltrain.registry import LOSSES, METHODS, NORMS, OPTIMIZERS, REGISTRIES, SCHEDULES, Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class Preset:
    """A LLaMA size with the SLTrain defaults the paper uses for it."""

    dim: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    rank: int
    lora_alpha: float
    density: float


# Paper sizes follow REFERENCE.md §1 (60M-7B) and the GaLore configs (9M-40M, rank = dim / 4).
# `llama-cpu` is the llama-20m shape with an 8k vocabulary: small enough to pretrain on a
# 2-core CPU in minutes.
PRESETS: dict[str, Preset] = {
    "llama-cpu": Preset(256, 688, 4, 4, 8192, 64, 32, 0.03),
    "llama-9m": Preset(128, 352, 4, 4, 32000, 32, 32, 0.03),
    "llama-20m": Preset(256, 688, 4, 4, 32000, 64, 32, 0.03),
    "llama-35m": Preset(384, 1024, 6, 8, 32000, 96, 32, 0.03),
    "llama-40m": Preset(416, 1024, 8, 8, 32000, 104, 32, 0.03),
    "llama-60m": Preset(512, 1376, 8, 8, 32000, 128, 32, 0.03),
    "llama-130m": Preset(768, 2048, 12, 12, 32000, 256, 16, 0.03),
    "llama-350m": Preset(1024, 2736, 24, 16, 32000, 256, 16, 0.03),
    "llama-1b": Preset(2048, 5461, 24, 32, 32000, 512, 8, 0.03),
    "llama-7b": Preset(4096, 11008, 32, 32, 32000, 1024, 8, 0.05),
}

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class _RegistrySection(_Section):
    """A section whose `registry.key` field names a registered entry and whose other keys, beyond
    the fields declared here, are the options the registry's entries declare (sltrain.registry)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, populate_by_name=True)
    registry: ClassVar[Registry]

    @model_validator(mode="before")
    @classmethod
    def _with_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        own = {k for name, f in cls.model_fields.items() for k in (name, f.alias) if k}
        options = {k: v for k, v in data.items() if k not in own}
        values = cls.registry.options_model().model_validate(options)
        return {**{k: v for k, v in data.items() if k in own}, **dict(values)}

    @field_validator("*")
    @classmethod
    def _known_entry(cls, v: Any, info: Any) -> Any:
        if info.field_name == cls.registry.key and v not in cls.registry:
            raise ValueError(f"unknown {cls.registry.kind} '{v}'; choose one of "
                             f"{', '.join(cls.registry)}")
        return v

    def options(self) -> Any:
        """The options of the chosen entry (an instance of its Options class)."""
        return self.registry.options_of(getattr(self, self.registry.key), self.model_dump())


class ModelConfig(_RegistrySection):
    registry = NORMS  # `norm` names a registered normalisation; its options join this section
    preset: str = "llama-cpu"
    dim: int | None = Field(None, gt=0)
    ffn_dim: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    vocab_size: int | None = Field(None, gt=1)
    norm_eps: float = Field(1e-6, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    init_std: float = Field(0.02, gt=0)
    norm: str = "pre_rmsnorm"  # LLaMA's; `sltrain train --help` lists the registered norms
    embed_proj: bool = False  # learnable embedding projection (outlier-safe pretraining)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset; choose one of {', '.join(PRESETS)}")
        return v


class MethodConfig(_RegistrySection):
    registry = METHODS  # the parameterisation; rank, density, ... are its registered options
    name: str = "sltrain"
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v


class DataConfig(_Section):
    source: str = "embedded"
    text_field: str = "text"
    seq_len: int = Field(128, gt=1)
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    # "bpe" trains a byte-level BPE on the corpus; else a Hugging Face tokenizer name (t5-base),
    # a local tokenizer folder or a tokenizer.json.
    tokenizer: str = "bpe"
    # Training tokens to read (default: a local source whole; an hf: source what the run's steps
    # use) and validation tokens (default: a local source's whole held-out text; for an hf:
    # source what evaluation reads).
    max_tokens: int | None = Field(None, gt=0)
    val_tokens: int | None = Field(None, gt=0)
    # Splits of an hf: dataset; one without `val_split` holds out the tail of each document.
    train_split: str = "train"
    val_split: str = "validation"
    # The validation blocks evaluation reads: all of them, or one of two disjoint halves, "tune"
    # for choosing hyperparameters and "report" for the results (`sltrain bench`'s [tune] stage).
    val_slice: Literal["all", "tune", "report"] = Field("all", description=(
        "all | tune (the first half of the validation blocks) | report (the second half); "
        "default all"))


class OptimizerConfig(_RegistrySection):
    registry = OPTIMIZERS  # projection ranks, momentum, ... are the optimizers' registered options
    name: str = "adamw"
    # 1.5e-3: the default run's best of 7.5e-4, 1.5e-3, 3e-3 (docs/results/default-run.md); the
    # SLTrain paper's 3e-3 is the top of that grid.
    lr: float = Field(1.5e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    # Step each parameter as soon as its gradient is complete (post-accumulate-grad hooks).
    per_layer_updates: bool = False
    # How per-layer updates clip without accumulation (sltrain/optim/per_layer.py; with
    # --grad-accum > 1 they clip exactly by the global norm): chosen by docs/results/per-layer-clipping.md.
    per_layer_clip: Literal["exact", "previous_norm", "running_norm", "update_rms", "none"] = "exact"
    # Update tricks for factored layers, every `reset_every` update steps (0 = never).
    reset_every: int = Field(0, ge=0)
    refactor: bool = False
    reset_momentum: bool = False
    state_prune: float = Field(0.999, ge=0, le=1)


class ScheduleConfig(_RegistrySection):
    registry = SCHEDULES  # formulas and their options in sltrain/train/schedule.py
    name: str = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    # 40% by default: the default run leaves its initial plateau (unigram loss) after step 100
    # only if the lr is still near its peak there (docs/results/default-run.md). The paper
    # recipes in configs/ set their own 10%.
    warmup_ratio: float = Field(0.4, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # After each reset of the optimizer state (`optimizer.reset_every`, ReLoRA cycles) the rate
    # ramps up again from zero over this many update steps (the jagged cosine).
    restart_warmup: int = Field(0, ge=0)


# The old `train.dtype` values as precisions.
OLD_DTYPES = {"float32": "fp32", "bfloat16": "bf16-mixed"}


class TrainConfig(_Section):
    # 400: the default run's seeds end within a few percent of each other; at 250 they differed by
    # up to 10%, depending on when each left the plateau (docs/results/default-run.md).
    steps: int = Field(400, gt=0)
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    eval_every: int = Field(200, ge=0)
    eval_batches: int = Field(16, gt=0)
    save_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field("auto", description=(
        "fp32 | bf16-mixed (float32 weights, gradients and states; bf16 autocast) | bf16 (all "
        "stored in bf16, updates rounded stochastically); auto: bf16-mixed on CUDA, else fp32"))
    out_dir: str | None = None
    progress: bool = True
    # At every evaluation also log model health: excess kurtosis of each block's output and the
    # output distribution's nuclear norm (on the first validation batch); `sltrain health RUN`
    # adds the weight spectra.
    health: bool = False
    # A non-finite loss skips its update step; this many in a row stop the run (last good state saved).
    max_nonfinite_steps: int = Field(5, gt=0)
    # Under torchrun: "ddp" replicates the model, "fsdp" shards it (FSDP2); ignored in one process.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Metrics go to RUN/metrics.jsonl always, and to these sinks when named.
    log_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    wandb_project: str = "sltrain"
    wandb_mode: Literal["offline", "online"] = "offline"
    # Start from the weights of this run or checkpoint (merged to dense when the method is full);
    # the optimizer, schedule and step count start afresh. See `sltrain densify`.
    init_from: str | None = None
    # Recompute block activations in the backward instead of keeping them: "none", "full" (every
    # block) or "every:K" (every K-th block); see sltrain/train/checkpointing.py.
    activation_checkpointing: str = "none"
    # torch.compile each decoder block and the loss on the logits (sltrain/train/compile.py):
    # Inductor's fused kernels on CPU and CUDA, compiled during the first steps (and again for
    # evaluation's no-grad forward).
    compile: bool = False

    @field_validator("activation_checkpointing")
    @classmethod
    def _checkpointing_mode(cls, v: str) -> str:
        if not re.fullmatch(r"none|full|every:[1-9][0-9]*", v):
            raise ValueError(f"'{v}' is not a checkpointing mode; pass none, full or every:K "
                             "(K a positive whole number: every K-th block)")
        return v

    @field_validator("log_to", mode="before")
    @classmethod
    def _split_sinks(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _precision_from_dtype(cls, data: Any) -> Any:
        """Configs and runs from before `precision` set `dtype` (bfloat16 meant autocast)."""
        if isinstance(data, dict) and "dtype" in data:
            data = dict(data)
            old = data.pop("dtype")
            data.setdefault("precision", OLD_DTYPES.get(old, old))
        return data

    @field_validator("precision", mode="before")
    @classmethod
    def _old_dtype_value(cls, v: Any) -> Any:
        return OLD_DTYPES.get(v, v)  # `--dtype bfloat16`, an alias of --precision


class LossConfig(_RegistrySection):
    registry = LOSSES  # the training objective; validation always reports the cross-entropy
    name: str = "cross_entropy"
    # Dynamic loss-based sample reweighting (sltrain/train/reweight.py): each block's loss is
    # weighted by softmax(f(normalised loss) / temperature) over the (global) batch; uniform
    # weights during the first `reweight_warmup_steps` update steps.
    reweight: Literal["none", "uniform", "linupper", "quadratic", "extremes"] = "none"
    reweight_temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    reweight_delta: float = Field(1.0, gt=0, allow_inf_nan=False)
    reweight_warmup_steps: int = Field(0, ge=0)
    # Per-token losses run from the final hidden states, this many tokens' float32 logits at a
    # time (forward and backward) instead of the whole batch's; 0 = full logits.
    chunk_tokens: int = Field(1024, ge=0)


class PruneConfig(_Section):
    # Gradual magnitude pruning (sltrain/train/prune.py): the sparsity of the pruned tensors ramps
    # from 0 at prune_start to target_sparsity at prune_end (fractions of the run's update steps),
    # one pruning event every prune_every update steps. 0 = no pruning.
    target_sparsity: float = Field(0.0, ge=0, lt=1)
    prune_start: float = Field(0.25, ge=0, le=1)
    prune_end: float = Field(0.75, ge=0, le=1)
    prune_every: int = Field(10, gt=0)
    prune_schedule: Literal["cubic", "linear"] = "cubic"

    @model_validator(mode="after")
    def _ordered(self) -> PruneConfig:
        if self.prune_start > self.prune_end:
            raise UserError(f"--prune-start {self.prune_start} is after --prune-end "
                            f"{self.prune_end}; pass a start no later than the end")
        return self


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)

    @model_validator(mode="after")
    def _entries_accept(self) -> RunConfig:
        """Each chosen entry accepts the run (its `validate` hook), and no option that belongs to
        one entry alone (`exclusive`) is set while another is chosen (a UserError propagates)."""
        for registry in REGISTRIES:
            section = getattr(self, registry.section)
            chosen = registry[getattr(section, registry.key)]
            for entry in registry.entries():
                for name, f in entry.options.model_fields.items():
                    value = getattr(section, name)
                    if (entry is not chosen and _exclusive(f) and value != f.default
                            and name not in chosen.options.model_fields):
                        flag, key = flag_for(f"{registry.section}.{name}"), flag_for(
                            f"{registry.section}.{registry.key}")
                        raise UserError(f"{flag} {value} is an option of {registry.kind} "
                                        f"{entry.name}, not {chosen.name}; pass {key} "
                                        f"{entry.name} or drop {flag}")
            if chosen.validate is not None:
                chosen.validate(self)
        return self

    @model_validator(mode="after")
    def _dims_build(self) -> RunConfig:
        from sltrain.model.llama import check_dims  # loads torch: only once a config is built

        check_dims(self.model_dims())
        return self

    # ---- derived values -------------------------------------------------------------------
    @property
    def preset(self) -> Preset:
        return PRESETS[self.model.preset]

    @property
    def rank(self) -> int:
        return self.method.rank if self.method.rank is not None else self.preset.rank

    @property
    def lora_alpha(self) -> float:
        return self.method.lora_alpha if self.method.lora_alpha is not None else self.preset.lora_alpha

    @property
    def density(self) -> float:
        return self.method.density if self.method.density is not None else self.preset.density

    def method_options(self) -> dict[str, Any]:
        """The chosen parameterisation's options, an unset one (None) taken from the preset."""
        options = dict(self.method.options())
        return {k: getattr(self.preset, k) if v is None and hasattr(self.preset, k) else v
                for k, v in options.items()}

    @property
    def warmup_steps(self) -> int:
        s = self.schedule
        return s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * self.train.steps)

    @property
    def tokens_per_step(self) -> int:
        t = self.train
        return t.batch_size * t.grad_accum * self.data.seq_len

    def model_dims(self) -> dict[str, Any]:
        """The decoder's shape: the preset with any per-field overrides applied."""
        m, p = self.model, self.preset
        return dict(
            dim=m.dim or p.dim,
            ffn_dim=m.ffn_dim or p.ffn_dim,
            n_layers=m.n_layers or p.n_layers,
            n_heads=m.n_heads or p.n_heads,
            vocab_size=m.vocab_size or p.vocab_size,
            max_seq_len=self.data.seq_len,
            norm_eps=m.norm_eps,
            rope_theta=m.rope_theta,
            norm=m.norm,
            mix_ln_ratio=m.mix_ln_ratio,
            embed_proj=m.embed_proj,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=False)


def _exclusive(f: Any) -> bool:
    extra = f.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("exclusive"))


# ---- flags ------------------------------------------------------------------------------------
# Each field gets `--section.field`; field names are unique across sections, so each also gets a
# bare `--field`. The "what is it" field of a section is spelled as the section (`--method`).
_SECTION_KEY = {"name", "preset", "source"}
_EXTRA_ALIASES = {"model.preset": ["preset"], "train.precision": ["dtype"]}


def section_fields(section: str) -> dict[str, FieldInfo]:
    """The keys of config section `section`: its own fields, then its registry's options."""
    cls = RunConfig.model_fields[section].annotation
    fields = dict(cls.model_fields)  # type: ignore[union-attr]
    registry = getattr(cls, "registry", None)
    if registry is not None:
        fields.update({k: f for k, f in registry.option_fields().items() if k not in fields})
    return fields


def flag_table() -> dict[str, str]:
    """Map every accepted flag spelling (without dashes) to its dotted config key."""
    table: dict[str, str] = {}
    for section in RunConfig.model_fields:
        for field, info in section_fields(section).items():
            key = f"{section}.{field}"
            bare = section if field in _SECTION_KEY else field
            for name in [key, bare, *([info.alias] if info.alias else []),
                         *_EXTRA_ALIASES.get(key, [])]:
                table[name] = key
                table[name.replace("_", "-")] = key
    return table


def flag_for(key: str) -> str:
    section, field = key.split(".", 1)
    return "--" + (section if field in _SECTION_KEY else field).replace("_", "-")


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing .toml or .yaml file")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"config file {path} has an unknown type; use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0]
        raise UserError(f"config file {path} cannot be parsed ({first}); fix its syntax") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of sections, e.g. [train]")
    return data


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    section, field = key.split(".", 1)
    tree.setdefault(section, {})
    if not isinstance(tree[section], dict):
        raise UserError(f"config section [{section}] must be a table, not {tree[section]!r}")
    tree[section][field] = value


def build_config(tree: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a RunConfig, turning the first problem into a UserError."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise UserError(
                f"unknown config key '{loc}'; see `sltrain train --help` for the valid keys"
            ) from None
        msg = err["msg"].removeprefix("Value error, ")
        hint = f" or {flag_for(loc)}" if loc.count(".") == 1 else ""
        raise UserError(
            f"invalid config value {loc} = {err.get('input')!r}: {msg}; "
            f"fix it in the config file{hint}"
        ) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a config file (TOML, YAML or JSON; optional) and apply dotted-key overrides."""
    tree = read_config_file(Path(path)) if path else {}
    for key, value in (overrides or {}).items():
        _set(tree, key, value)
    return build_config(tree)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 5}} -> {"train.steps": 5}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# Sections and keys whose change makes a run's checkpoints meaningless for the new config.
RESUME_LOCKED = ("model.", "method.", "data.", "train.batch_size", "train.grad_accum", "train.seed",
                 "prune.")


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config tree a run saved in its folder (without the derived values)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json); pass the folder of a run")
    saved = read_json(path, "restore it from a backup, or start a new run with another --out-dir")
    saved.pop("derived", None)
    saved.pop("derived_from", None)  # what wrote a model-only run (convert, densify, soup)
    return saved


def locked_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys of `new` (dotted) that a run saved as `saved` (a tree) cannot continue with.
    A key the saved config lacks (a run made before the key existed) counts as its default."""
    flat = {**flatten(RunConfig().to_dict()), **flatten(saved)}
    return [
        f"{k} ({flat.get(k)!r} -> {v!r})"
        for k, v in new.items()
        if k.startswith(RESUME_LOCKED) and str(flat.get(k)) != str(v)
    ]


def run_clashes(run_dir: Path, cfg: RunConfig) -> list[str]:
    """The keys by which the run saved in `run_dir` differs from `cfg` in ways it cannot continue."""
    return locked_differences(saved_config(run_dir), flatten(cfg.to_dict()))


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """The saved config of `run_dir` with `overrides` on top, refusing incompatible changes."""
    saved = saved_config(run_dir)
    clashes = locked_differences(saved, overrides)
    if clashes:
        raise UserError(
            f"cannot resume {run_dir} with a different {', '.join(clashes)}; drop these "
            "overrides or start a new run with another --out-dir"
        )
    for k, v in overrides.items():
        _set(saved, k, v)
    return build_config(saved)
