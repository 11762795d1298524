"""Helpers for testing plugins and components without a recipe or a store, for plugin
authors as much as for the project's own tests::

    from recipe_engine.testing import fake_entry_point, make_plugin_manager, run_stage

* ``make_plugin_manager(plugin, ...)``: a fresh plugin manager with exactly these plugins
  (``entry_points=True`` to load the installed ones too, the built-in plugins among them).
  Works whether or not the plugin under test is pip-installed as well: registering a plugin
  that is already registered does nothing.
* ``fake_entry_point(monkeypatch, name, value)``: make a plugin look pip-installed for the
  length of a test, so ``PluginManager()`` and ``recipe`` commands find it through its
  entry point, as they would after ``pip install``.
* ``run_stage(stage, root, inputs)``: run one stage component into a directory and get its
  artifact back, with a manifest shaped like the runner's.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import re
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .component import Artifact, Executor, Stage, StageContext
from .plugins import ENTRY_POINT_GROUP, PluginManager


def make_plugin_manager(*plugins: object, entry_points: bool = False) -> PluginManager:
    """A fresh ``PluginManager`` with ``plugins`` (modules or objects with hookimpls)
    registered, each under its module name. With ``entry_points=True`` every installed
    plugin is loaded first (built-in components such as the executors are among them)."""
    pm = PluginManager(load_entry_points=entry_points)
    for plugin in plugins:
        pm.register(plugin)
    return pm


# -- faked entry points --------------------------------------------------------------------


class _FakeDistribution(importlib.metadata.Distribution):
    """An installed distribution that exists only in memory: metadata and entry points."""

    def __init__(self, name: str, version: str, location: Path | str) -> None:
        self._fake_name, self._fake_version, self._location = name, version, location
        self._eps: list[tuple[str, str, str]] = []  # (group, name, value)

    def read_text(self, filename: str) -> str | None:
        if filename in ("METADATA", "PKG-INFO"):
            return (f"Metadata-Version: 2.1\nName: {self._fake_name}\n"
                    f"Version: {self._fake_version}\n")
        if filename == "entry_points.txt":
            groups: dict[str, list[str]] = {}
            for group, name, value in self._eps:
                groups.setdefault(group, []).append(f"{name} = {value}")
            return "".join(f"[{g}]\n" + "\n".join(lines) + "\n\n" for g, lines in groups.items())
        return None

    def locate_file(self, path: Any) -> Path:
        return Path(self._location) / str(path)


class _FakeFinder(importlib.metadata.DistributionFinder):
    """Reports the fake distributions to ``importlib.metadata`` (and so to pluggy). It is
    on ``sys.meta_path`` only for distribution lookups; it finds no modules."""

    def __init__(self) -> None:
        self.dists: dict[str, _FakeDistribution] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        return None

    def find_distributions(self, context: Any = None) -> Iterator[importlib.metadata.Distribution]:
        context = context or importlib.metadata.DistributionFinder.Context()
        if "path" in vars(context):  # a lookup on explicit paths: not ours
            return
        wanted = context.name
        for dist in self.dists.values():
            if wanted is None or _normalize(wanted) == _normalize(dist.name):
                yield dist


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fake_entry_point(monkeypatch: Any, name: str, value: str | object,
                     dist_name: str = "toy-tests", *, version: str | None = None,
                     location: str | Path | None = None,
                     group: str = ENTRY_POINT_GROUP) -> None:
    """Make ``importlib.metadata`` report an entry point ``name = value`` of distribution
    ``dist_name``, as if that distribution were pip-installed, until the test ends.

    ``value`` is what a ``pyproject.toml`` would say (``"my_plugin"`` or
    ``"my_plugin.sub:obj"``) or the plugin object itself. ``monkeypatch`` is pytest's
    fixture; it undoes everything. Several calls with one ``dist_name`` add entry points to
    one distribution. The distribution's install location is ``location`` (default: the
    plugin module's directory)."""
    if not isinstance(value, str):
        holder = types.ModuleType(f"_recipe_fake_plugin_{_normalize(dist_name)}_{name}".replace("-", "_"))
        holder.plugin = value  # type: ignore[attr-defined]
        if location is None and getattr(value, "__file__", None):
            location = Path(value.__file__).resolve().parent  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, holder.__name__, holder)
        value = f"{holder.__name__}:plugin"
    finder = next((f for f in sys.meta_path if isinstance(f, _FakeFinder)), None)
    if finder is None:
        finder = _FakeFinder()
        monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])
    dist = finder.dists.get(dist_name)
    if dist is None:
        dist = _FakeDistribution(dist_name, version or "0.0.0",
                                 location or _module_dir(value) or ".")
        monkeypatch.setitem(finder.dists, dist_name, dist)
    elif version is not None:  # the same distribution, upgraded
        monkeypatch.setattr(dist, "_fake_version", version)
    if (group, name, value) not in dist._eps:
        monkeypatch.setattr(dist, "_eps", [*dist._eps, (group, name, value)])


def _module_dir(value: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(value.split(":")[0])
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve().parent if spec and spec.origin else None


# -- running one stage ---------------------------------------------------------------------


@dataclass(kw_only=True)
class InlineExecutor(Executor):
    """Runs every item in the calling process, in order: ``run_stage``'s default, so a test
    needs no executor plugin and its failures have plain tracebacks."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            yield fn(item)


def _with_subcomponents_built(stage: Stage, pm: PluginManager) -> Stage:
    built: dict[str, Any] = {}
    for key, (base, many) in type(stage).subcomponent_params().items():
        value = getattr(stage, key)
        if value is None:
            continue
        if many and any(not isinstance(v, base) for v in value):
            built[key] = [v if isinstance(v, base) else pm.registry.build(base, v) for v in value]
        elif not many and not isinstance(value, base):
            built[key] = pm.registry.build(base, value)
    return dataclasses.replace(stage, **built) if built else stage


def run_stage(
    stage: Stage,
    root: Path,
    inputs: dict[str, Artifact | list[Artifact]] | None = None,
    executor: Executor | None = None,
    pm: PluginManager | None = None,
    max_skip_fraction: float = 0.05,
) -> Artifact:
    """Run one stage component into ``root/out`` (scratch in ``root/work``) and return its
    artifact with a manifest shaped like the runner's (``meta``, ``metrics``, ``counts``).

    Sub-component parameters given in recipe form (``filters=[{"name": "length"}]``) are
    built first, as the runner does; ``ctx.build`` and that use ``pm``'s registry (default:
    every installed plugin). Work runs in-process unless ``executor`` is given. A list slot
    takes a list of artifacts."""
    pm = pm or PluginManager()
    stage = _with_subcomponents_built(stage, pm)
    root = Path(root)
    out, work = root / "out", root / "work"
    if out.exists():  # like the runner: every attempt starts from an empty output
        shutil.rmtree(out)
    out.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        stage=stage.name,
        fingerprint="test",
        inputs={slot: a[0] if isinstance(a, list) else a for slot, a in (inputs or {}).items()},
        input_lists={slot: list(a) if isinstance(a, list) else [a]
                     for slot, a in (inputs or {}).items()},
        output=out,
        work=work,
        executor=executor or InlineExecutor(),
        build=pm.registry.build,
        max_skip_fraction=max_skip_fraction,
    )
    stage.run(ctx)
    manifest: dict[str, Any] = {
        "component": stage.name,
        "version": stage.version,
        "kind": stage.output,
        "params": stage.params(),
        "meta": ctx.meta,
        "metrics": ctx.metrics,
        "counts": dict(sorted(ctx.counts.items())),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return Artifact(kind=stage.output, path=out, manifest=manifest)
