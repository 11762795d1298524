"""Plugin manager and component registry.

Plugins are found through pluggy's own entry-point loading (group ``recipe_engine.plugins``)
and described by the distributions pluggy records for them (name, version, location). The
registry is built from the registration hooks the first time it is asked for, and checked
then: every class must pass ``component.check_declaration``, and every stage's input and
output kinds must be registered artifact kinds (the core's plus ``recipe_artifact_kinds``).
All problems are reported at once, each naming the package and the class.
"""
from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import unquote, urlparse

import pluggy

from . import hookspecs
from .artifacts import ARTIFACT_KINDS
from .component import Component, Stage, check_declaration, instantiate
from .errors import Problem, RecipeError, did_you_mean

ENTRY_POINT_GROUP = "recipe_engine.plugins"
CORE_PACKAGE = "recipe-engine"
# hooks whose results `recipe plugins` shows on their own (components, config groups, kinds)
REGISTRATION_HOOKS = ("recipe_components", "recipe_config_dirs", "recipe_artifact_kinds")
hookimpl = pluggy.HookimplMarker("recipe_engine")

C = TypeVar("C", bound=Component)


@dataclass(frozen=True)
class Registered:
    cls: type[Component]
    package: str  # distribution that provided it
    package_version: str = "?"

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def version(self) -> str:
        return self.cls.version

    @property
    def fingerprint_version(self) -> str:
        """The version a fingerprint records: the component's own and, unless the class
        declares ``tracks_package_version=False``, its package's installed version, so that
        upgrading a plugin package reruns its stages."""
        if not self.cls.tracks_package_version:
            return self.cls.version
        return f"{self.cls.version} ({self.package} {self.package_version})"


@dataclass(frozen=True)
class Package:
    """An installed distribution that provides plugins (what ``pip show`` calls it)."""

    name: str
    version: str
    location: str


def _registry_kind(cls: type[Component]) -> str:
    return "stage" if issubclass(cls, Stage) else cls.kind


