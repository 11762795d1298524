"""Check a composed recipe against the registry before anything runs, collecting every
problem: unknown components and parameters (with did-you-mean), missing parameters, wrong
types, inputs of the wrong artifact kind, references to missing stages, cycles."""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .component import REQUIRED, Component, Executor, Stage, as_spec, instantiate
from .config import LoadedRecipe
from .errors import Problem, RecipeError, did_you_mean, warn
from .graph import topological_order
from .plugins import Registry
from .redact import ENV_PLACEHOLDER, recorded
from .safety import check_names

STAGE_KEYS = ("component", "inputs", "params", "executor", "description")


@dataclass
class StageSpec:
    name: str
    component: type[Stage]
    params: dict[str, Any]  # resolved, defaults filled, sub-components as {name, **params}
    inputs: dict[str, str | list[str]]  # slot -> upstream stage name (list slots: names)
    executor: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)  # "kind/name" -> version used
    # the versions the fingerprint records: those of the stage and of the sub-components in
    # its parameters other than its ``observational`` ones (None: every one in ``versions``)
    fingerprint_versions: dict[str, str] | None = None
    # what manifests and fingerprints record of params: URLs redacted, ${oc.env:X} unresolved
    recorded_params: dict[str, Any] = field(default_factory=dict)

    def instantiate(self, registry: Registry) -> Stage:
        """The stage component, its sub-components built."""
        return instantiate(self.component, self.params, registry.build)

    def upstreams(self) -> list[str]:
        """Every upstream stage, slot by slot (a list slot's in order), without repeats."""
        out: list[str] = []
        for up in self.inputs.values():
            for name in ([up] if isinstance(up, str) else up):
                if name not in out:
                    out.append(name)
        return out


@dataclass
class Recipe:
    name: str
    loaded: LoadedRecipe
    stages: dict[str, StageSpec]  # in run order
    config: dict[str, Any]
    max_skip_fraction: float = 0.05

    def downstream(self, names: set[str]) -> set[str]:
        out = set(names)
        for spec in self.stages.values():  # run order: parents come first
            if any(up in out for up in spec.upstreams()):
                out.add(spec.name)
        return out

    def upstream(self, name: str) -> set[str]:
        out, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo += self.stages[n].upstreams()
        return out


