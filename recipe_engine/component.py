"""What a component is: the contract between the core and every plugin.

A component is a dataclass with a kind, a registered name and a version. Its parameters are
its dataclass fields, so the core can check a recipe against them without constructing
anything. Metadata is declared with class keywords, never as fields, so a typo cannot turn
it into a recipe parameter::

    @dataclass(kw_only=True)
    class NoTodo(DocumentFilter, name="no_todo", version="2"):
        '''Drop documents with too many TODO markers.'''   # the description, unless given
        max_todos: int = 5

Keywords: ``kind`` (on a base class: the family its subclasses belong to), ``name`` (the
registered name; a class without one is abstract and cannot be registered), ``version``
(default ``"1"``; bump it when the output for the same parameters changes), ``description``
(default: the docstring's first line), ``tracks_package_version`` (default true: the
fingerprint also records the installed version of the component's package, so upgrading the
package reruns its stages; false for components whose output the package version cannot
change) and, on stages, ``inputs`` (slot -> artifact kind), ``output`` (artifact kind),
``distributed`` (default false: see below) and ``observational`` (default none: parameters
that do not change the stage's output, left out of its fingerprint; see ``Stage``).
An input slot declared with a one-element list (``inputs={"shards": ["shards"]}``) takes
one or more upstream stages (``inputs: {shards: [code, docs]}`` in a recipe), in order.
``check_declaration`` states the rules; the registry applies it to every class a plugin
registers.

Two families:

* ``Stage`` components are what a recipe's ``stages:`` name. They declare typed input slots
  and one output artifact kind, and implement ``run(ctx)``. In a multi-node job (one
  ``recipe run`` per node, ``NNODES`` > 1) node 0 runs every stage and commits it; a stage
  declared ``distributed=True`` also runs on every other node, through
  ``run_follower(ctx)`` (this node's share: its local processes; no output, no commit).
* Everything else (document filters, model architectures, optimizers, executors, ...) is a
  sub-component. A parameter annotated with a component base class (``model: ModelConfig``,
  ``filters: list[DocumentFilter]``, ``scheduler: Scheduler | None``) holds sub-components: a
  recipe writes ``{name: ..., **params}`` (or a bare name) there, validation checks it
  against the components registered under that base's kind, and the stage receives built
  instances of that type.

Parameter problems: override ``check(problems)`` and call ``problems.add(key, message)`` for
every problem; the core reports each under the recipe key of that parameter, all at once.
Checks must be cheap and side-effect free: validation constructs components to run them.

Modules defining components must import no ML framework at module level: ``recipe
plugins`` and ``recipe validate`` import them. Import heavy libraries inside ``run``.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, TypeVar, Union

from .errors import Problem, RecipeError, StageError, did_you_mean

REQUIRED = object()  # marker for a parameter without default
# class keywords that declare metadata; none may be a field or a plain class attribute
METADATA = ("kind", "name", "version", "description", "inputs", "output", "distributed",
            "observational")

C = TypeVar("C", bound="Component")


class Problems:
    """Collects parameter problems in ``Component.check``; keys are parameter names."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(Problem(key=key, message=message))

    def require(self, ok: bool, key: str, message: str) -> None:
        """Add ``message`` under ``key`` unless ``ok``."""
        if not ok:
            self.add(key, message)

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass(kw_only=True)
class Component:
    """Base of every registered component. Subclasses are ``@dataclass(kw_only=True)``."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    tracks_package_version: ClassVar[bool] = True

    def __init_subclass__(cls, *, kind: str | None = None, name: str | None = None,
                          version: str | int | None = None, description: str | None = None,
                          tracks_package_version: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        clash = [k for k in METADATA if k in own.get("__annotations__", {}) or k in own]
        if clash and cls.__module__ != __name__:  # the core's own bases declare defaults
            raise TypeError(
                f"{cls.__qualname__}: {', '.join(clash)} must be declared as class keywords "
                f"(class {cls.__name__}(Base, {clash[0]}=...)), not as attributes or fields")
        if kind is not None:
            cls.kind = kind
        cls.name = name or ""  # never inherited: a subclass without a name is abstract
        cls.version = str(version) if version is not None else "1"
        if tracks_package_version is not None:
            cls.tracks_package_version = tracks_package_version
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.description = description if description is not None else (doc[0] if doc else "")

    def __post_init__(self) -> None:
        problems = Problems()
        self.check(problems)
        if problems:
            raise RecipeError(problems.items)

    def check(self, problems: Problems) -> None:
        """Report parameter problems with ``problems.add(param, message)``."""

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
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = REQUIRED
            spec[f.name] = (hints.get(f.name, Any), default)
        return spec

    @classmethod
    def subcomponent_params(cls) -> dict[str, tuple[type[Component], bool]]:
        """Parameters holding sub-components: name -> (base class, is a list), derived from
        the annotations (``ModelConfig``, ``list[DocumentFilter]``, ``X | None``)."""
        out = {}
        for pname, (annotation, _) in cls.params_spec().items():
            found = _component_base(annotation)
            if found:
                out[pname] = found
        return out

    def params(self) -> dict[str, Any]:
        """The parameters as a recipe would write them (sub-components as ``{name, ...}``)."""
        return {name: as_spec(getattr(self, name)) for name in self.params_spec()}


def as_spec(value: Any) -> Any:
    """A parameter value as a recipe would write it: components become ``{name, ...}``."""
    if isinstance(value, Component):
        return {"name": value.name, **value.params()}
    if isinstance(value, (list, tuple)):
        return [as_spec(v) for v in value]
    return value


def _component_base(annotation: Any) -> tuple[type[Component], bool] | None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        return _component_base(rest[0]) if len(rest) == 1 else None
    if origin in (list, tuple) and args and _is_component(args[0]):
        return args[0], True
    if _is_component(annotation):
        return annotation, False
    return None


def _is_component(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, Component)


def check_declaration(cls: type) -> list[str]:
    """What is wrong with a class a plugin registers (empty when it can be registered)."""
    if not (isinstance(cls, type) and issubclass(cls, Component)):
        return [f"{cls!r} is not a recipe_engine Component"]
    problems = []
    if not cls.kind:
        problems.append("has no kind: subclass a base such as Stage, DocumentFilter, "
                        "ModelConfig or Executor, or declare kind=... on its base")
    if not cls.name:
        problems.append("has no name: declare it with a class keyword "
                        f"(class {cls.__name__}(..., name='my_{cls.kind or 'thing'}'))")
    elif not cls.name.replace("_", "a").replace("-", "a").isalnum():
        problems.append(f"name {cls.name!r}: use letters, digits, '_' and '-'")
    if "__dataclass_fields__" not in cls.__dict__:
        problems.append("is not a dataclass: decorate it with @dataclass(kw_only=True) so its "
                        "fields are its parameters")
    if issubclass(cls, Stage) and not cls.output:
        problems.append("is a stage without an output artifact kind (output=...)")
    if issubclass(cls, Stage) and cls.distributed and cls.run_follower is Stage.run_follower:
        problems.append("is declared distributed=True but does not implement run_follower(ctx) "
                        "(what it does on nodes other than node 0)")
    if issubclass(cls, Stage):
        for slot, kind in cls.inputs.items():
            if not (isinstance(kind, str) and kind) and not (
                    isinstance(kind, list) and len(kind) == 1 and isinstance(kind[0], str)):
                problems.append(f"input {slot!r}: declare an artifact kind ('documents') or a "
                                f"list of one kind (['shards']: one or more), not {kind!r}")
    try:
        cls.subcomponent_params()
        if issubclass(cls, Stage):
            params = cls.params_spec()
            for pname in cls.observational:
                if pname not in params:
                    problems.append(f"declares observational={cls.observational!r}, but "
                                    f"{pname!r} is not one of its parameters")
    except Exception as e:  # an annotation that cannot be resolved
        problems.append(f"has parameter annotations that cannot be resolved: {e}")
    return problems


def _declared_fields(cls: type) -> list[str]:
    """The parameters ``cls`` will have once ``@dataclass`` has run on it (class keywords
    are handled before it runs): the annotated names of ``cls`` and its bases, less class
    variables and private names."""
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        for pname, annotation in klass.__dict__.get("__annotations__", {}).items():
            text = annotation if isinstance(annotation, str) else repr(annotation)
            if pname.startswith("_") or pname in METADATA or "ClassVar" in text.split("[")[0]:
                continue
            names[pname] = None
    return list(names)


def _observational(cls: type, names: Any) -> tuple[str, ...]:
    """Check a stage's ``observational=`` keyword against its parameters."""
    if not (isinstance(names, (tuple, list)) and all(isinstance(n, str) for n in names)):
        raise TypeError(f"{cls.__qualname__}: observational={names!r}: give a tuple of "
                        "parameter names (observational=(\"loggers\",))")
    fields = _declared_fields(cls)
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise TypeError(
            f"{cls.__qualname__}: observational names {', '.join(map(repr, unknown))}, not "
            f"a parameter of {cls.__name__}{did_you_mean(unknown[0], fields)}; its parameters: "
            f"{', '.join(fields) or 'none'}")
    return tuple(dict.fromkeys(names))


