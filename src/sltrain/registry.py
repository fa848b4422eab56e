"""Registries of the pluggable parts of a run: parameterisations, optimizers, schedules, losses, norms.

Each entry is a name, the object that builds the part, and a pydantic class of its options (peft's
per-method config classes). A registry owns its names: the config schema, the command-line flags
and `sltrain memory` read them from here, so a new part is one file plus one `register` line.

    from sltrain.registry import METHODS, Options
    class MyOptions(Options):
        my_knob: float = Field(0.5, gt=0, description="what it does")
    METHODS.register("mine", MyLinear, options=MyOptions, doc="one line for --help")

Plugins outside the package register the same way; they are imported from the `sltrain.plugins`
entry-point group and from the modules named in `SLTRAIN_PLUGINS` (comma-separated).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model
from pydantic.fields import FieldInfo

from sltrain.errors import UserError

PLUGIN_GROUP = "sltrain.plugins"
PLUGIN_ENV = "SLTRAIN_PLUGINS"


class Options(BaseModel):
    """The options of one registered entry; each field becomes a config key and a flag of the
    entry's config section. An option several entries declare must be declared identically."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass
class Entry:
    """One registered part. `validate(cfg)` (optional) refuses a RunConfig this entry cannot run."""

    name: str
    obj: Any
    options: type[Options] = Options
    doc: str = ""
    validate: Callable[[Any], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


class Registry:
    """Named entries of one kind, filled on first use by importing the built-in modules (and the
    plugins), so that importing this module stays cheap and free of cycles."""

    def __init__(self, kind: str, section: str, key: str = "name", builtins: tuple[str, ...] = ()):
        self.kind, self.section, self.key = kind, section, key
        self._builtins = builtins
        self._entries: dict[str, Entry] = {}
        self._loaded = False
        self._options_model: type[BaseModel] | None = None

    # ---- registration ------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, *, options: type[Options] = Options,
                 doc: str = "", validate: Callable[[Any], None] | None = None,
                 replace: bool = False, **info: Any) -> Any:
        """Register `obj` as `name` (returns `obj`); without `obj`, a decorator that does."""
        if obj is None:
            return lambda o: self.register(name, o, options=options, doc=doc, validate=validate,
                                           replace=replace, **info)
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower-case letters, digits, _ or -")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered already; pass replace=True")
        if not (isinstance(options, type) and issubclass(options, Options)):
            raise TypeError(f"options of {self.kind} {name!r} must subclass sltrain.registry.Options")
        self._check_consistent(name, options)
        self._entries[name] = Entry(name, obj, options, doc, validate, info)
        self._options_model = None
        return obj

    def unregister(self, name: str) -> Entry:
        """Remove entry `name` (a plugin's, or one a test registered) and return it."""
        self._load()
        entry = self._entries.pop(name)
        self._options_model = None
        return entry

    def _check_consistent(self, name: str, options: type[Options]) -> None:
        for other in self._entries.values():
            if other.name == name:
                continue
            for fname, f in options.model_fields.items():
                g = other.options.model_fields.get(fname)
                if g is not None and (g.annotation, g.default, g.alias) != (f.annotation, f.default, f.alias):
                    raise TypeError(f"option {fname!r} of {self.kind} {name!r} differs from the one "
                                    f"{other.name!r} declares; declare it identically (or share "
                                    "one Options class)")

    # ---- lookup --------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before importing: the modules register into this very registry
        for module in self._builtins:
            importlib.import_module(module)
        load_plugins()

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def names(self) -> list[str]:
        return list(self)

    def __getitem__(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}'; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def entries(self) -> list[Entry]:
        self._load()
        return list(self._entries.values())

    # ---- the options as one config section ----------------------------------------------------
    def option_fields(self) -> dict[str, FieldInfo]:
        """Every option of every entry (one field per name), in registration order."""
        fields: dict[str, FieldInfo] = {}
        for entry in self.entries():
            for fname, f in entry.options.model_fields.items():
                fields.setdefault(fname, f)
        return fields

    def owners(self, option: str) -> list[str]:
        """The entries that declare `option`."""
        return [e.name for e in self.entries() if option in e.options.model_fields]

    def options_model(self) -> type[BaseModel]:
        """A pydantic model holding every option of every entry (what the section validates)."""
        if self._options_model is None:
            fields = {name: (f.annotation, f) for name, f in self.option_fields().items()}
            self._options_model = create_model(f"{self.kind.title()}Options", __base__=Options,
                                               **fields)  # type: ignore[call-overload]
        return self._options_model

    def options_of(self, name: str, values: dict[str, Any]) -> Options:
        """Entry `name`'s own options taken from a section's `values`."""
        options = self[name].options
        return options.model_validate({k: values[k] for k in options.model_fields if k in values})


METHODS = Registry("method", "method", builtins=("sltrain.parametrize",))
OPTIMIZERS = Registry("optimizer", "optimizer", builtins=("sltrain.optim",))
SCHEDULES = Registry("schedule", "schedule", builtins=("sltrain.train.schedule",))
LOSSES = Registry("loss", "loss", builtins=("sltrain.train.losses",))
NORMS = Registry("norm", "model", key="norm", builtins=("sltrain.model.llama",))
REGISTRIES = (METHODS, OPTIMIZERS, SCHEDULES, LOSSES, NORMS)

_plugins_loaded = False


def load_plugins() -> None:
    """Import the plugin modules once: entry points of group `sltrain.plugins`, then the modules
    named in $SLTRAIN_PLUGINS. A plugin that cannot be imported is one UserError."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    names = [(ep.value, f"entry point {ep.name}") for ep in entry_points(group=PLUGIN_GROUP)]
    names += [(m.strip(), PLUGIN_ENV) for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    for module, origin in names:
        try:
            importlib.import_module(module.split(":")[0])
        except Exception as e:  # a broken plugin must not look like a bug of sltrain
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"plugin {module} (from {origin}) cannot be imported ({first}); fix it "
                            f"or remove it from {PLUGIN_ENV}") from None