class Registry:
    """Components by (kind, name). Stage components are looked up by name alone (kind
    ``"stage"``); sub-components by their base's kind (``document_filter``, ``model``...)."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Registered]] = {}
        self.artifact_kinds: dict[str, str] = dict(ARTIFACT_KINDS)
        self.artifact_kind_packages: dict[str, str] = {k: CORE_PACKAGE for k in ARTIFACT_KINDS}

    def add(self, cls: type[Component], package: str = "?") -> None:
        """Register ``cls``; a RecipeError names the package and class if its declaration
        is wrong or its (kind, name) is taken by another class."""
        if not isinstance(cls, type):
            raise RecipeError(Problem(f"plugin {package}", f"registered {cls!r}, which is not "
                                      "a Component class"))
        where = f"{cls.__module__}.{cls.__qualname__}"
        problems = check_declaration(cls)
        if problems:
            raise RecipeError([Problem(key=f"plugin {package}", message=f"class {where} {p}")
                               for p in problems])
        kind = _registry_kind(cls)
        table = self._by_kind.setdefault(kind, {})
        if cls.name in table and table[cls.name].cls is not cls:
            other = table[cls.name].package
            raise RecipeError(Problem(
                key=f"plugin {package}",
                message=f"{kind} component {cls.name!r} ({where}) is registered twice: "
                        f"by {other} and by {package}"))
        info = _package_info(package)
        table[cls.name] = Registered(cls, package, info.version if info else "?")

    def add_artifact_kinds(self, kinds: dict[str, str], package: str = "?") -> None:
        for kind, description in kinds.items():
            self.artifact_kinds.setdefault(str(kind), str(description))
            self.artifact_kind_packages.setdefault(str(kind), package)

    def check_artifact_kinds(self) -> list[Problem]:
        """Every stage's declared ``inputs`` and ``output`` must be registered kinds."""
        problems = []
        known = sorted(self.artifact_kinds)
        for reg in self._by_kind.get("stage", {}).values():
            declared = [(f"input {slot!r}", reg.cls.slot_kind(slot)) for slot in reg.cls.inputs]
            declared.append(("output", reg.cls.output))
            for what, kind in declared:
                if kind not in self.artifact_kinds:
                    problems.append(Problem(
                        key=f"plugin {reg.package}",
                        message=f"stage {reg.name!r} ({reg.cls.__module__}.{reg.cls.__qualname__}) "
                                f"declares {what} of kind {kind!r}, which is not a registered "
                                f"artifact kind{did_you_mean(str(kind), known)}; known kinds: "
                                f"{', '.join(known)} (a plugin adds one with recipe_artifact_kinds)"))
        return problems

    def kinds(self) -> list[str]:
        return sorted(self._by_kind)

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind.get(kind, {}))

    def find(self, kind: str, name: str) -> Registered | None:
        return self._by_kind.get(kind, {}).get(name)

    def get(self, kind: str, name: str) -> Registered:
        found = self.find(kind, name)
        if found is None:
            hint = did_you_mean(name, self.names(kind))
            raise RecipeError(f"unknown {kind} component {name!r}{hint}")
        return found

    def all(self) -> list[Registered]:
        return [r for k in self.kinds() for r in self._by_kind[k].values()]

    @overload
    def build(self, kind: type[C], spec: Any) -> C: ...

    @overload
    def build(self, kind: str, spec: Any) -> Component: ...

    def build(self, kind: str | type[Component], spec: Any) -> Component:
        """Construct ``{name: x, **params}`` (or a bare name) as a component of ``kind``.

        ``kind`` is a kind string (``"executor"``) or a component base class
        (``ModelConfig``): then its kind is used, the result is checked to be an instance of
        it and typed as one. Sub-component parameters in the spec are built too; a spec
        that already is a built component of the kind is returned as is."""
        base = kind if isinstance(kind, type) else None
        if base is not None:
            kind = _registry_kind(base)
            if not kind:
                raise RecipeError(f"{base.__qualname__} has no kind; build a subclass of a "
                                  "component base (Stage, DocumentFilter, ModelConfig, ...)")
            if isinstance(spec, base):
                return spec
        elif isinstance(spec, Component) and _registry_kind(type(spec)) == kind:
            return spec
        assert isinstance(kind, str)
        if isinstance(spec, str):
            spec = {"name": spec}
        params = dict(spec)
        name = params.pop("name", None)
        if not name:
            raise RecipeError(f"a {kind} component needs a name, got {spec!r}")
        reg = self.get(kind, str(name))
        built = instantiate(reg.cls, params, self.build)
        if base is not None and not isinstance(built, base):
            raise RecipeError(f"{kind} component {name!r} from {reg.package} is a "
                              f"{type(built).__qualname__}, not a {base.__qualname__}")
        return built