def instantiate(cls: type[C], params: dict[str, Any],
                build: Callable[[type[Component], Any], Component]) -> C:
    """Construct ``cls`` from recipe-form parameters, building sub-components (given as
    ``{name, ...}`` specs) with ``build(base, spec)``."""
    subs = cls.subcomponent_params()
    kwargs = {}
    for key, value in params.items():
        if key in subs and value is not None:
            base, many = subs[key]
            if many:
                value = [v if isinstance(v, base) else build(base, v) for v in value]
            elif not isinstance(value, base):
                value = build(base, value)
        kwargs[key] = value
    return cls(**kwargs)


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


@dataclass(kw_only=True)
class Executor(Component, kind="executor"):
    """Runs a picklable function over items, in parallel where it can (kind ``executor``)."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """Yield ``fn(item)`` for every item, in the order of ``items``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (a pool kept across ``map`` calls); the runner calls it when the
        stage ends, however it ends."""


ProgressFn = Callable[[str, float, "float | None", str], None]


class StageContext:
    """What a running stage may use. The runner owns commit and bookkeeping.

    * ``inputs``: slot -> committed upstream ``Artifact``; read them through
      ``recipe_engine.artifacts``. For a list slot (declared ``[kind]``), its first artifact.
    * ``input_lists``: slot -> every upstream ``Artifact`` of the slot, in the recipe's order
      (one for a plain slot): how a list slot's stage reads all of them.
    * ``output``: write the artifact here; it is committed when ``run`` returns.
    * ``work``: scratch that survives a crash of this stage (resume state); removed on commit.
    * ``executor``: runs per-part work in parallel (data stages).
    * ``metrics``: numbers for people (summary, progress line, run report).
    * ``meta``: facts for downstream stages (``vocab_size``, ``seq_len``); documented per
      artifact kind in docs/artifacts.md.
    * ``counts``: records in / out and skips per reason (a ``Counter``).
    * ``num_nodes``, ``node_rank``: the nodes this stage runs on, and this one's rank among
      them. 1 and 0 except for a ``distributed`` stage in a multi-node job, which runs on
      every node: ``run`` on node 0, ``run_follower`` on the others.
    """

    def __init__(self, *, stage: str, fingerprint: str, inputs: dict[str, Artifact],
                 output: Path, work: Path, executor: Executor,
                 build: Callable[[Any, Any], Component],
                 progress: ProgressFn | None = None, max_skip_fraction: float = 0.05,
                 input_lists: dict[str, list[Artifact]] | None = None,
                 num_nodes: int = 1, node_rank: int = 0):
        self.stage = stage
        self.fingerprint = fingerprint
        self.inputs = inputs
        self.input_lists = input_lists if input_lists is not None else \
            {slot: [art] for slot, art in inputs.items()}
        self.output = Path(output)
        self.work = Path(work)
        self.executor = executor
        self.max_skip_fraction = max_skip_fraction
        self.num_nodes, self.node_rank = num_nodes, node_rank
        self.metrics: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()
        self.logger = logging.getLogger(f"recipe_engine.stage.{stage}")
        self._build = build
        self._progress = progress

    def build(self, base: type[C], spec: Any) -> C:
        """Construct a component of ``base``'s kind from ``{name: x, **params}`` (or a bare
        name), checked to be a ``base``."""
        return self._build(base, spec)  # type: ignore[return-value]

    def progress(self, done: float, total: float | None = None, unit: str = "") -> None:
        if self._progress:
            self._progress(self.stage, done, total, unit)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, reason: str, n: int = 1) -> None:
        """Count a malformed record that was skipped (``skipped.<reason>`` in the manifest)."""
        self.count(f"skipped.{reason}", n)

    def check_skips(self, seen: int) -> None:
        """Fail the stage when more than ``max_skip_fraction`` of ``seen`` records were skipped."""
        reasons = {k: v for k, v in self.counts.items() if k.startswith("skipped.")}
        skipped = sum(reasons.values())
        if seen and skipped / seen > self.max_skip_fraction:
            raise StageError(
                f"{skipped} of {seen} records were malformed ({reasons}), more than "
                f"max_skip_fraction={self.max_skip_fraction}; fix the input or raise the threshold"
            )


@dataclass(kw_only=True)
class Stage(Component, kind="stage"):
    """A component a recipe stage names. Declares its input slots and output kind.

    ``observational=("loggers", ...)``: parameters of this stage that do not change its
    output (where its metrics also go, a limit only checked). The fingerprint sees each at
    its default, so changing one reuses the committed artifact; the manifest records the
    values of the run that made it. Only the stage's own parameters, not a sub-component's.
    A name that is not a parameter is an error when the class is defined. Subclasses inherit
    the declaration; one that declares its own replaces it (list the inherited names again
    to keep them)."""

    # slot -> artifact kind; ``[kind]``: one or more upstream stages of that kind, in order
    inputs: ClassVar[dict[str, str | list[str]]] = {}
    output: ClassVar[str] = ""
    # runs on every node of a multi-node job (``run`` on node 0, ``run_follower`` elsewhere)
    distributed: ClassVar[bool] = False
    # parameters that do not change the output: left out of the fingerprint (see the class)
    observational: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, *, inputs: dict[str, str | list[str]] | None = None,
                          output: str | None = None, distributed: bool | None = None,
                          observational: tuple[str, ...] | list[str] | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if distributed is not None:
            cls.distributed = bool(distributed)
        if observational is not None:
            cls.observational = _observational(cls, observational)
        if inputs is not None:
            cls.inputs = {slot: list(kind) if isinstance(kind, (list, tuple)) else kind
                          for slot, kind in inputs.items()}
        if output is not None:
            cls.output = output

    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError

    def run_follower(self, ctx: StageContext) -> None:
        """A ``distributed`` stage's share on a node other than node 0 (``ctx.node_rank`` >
        0): start this node's processes against the same ``ctx.work``, which every node
        sees, and return when they end. Write nothing to ``ctx.output``: node 0 commits.
        The runner calls it once node 0 has started the stage (its inputs are committed)."""
        raise NotImplementedError(f"{type(self).__name__} is not a distributed stage")

    def fingerprint_extra(self) -> str | None:
        """Extra material for the fingerprint that params don't capture (a source's file
        listing, say). Must be cheap: ``recipe plan`` calls it."""
        return None

    @classmethod
    def slot_kind(cls, slot: str) -> str:
        """The artifact kind input ``slot`` takes (for a list slot: each element's)."""
        kind = cls.inputs[slot]
        return kind[0] if isinstance(kind, list) else kind

    @classmethod
    def slot_is_list(cls, slot: str) -> bool:
        """Does ``slot`` take one or more upstream stages (declared ``[kind]``)?"""
        return isinstance(cls.inputs[slot], list)

    def describe_plan(self, inputs_meta: dict[str, Any]) -> dict[str, Any]:
        """Estimates for ``recipe plan`` (tokens, FLOPs, memory), from the inputs' ``meta``
        (the real one when the input is cached, else that input's own estimate; a list
        slot gets a list of metas, in the recipe's order). Return
        ``{"meta": {...}}`` to pass estimates downstream; other keys are shown to the user."""
        return {}
