"""Plugin manager and component registry."""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .artifacts import ARTIFACT_KINDS
from .component import Component, Stage
from .errors import RecipeError, did_you_mean

ENTRY_POINT_GROUP = "recipe_engine.plugins"
hookimpl = pluggy.HookimplMarker("recipe_engine")


@dataclass(frozen=True)
class Registered:
    cls: type[Component]
    package: str  # distribution that provided it

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def version(self) -> str:
        return self.cls.version


class Registry:
    """Components by (kind, name). Stage components are looked up by name alone."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Registered]] = {}
        self.artifact_kinds: dict[str, str] = dict(ARTIFACT_KINDS)

    def add(self, cls: type[Component], package: str = "?") -> None:
        if not (isinstance(cls, type) and issubclass(cls, Component)):
            raise RecipeError(f"plugin {package} registered {cls!r}, which is not a Component")
        if not cls.kind or not cls.name:
            raise RecipeError(f"component {cls.__qualname__} from {package} lacks a kind or name")
        kind = "stage" if issubclass(cls, Stage) else cls.kind
        table = self._by_kind.setdefault(kind, {})
        if cls.name in table and table[cls.name].cls is not cls:
            other = table[cls.name].package
            raise RecipeError(
                f"{kind} component {cls.name!r} is registered twice: by {other} and by {package}"
            )
        table[cls.name] = Registered(cls, package)

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

    def build(self, kind: str, spec: Any) -> Component:
        """Construct ``{name: x, **params}`` (or a bare name) as a component of ``kind``."""
        if isinstance(spec, str):
            spec = {"name": spec}
        params = dict(spec)
        reg = self.get(kind, params.pop("name"))
        return reg.cls(**params)


class PluginManager:
    """pluggy manager + the registry built from ``recipe_components`` hooks."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("recipe_engine")
        self.pm.add_hookspecs(hookspecs)
        self.packages: dict[str, str] = {}  # plugin name -> distribution
        if load_entry_points:
            self.load_entry_points()
        self._registry: Registry | None = None
        self._config_dirs: list[str] | None = None

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # a broken third-party plugin must not hide the others
                raise RecipeError(
                    f"plugin {ep.name!r} ({ep.value}) failed to import: {type(e).__name__}: {e}"
                ) from e
            dist = getattr(ep, "dist", None)
            self.register(plugin, ep.name, dist.name if dist else ep.value.split(":")[0])

    def register(self, plugin: object, name: str, package: str = "?") -> None:
        self.pm.register(plugin, name=name)
        self.packages[name] = package
        self._registry = None
        self._config_dirs = None
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise RecipeError(f"plugin {name!r} from {package}: {e}") from e

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            reg = Registry()
            for impl in self.pm.hook.recipe_components.get_hookimpls():
                package = self.packages.get(impl.plugin_name, impl.plugin_name)
                for cls in impl.function() or []:
                    reg.add(cls, package)
            for kinds in self.pm.hook.recipe_artifact_kinds():
                reg.artifact_kinds.update(kinds or {})
            self._registry = reg
        return self._registry

    def config_dirs(self) -> list[str]:
        if self._config_dirs is None:
            dirs: list[str] = []
            # pluggy calls the most recently registered plugin first; keep registration order
            for result in reversed(self.pm.hook.recipe_config_dirs()):
                dirs += [str(d) for d in result or []]
            self._config_dirs = dirs
        return self._config_dirs