class _Checker:
    def __init__(self, loaded: LoadedRecipe, registry: Registry, default_executor: Any = None):
        self.loaded = loaded
        self.registry = registry
        self.default_executor = default_executor
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(key=key, message=message, file=self.loaded.locate(key)))

    # -- parameters ---------------------------------------------------------------------

    def params(self, cls: type[Component], given: Any, key: str, versions: dict[str, str],
               observed: dict[str, str] | None = None) -> dict[str, Any] | None:
        """``cls``'s parameters resolved; the versions of the sub-components they hold go to
        ``versions``, those in a stage's ``observational`` parameters to ``observed``."""
        neutral = getattr(cls, "observational", ()) if observed is not None else ()

        def versions_of(name: str) -> dict[str, str]:
            return observed if name in neutral and observed is not None else versions

        if given is None:
            given = {}
        if not isinstance(given, dict):
            self.problem(key, f"parameters of {cls.name!r} must be a mapping, got {given!r}")
            return None
        spec = cls.params_spec()
        subs = cls.subcomponent_params()
        ok = True
        for name in given:
            if name not in spec:
                hint = did_you_mean(str(name), spec)
                self.problem(f"{key}.{name}", f"unknown parameter of {cls.kind} "
                             f"{cls.name!r}{hint}; it takes: {', '.join(spec) or 'nothing'}")
                ok = False
        out: dict[str, Any] = {}
        for name, (annotation, default) in spec.items():
            if name not in given:
                if default is REQUIRED:
                    self.problem(f"{key}.{name}", f"missing required parameter of {cls.kind} "
                                 f"{cls.name!r} ({_type_name(annotation)})")
                    ok = False
                else:
                    out[name] = default
                continue
            value = given[name]
            if name in subs:
                built = self.subcomponents(subs[name], value, f"{key}.{name}",
                                           versions_of(name))
                ok = ok and built is not None
                out[name] = built
                continue
            err = _type_error(value, annotation)
            if err:
                self.problem(f"{key}.{name}", err)
                ok = False
            out[name] = value
        # subcomponents left at their defaults still need expanding
        for name, sub in subs.items():
            if name not in given and out.get(name) not in (None, REQUIRED):
                default = as_spec(out[name])
                out[name] = self.subcomponents(sub, default, f"{key}.{name}",
                                               versions_of(name))
                ok = ok and out[name] is not None
        if not ok:
            return None
        try:  # __post_init__ checks (cheap, side-effect free by contract)
            instantiate(cls, out, self.registry.build)
        except RecipeError as e:
            for p in e.problems:  # a problem keyed by parameter name points at that parameter
                self.problem(f"{key}.{p.key}" if p.key in out else key, p.message)
            return None
        except (TypeError, ValueError) as e:
            self.problem(key, f"{cls.kind} {cls.name!r} rejected its parameters: {e}")
            return None
        return out

    def subcomponents(self, sub: tuple[type[Component], bool], value: Any, key: str,
                      versions: dict[str, str]) -> Any:
        base, many = sub
        if many:
            if not isinstance(value, list):
                self.problem(key, f"expected a list of {base.kind} components "
                             f"([{{name: ..., <params>}}, ...]), got {value!r}")
                return None
            items = [self.subcomponent(base, v, f"{key}.{i}", versions) for i, v in enumerate(value)]
            return None if any(i is None for i in items) else items
        if isinstance(value, list):
            self.problem(key, f"expected one {base.kind} component, got a list")
            return None
        return self.subcomponent(base, value, key, versions)

    def subcomponent(self, base: type[Component] | str, value: Any, key: str,
                     versions: dict[str, str]) -> dict[str, Any] | None:
        kind = base if isinstance(base, str) else base.kind
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            self.problem(key, f"expected a {kind} component: {{name: ..., <params>}}, got {value!r}")
            return None
        params = dict(value)
        name = params.pop("name")
        reg = self.registry.find(kind, str(name))
        if reg is None:
            choices = self.registry.names(kind)
            self.problem(f"{key}.name", f"unknown {kind} component {name!r}"
                         f"{did_you_mean(str(name), choices)}; registered: {', '.join(choices) or 'none'}")
            return None
        if not isinstance(base, str) and not issubclass(reg.cls, base):
            self.problem(f"{key}.name", f"{kind} component {name!r} ({reg.package}) is not a "
                         f"{base.__name__}, which this parameter needs")
            return None
        versions[f"{kind}/{name}"] = reg.fingerprint_version
        resolved = self.params(reg.cls, params, key, versions)
        return None if resolved is None else {"name": name, **resolved}

    # -- stages ------------------------------------------------------------------------------

    def recipe(self, config: dict[str, Any]) -> dict[str, StageSpec]:
        stages = config.get("stages")
        if not isinstance(stages, dict) or not stages:
            self.problem("stages", "a recipe needs a non-empty 'stages:' mapping of name -> stage")
            return {}
        default_executor = config.get("executor") or self.default_executor
        specs: dict[str, StageSpec] = {}
        for name, raw in stages.items():
            spec = self.stage(str(name), raw, stages, default_executor)
            if spec is not None:
                specs[spec.name] = spec
        return specs

    def stage(self, name: str, raw: Any, stages: dict[str, Any],
              default_executor: Any) -> StageSpec | None:
        key = f"stages.{name}"
        if not isinstance(raw, dict):
            self.problem(key, "a stage is a mapping with 'component', 'inputs' and 'params'")
            return None
        for k in raw:
            if k not in STAGE_KEYS:
                self.problem(f"{key}.{k}", f"unknown stage key{did_you_mean(str(k), STAGE_KEYS)}; "
                             f"a stage takes: {', '.join(STAGE_KEYS)}")
        comp = raw.get("component")
        if not comp:
            self.problem(f"{key}.component", "missing: which registered component runs this stage")
            return None
        reg = self.registry.find("stage", str(comp))
        if reg is None:
            other = [k for k in self.registry.kinds() if self.registry.find(k, str(comp))]
            if other:
                msg = (f"{comp!r} is a {other[0]} component, not a stage; "
                       f"stages are: {', '.join(self.registry.names('stage'))}")
            else:
                msg = (f"unknown component {comp!r}"
                       f"{did_you_mean(str(comp), self.registry.names('stage'))}")
            self.problem(f"{key}.component", msg)
            return None
        cls: type[Stage] = reg.cls  # type: ignore[assignment]
        inputs = self.inputs(cls, raw.get("inputs"), f"{key}.inputs", stages)
        versions = {f"stage/{comp}": reg.fingerprint_version}
        observed: dict[str, str] = {}
        params = self.params(cls, raw.get("params"), f"{key}.params", versions, observed)
        executor_spec = raw.get("executor", default_executor)
        if executor_spec is None:
            self.problem(f"{key}.executor", "no executor: name one (executor: {name: local}) or "
                         "install a plugin that provides a default (recipe_default_executor)")
            return None
        executor = self.subcomponent(Executor, executor_spec, f"{key}.executor", {})
        if inputs is None or params is None or executor is None:
            return None
        return StageSpec(name, cls, params, inputs, executor, {**versions, **observed},
                         fingerprint_versions=versions)

    def inputs(self, cls: type[Stage], raw: Any, key: str,
               stages: dict[str, Any]) -> dict[str, str | list[str]] | None:
        slots = cls.inputs
        if raw is None:
            raw = {}
        if isinstance(raw, str):
            if len(slots) != 1:
                self.problem(key, f"{cls.name!r} has input slots {list(slots)}; name them: "
                             f"inputs: {{{', '.join(f'{s}: <stage>' for s in slots)}}}")
                return None
            raw = {next(iter(slots)): raw}
        if not isinstance(raw, dict):
            self.problem(key, f"inputs must map slot -> stage name, got {raw!r}")
            return None
        ok = True
        out: dict[str, str | list[str]] = {}
        for slot, given in raw.items():
            if slot not in slots:
                self.problem(f"{key}.{slot}", f"{cls.name!r} has no input {slot!r}"
                             f"{did_you_mean(str(slot), slots)}; its inputs: {', '.join(slots) or 'none'}")
                ok = False
                continue
            many = cls.slot_is_list(slot)
            names = given if many and isinstance(given, list) else [given]
            if many and not names:
                self.problem(f"{key}.{slot}", "names no stage; give one or more upstream stages")
                ok = False
                continue
            if not many and isinstance(given, list):
                self.problem(f"{key}.{slot}", f"takes one upstream stage, got a list {given!r}")
                ok = False
                continue
            for i, upstream in enumerate(names):
                where = f"{key}.{slot}" if len(names) == 1 and not isinstance(given, list) \
                    else f"{key}.{slot}[{i}]"
                if not self._input(cls, slot, upstream, where, stages):
                    ok = False
            if len(set(map(str, names))) != len(names):
                self.problem(f"{key}.{slot}", f"names a stage twice: {names!r}")
                ok = False
            out[str(slot)] = [str(n) for n in names] if many else str(given)
        for slot in slots:
            if slot not in raw:
                self.problem(f"{key}.{slot}", f"missing input {slot!r} ({cls.slot_kind(slot)}) "
                             f"of {cls.name!r}")
                ok = False
        return out if ok else None

    def _input(self, cls: type[Stage], slot: str, upstream: Any, key: str,
               stages: dict[str, Any]) -> bool:
        if isinstance(upstream, (dict, list)):
            self.problem(key, f"must name an upstream stage, got {upstream!r}")
            return False
        if upstream not in stages:
            self.problem(key, f"no stage named {upstream!r}"
                         f"{did_you_mean(str(upstream), [str(s) for s in stages])}")
            return False
        produced, wanted = self._output_kind(stages[upstream]), cls.slot_kind(slot)
        if produced and produced != wanted:
            self.problem(key, f"input {slot!r} needs a {wanted} artifact, "
                         f"but stage {upstream!r} produces {produced}")
            return False
        return True

    def _output_kind(self, raw: Any) -> str | None:
        if isinstance(raw, dict):
            reg = self.registry.find("stage", str(raw.get("component")))
            if reg is not None:
                return reg.cls.output  # type: ignore[attr-defined]
        return None