class PluginManager:
    """pluggy's manager, the distributions its plugins came from, and the registry built
    from their ``recipe_components`` and ``recipe_artifact_kinds`` hooks.

    ``PluginManager()`` loads every installed plugin (entry-point group
    ``recipe_engine.plugins``, the built-in ones included). ``PluginManager(
    load_entry_points=False)`` starts empty, for tests that register exactly the plugins
    they need with ``register`` (see ``recipe_engine.testing.make_plugin_manager``).
    """

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("recipe_engine")
        self.pm.add_hookspecs(hookspecs)
        self.packages: dict[str, str] = {}  # plugin name -> distribution name
        self.distributions: dict[str, Package] = {}  # distribution name -> Package
        self._registry: Registry | None = None
        self._config_dirs: dict[str, list[str]] | None = None
        if load_entry_points:
            self.load_entry_points()

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # -- loading ------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Load every installed plugin through pluggy; a plugin that fails to import or to
        validate is a RecipeError naming its entry point and distribution."""
        try:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as e:  # a broken third-party plugin must be named, not a traceback
            self._record_distributions()
            raise RecipeError(Problem(key=f"plugin {self._failed_entry_point()}",
                                      message=f"failed to load: {type(e).__name__}: {e}")) from e
        self._record_distributions()
        self._invalidate()
        self._check_pending()

    def _failed_entry_point(self) -> str:
        # pluggy stops at the first entry point whose import or registration raised: the
        # first of the group, in pluggy's order, that was not recorded as loaded. One that
        # failed validation half-way is registered; take it out again.
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if (ep.group == ENTRY_POINT_GROUP and ep.name not in self.packages
                        and not self.pm.is_blocked(ep.name)):
                    if self.pm.has_plugin(ep.name):
                        self.pm.unregister(name=ep.name)
                    return f"{ep.name!r} ({ep.value}) from {dist.metadata['Name']}"
        return "?"

    def _record_distributions(self) -> None:
        for plugin, facade in self.pm.list_plugin_distinfo():
            dist = getattr(facade, "_dist", facade)
            name = self.pm.get_name(plugin)
            if name is None:
                continue
            package = Package(dist.metadata["Name"], dist.version, _location(dist))
            self.packages[name] = package.name
            self.distributions.setdefault(package.name, package)

    def register(self, plugin: object, name: str | None = None, package: str | None = None) -> None:
        """Register a plugin module or object under ``name`` (default: pluggy's canonical
        name, a module's ``__name__``), as provided by distribution ``package`` (default:
        the name). Registering a plugin that is already registered, say one a test
        registers that is also pip-installed, does nothing."""
        if self.pm.is_registered(plugin):
            return
        name = name or self.pm.get_canonical_name(plugin)
        package = package or name
        if self.pm.has_plugin(name):
            raise RecipeError(Problem(
                key=f"plugin {package}",
                message=f"the plugin name {name!r} is taken by {self.packages.get(name, '?')}; "
                        "register it under another name"))
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            raise RecipeError(Problem(key=f"plugin {name!r} from {package}", message=str(e))) from e
        self.packages[name] = package
        self._invalidate()
        try:
            self._check_pending()
        except RecipeError:
            self.pm.unregister(plugin)
            self.packages.pop(name, None)
            raise

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            name = self.pm.get_name(e.plugin) or "?"
            raise RecipeError(Problem(key=f"plugin {name!r} from {self.packages.get(name, name)}",
                                      message=str(e))) from e

    def _invalidate(self) -> None:
        self._registry = None
        self._config_dirs = None

    def package_of(self, plugin_name: str) -> str:
        return self.packages.get(plugin_name, plugin_name)

    # -- registration hooks -------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The registry; checked as a whole the first time (RecipeError with every problem)."""
        if self._registry is None:
            reg = Registry()
            problems: list[Problem] = []
            for impl in self.pm.hook.recipe_artifact_kinds.get_hookimpls():
                package = self.package_of(impl.plugin_name)
                kinds = impl.function() or {}
                if not isinstance(kinds, dict):
                    problems.append(Problem(f"plugin {package}", "recipe_artifact_kinds must "
                                            f"return {{kind: description}}, got {kinds!r}"))
                    continue
                reg.add_artifact_kinds(kinds, package)
            for impl in self.pm.hook.recipe_components.get_hookimpls():
                package = self.package_of(impl.plugin_name)
                for cls in impl.function() or []:
                    try:
                        reg.add(cls, package)
                    except RecipeError as e:
                        problems += e.problems
            problems += reg.check_artifact_kinds()
            if problems:
                raise RecipeError(problems)
            self._registry = reg
        return self._registry

    def _plugin_config_dirs(self) -> dict[str, list[str]]:
        """Plugin name -> the config dirs it contributes, in registration order."""
        if self._config_dirs is None:
            self._config_dirs = {impl.plugin_name: [str(d) for d in impl.function() or []]
                                 for impl in self.pm.hook.recipe_config_dirs.get_hookimpls()}
        return self._config_dirs

    def config_dirs(self) -> list[str]:
        """Every plugin's config dirs, in registration order (the Hydra search path)."""
        return [d for dirs in self._plugin_config_dirs().values() for d in dirs]

    # -- description (`recipe plugins`) ---------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What each package provides: ``{"packages": [{name, version, location, plugins,
        components, config_dirs, config_groups, artifact_kinds, hooks}]}``, sorted by name
        with the core first."""
        registry = self.registry
        entries: dict[str, dict[str, Any]] = {}

        def entry(package: str) -> dict[str, Any]:
            if package not in entries:
                info = self.distributions.get(package) or _package_info(package)
                entries[package] = {
                    "name": package, "version": info.version if info else "",
                    "location": info.location if info else "", "plugins": [],
                    "components": [], "config_dirs": [], "config_groups": {},
                    "artifact_kinds": {}, "hooks": []}
            return entries[package]

        entry(CORE_PACKAGE)
        for name, plugin in self.pm.list_name_plugin():
            e = entry(self.package_of(name))
            e["plugins"].append(name)
            if not e["location"] and getattr(plugin, "__file__", None):
                e["location"] = str(Path(plugin.__file__).resolve().parent)
            for caller in self.pm.get_hookcallers(plugin) or []:
                if caller.name not in REGISTRATION_HOOKS and caller.name not in e["hooks"]:
                    e["hooks"].append(caller.name)
        for plugin_name, dirs in self._plugin_config_dirs().items():
            e = entry(self.package_of(plugin_name))
            for d in dirs:
                e["config_dirs"].append(d)
                for group, options in config_groups(d).items():
                    e["config_groups"].setdefault(group, [])
                    e["config_groups"][group] = sorted(set(e["config_groups"][group]) | set(options))
        for reg in registry.all():
            entry(reg.package)["components"].append({
                "kind": reg.kind, "name": reg.name, "version": reg.version,
                "description": reg.cls.description})
        for kind, package in registry.artifact_kind_packages.items():
            entry(package)["artifact_kinds"][kind] = registry.artifact_kinds[kind]
        for e in entries.values():
            e["components"].sort(key=lambda c: (c["kind"], c["name"]))
            e["hooks"].sort()
        order = sorted(entries, key=lambda n: (n != CORE_PACKAGE, n))
        return {"packages": [entries[n] for n in order]}


def config_groups(config_dir: str) -> dict[str, list[str]]:
    """Hydra config groups in a config dir: ``{"model": ["micro_2m", ...]}`` (nested groups
    as ``"a/b"``). Top-level files are not groups and are left out."""
    root = _config_dir_path(config_dir)
    if root is None or not root.is_dir():
        return {}
    groups: dict[str, list[str]] = {}
    for f in sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml")):
        rel = f.relative_to(root)
        if len(rel.parts) < 2 or any(p.startswith((".", "_")) for p in rel.parts):
            continue
        groups.setdefault("/".join(rel.parts[:-1]), []).append(f.stem)
    return {g: sorted(set(opts)) for g, opts in sorted(groups.items())}


def _config_dir_path(config_dir: str) -> Path | None:
    if config_dir.startswith("pkg://"):
        import importlib.resources

        module = config_dir[len("pkg://"):].strip("/").replace("/", ".")
        try:
            return Path(str(importlib.resources.files(module)))
        except (ImportError, TypeError):
            return None
    if config_dir.startswith("file://"):
        config_dir = config_dir[len("file://"):]
    return Path(config_dir)


def _location(dist: importlib.metadata.Distribution) -> str:
    """Where a distribution is installed; for an editable install, the project directory
    (what ``pip show`` calls "Editable project location")."""
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except (ValueError, OSError):
        direct = None
    if isinstance(direct, dict) and direct.get("dir_info", {}).get("editable"):
        url = urlparse(direct.get("url", ""))
        if url.scheme == "file":
            return unquote(url.path)
    return str(Path(str(dist.locate_file(""))).resolve())


def _package_info(name: str) -> Package | None:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Package(dist.metadata["Name"], dist.version, _location(dist))
