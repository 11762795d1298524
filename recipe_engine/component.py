"""What a component is: the contract between the core and every plugin.

A component is a class with a kind, a registered name and a version. Its parameters are
its dataclass fields, so the core can check a recipe against them without constructing
anything. Two families:

* ``Stage`` components are what a recipe's ``stages:`` name. They declare typed input
  slots and one output artifact kind, and implement ``run(ctx)``.
* Everything else (document filters, model architectures, optimizers, executors, ...) is a
  sub-component: a stage names them inside its parameters, as ``{name: ..., **params}``,
  and builds them with ``ctx.build``. A stage lists such parameters in ``subcomponents``.

Modules defining components must import no ML framework at module level: ``recipe
plugins`` and ``recipe validate`` import them. Import heavy libraries inside ``run``.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

from .errors import StageError

REQUIRED = object()  # marker for a parameter without default


@dataclass(kw_only=True)
class Component:
    """Base of every registered component. Subclasses are ``@dataclass(kw_only=True)``."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    # parameter name -> kind of the sub-component(s) it holds ({name: ..., ...} or a list of them)
    subcomponents: ClassVar[dict[str, str]] = {}

    @classmethod
    def params_spec(cls) -> dict[str, tuple[Any, Any]]:
        """Parameter name -> (type annotation, default or REQUIRED)."""
        hints = typing.get_type_hints(cls)
        spec: dict[str, tuple[Any, Any]] = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = REQUIRED
            spec[f.name] = (hints.get(f.name, Any), default)
        return spec

    def params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.params_spec()}


@dataclass
class Artifact:
    """A committed stage output, as a downstream stage sees it."""

    kind: str
    path: Path
    manifest: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        """Facts the producing stage published for its consumers (vocab_size, num_tokens...)."""
        return self.manifest.get("meta", {})


class Executor(Component):
    """Runs a picklable function over items, in parallel where it can (kind ``executor``)."""

    kind: ClassVar[str] = "executor"

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """Yield ``fn(item)`` for every item, in the order of ``items``."""
        raise NotImplementedError


ProgressFn = Callable[[str, float, "float | None", str], None]


@dataclass
class StageContext:
    """Everything a running stage may touch. The runner owns commit and bookkeeping."""

    stage: str
    fingerprint: str
    inputs: dict[str, Artifact]
    output: Path  # write the artifact here; renamed into the store when run() returns
    work: Path  # scratch that survives a crash of this stage (resume state); removed on commit
    executor: Executor
    build_fn: Callable[[str, Any], Component]
    progress_fn: ProgressFn | None = None
    log_fn: Callable[[str], None] | None = None
    max_skip_fraction: float = 0.05
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers for the summary + manifest
    counts: dict[str, int] = field(default_factory=dict)  # records in/out, per-reason drops/skips
    meta: dict[str, Any] = field(default_factory=dict)  # facts for downstream stages

    def build(self, kind: str, spec: Any) -> Component:
        """Construct a sub-component named in this stage's params: ``{name: x, **params}``."""
        return self.build_fn(kind, spec)

    def progress(self, done: float, total: float | None = None, unit: str = "") -> None:
        if self.progress_fn:
            self.progress_fn(self.stage, done, total, unit)

    def log(self, message: str) -> None:
        if self.log_fn:
            self.log_fn(f"[{self.stage}] {message}")
        else:
            print(f"[{self.stage}] {message}", file=sys.stderr)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def skip(self, reason: str, n: int = 1) -> None:
        """Count a malformed record that was skipped (``skipped.<reason>`` in the manifest)."""
        self.count(f"skipped.{reason}", n)

    def check_skips(self, seen: int) -> None:
        """Fail the stage when more than ``max_skip_fraction`` of ``seen`` records were skipped."""
        skipped = sum(v for k, v in self.counts.items() if k.startswith("skipped."))
        if seen and skipped / seen > self.max_skip_fraction:
            reasons = {k: v for k, v in self.counts.items() if k.startswith("skipped.")}
            raise StageError(
                f"{skipped} of {seen} records were malformed ({reasons}), more than "
                f"max_skip_fraction={self.max_skip_fraction}; fix the input or raise the threshold"
            )


@dataclass(kw_only=True)
class Stage(Component):
    """A component a recipe stage names. Declares its input slots and output kind."""

    inputs: ClassVar[dict[str, str]] = {}  # slot -> artifact kind
    output: ClassVar[str] = ""

    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError

    def fingerprint_extra(self) -> str | None:
        """Extra material for the fingerprint that params don't capture (a source's file
        listing, say). Must be cheap: ``recipe plan`` calls it."""
        return None

    def describe_plan(self, inputs_meta: dict[str, dict[str, Any]],
                      build: Callable[[str, Any], Component]) -> dict[str, Any]:
        """Estimates for ``recipe plan`` (tokens, FLOPs, memory), from the inputs' ``meta``
        (the real one when the input is cached, else that input's own estimate). Return
        ``{"meta": {...}}`` to pass estimates downstream; other keys are shown to the user.
        ``build`` constructs a sub-component named in this stage's params."""
        return {}