def validate(loaded: LoadedRecipe, registry: Registry, default_executor: Any = None) -> Recipe:
    """Resolve interpolations, check every stage, order the graph. Raises RecipeError
    listing every problem found. ``default_executor`` (``{name, ...}``) runs the stages of a
    recipe that names none (the plugins' ``recipe_default_executor`` hook)."""

    checker = _Checker(loaded, registry, default_executor)
    config = _resolve(loaded.cfg, checker)
    for p in check_names(config, loaded.path.stem):  # names become paths in the store
        checker.problem(p.key, p.message)
    specs = checker.recipe(config)
    order: list[str] = []
    if specs:
        edges = {n: [u for u in s.upstreams() if u in specs] for n, s in specs.items()}
        order, cycle = topological_order(list(specs), edges)
        if cycle:
            checker.problem(f"stages.{cycle[0]}.inputs",
                            "the stages form a cycle: " + " -> ".join(cycle + [cycle[0]]))
    max_skip = config.get("max_skip_fraction", 0.05)
    if not (isinstance(max_skip, (int, float)) and not isinstance(max_skip, bool)
            and 0 <= max_skip <= 1):
        checker.problem("max_skip_fraction", f"must be a number from 0 to 1 (the fraction of "
                        f"malformed records a stage may skip), got {max_skip!r}")
    if checker.problems:
        raise RecipeError(checker.problems)
    _check_requires(config.get("requires"), loaded)
    env_config = _resolve_env_as_placeholders(loaded.cfg)
    for name, spec in specs.items():
        raw = ((env_config.get("stages") or {}).get(name) or {}).get("params") \
            if isinstance(env_config, dict) else None
        spec.recorded_params = recorded(spec.params, raw if isinstance(raw, dict) else {})
    return Recipe(name=loaded.name, loaded=loaded, stages={n: specs[n] for n in order},
                  config=config, max_skip_fraction=float(max_skip))


def _resolve_env_as_placeholders(cfg: Any) -> Any:
    """The config resolved with every ``${oc.env:NAME}`` as a marker instead of its value
    (what the store records); None when it does not resolve that way."""
    from omegaconf import OmegaConf
    from omegaconf.resolvers import oc

    OmegaConf.clear_resolver("oc.env")
    OmegaConf.register_new_resolver(
        "oc.env", lambda key, default=None: f"{ENV_PLACEHOLDER}{key}\x00")
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return None
    finally:
        OmegaConf.clear_resolver("oc.env")
        OmegaConf.register_new_resolver("oc.env", oc.env)


def _check_requires(requires: Any, loaded: LoadedRecipe) -> None:
    """``requires: {package: specifier}``: the plugin packages (and versions) a recipe was
    written for. A missing package or another version is a warning, not an error."""
    if not requires:
        return
    import importlib.metadata

    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    if not isinstance(requires, dict):
        raise RecipeError(Problem("requires", "a mapping of package -> version specifier "
                                  "(requires: {recipe-engine: '>=0.1'})", loaded.locate("requires")))
    for package, spec in requires.items():
        try:
            wanted = SpecifierSet(str(spec or ""))
        except InvalidSpecifier:
            raise RecipeError(Problem(f"requires.{package}", f"{spec!r} is not a version "
                                      "specifier like '>=1.2,<2'", loaded.locate("requires")))
        try:
            installed = importlib.metadata.version(str(package))
        except importlib.metadata.PackageNotFoundError:
            warn(f"{loaded.path.name}: requires {package} {spec}, which is not installed")
            continue
        if installed not in wanted:
            warn(f"{loaded.path.name}: written for {package} {spec}; installed: {installed}")


def _resolve(cfg: Any, checker: _Checker) -> dict[str, Any]:
    """Resolve every interpolation; on failure, find each failing key (all of them)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException:
        pass
    failed = object()

    def walk(raw: Any, key: str) -> Any:
        if isinstance(raw, dict):
            out = {str(k): walk(v, f"{key}.{k}".lstrip(".")) for k, v in raw.items()}
            return {k: v for k, v in out.items() if v is not failed}
        if isinstance(raw, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(raw)]
        try:  # a leaf, or an interpolation that may stand for a whole subtree
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            return value
        except OmegaConfBaseException as e:
            checker.problem(key, _short(e))
            return failed

    return walk(OmegaConf.to_container(cfg, resolve=False), "")


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# -- light type checking of parameters --------------------------------------------------------


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _type_error(value: Any, annotation: Any) -> str | None:
    if _matches(value, annotation):
        return None
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        hint = did_you_mean(str(value), [str(c) for c in choices])
        return f"{value!r} is not one of {', '.join(map(repr, choices))}{hint}"
    return f"expected {_type_name(annotation)}, got {type(value).__name__} {value!r}"


def _matches(value: Any, t: Any) -> bool:
    if t is Any or t is object:
        return True
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is Union or (types.UnionType is not None and origin is types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple) or t in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if args and origin is list:
            return all(_matches(v, args[0]) for v in value)
        return True
    if origin is dict or t is dict:
        return isinstance(value, dict)
    if isinstance(t, type):
        return isinstance(value, t)
    return True
