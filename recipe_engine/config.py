"""Recipe loading through Hydra: a recipe file anywhere on disk, ``conf/`` groups from the
search path (the recipe's directory first, then directories contributed by plugins), Hydra
override syntax, and multirun through Hydra's own sweeper and launcher plugins.

Also answers "which file set this key?" so validation errors can name the file.

Before Hydra reads anything, :func:`recipe_engine.safety.check_recipe` checks every file the
recipe can compose from and the command line for Hydra's instantiation points (a recipe is
data); after composing, the recipe ``name`` is checked, since it becomes part of paths.
"""
from __future__ import annotations

import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import safety
from .errors import Problem, RecipeError, did_you_mean

# Keep Hydra quiet and out of the working directory: no logging setup, no outputs/ dirs.
_HYDRA_DEFAULTS = [
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra.job.chdir=False",
]
_INTERP = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("stdlib"):
        # the Python standard library's source: the corpus every machine has
        OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"])


@dataclass
class LoadedRecipe:
    """A composed recipe: the config (without the ``hydra`` node) and how to find sources."""

    path: Path
    overrides: list[str]
    cfg: Any  # omegaconf.DictConfig, unresolved
    sources_fn: Callable[[], list[tuple[str, str, Path]]] | None = None
    choices: dict[str, str] = field(default_factory=dict)
    _sources: list[tuple[str, str, Path]] | None = None

    @property
    def sources(self) -> list[tuple[str, str, Path]]:
        """(package, config path, file) of every config merged, in merge order. Computed on
        first use (only errors need it): it costs Hydra a second pass over the defaults."""
        if self._sources is None:
            self._sources = self.sources_fn() if self.sources_fn else []
        return self._sources

    @property
    def name(self) -> str:
        return str(self.cfg.get("name") or self.path.stem)

    def locate(self, key: str) -> str | None:
        """The file that set a dotted key (following ``${...}`` interpolations), or None."""
        from omegaconf import OmegaConf

        key = self._follow_interpolations(key)
        override = self._override_for(key)
        if override:
            return f"command-line override {override!r}"
        for package, _, file in reversed(self.sources):
            try:
                raw = OmegaConf.load(file)
            except Exception:
                continue
            rel = key
            if package:
                if key != package and not key.startswith(package + "."):
                    continue
                rel = key[len(package) + 1:] if key != package else ""
            if not rel or _has_path(raw, rel.split(".")):
                return str(file)
        return str(self.path)

    def _override_for(self, key: str) -> str | None:
        for ov in self.overrides:
            lhs = ov.split("=", 1)[0].lstrip("+~")
            if lhs in self.choices:  # a group choice: the chosen file says where the key is
                continue
            if key == lhs or key.startswith(lhs + ".") or lhs.startswith(key + "."):
                return ov
        return None

    def _follow_interpolations(self, key: str) -> str:
        from omegaconf import OmegaConf

        parts = key.split(".")
        for _ in range(10):  # interpolation chains are short; avoid loops
            node = self.cfg
            for i, part in enumerate(parts):
                try:
                    raw = OmegaConf.to_container(node, resolve=False) if node is not None else None
                except Exception:
                    raw = node
                value = _child(raw, part)
                if isinstance(value, str) and _INTERP.match(value) and i < len(parts):
                    target = _INTERP.match(value).group(1)  # type: ignore[union-attr]
                    parts = target.split(".") + parts[i + 1:]
                    break
                if value is None:
                    return ".".join(parts)
                node = _child(node, part)
            else:
                return ".".join(parts)
        return ".".join(parts)


def _child(node: Any, part: str) -> Any:
    try:
        if isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
            return node[int(part)]
        return node.get(part) if hasattr(node, "get") else None
    except (ValueError, IndexError, KeyError, TypeError):
        return None
    except Exception:
        return None


def _has_path(raw: Any, parts: list[str]) -> bool:
    node = raw
    for part in parts:
        node = _child(node, part)
        if node is None:
            return False
    return True


def _hydra(recipe: Path, config_dirs: list[str]) -> Any:
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    version.setbase("1.3")
    _register_resolvers()
    search_path = create_config_search_path(str(recipe.parent))
    for d in config_dirs:
        # before Hydra's structured-config source, which must stay last
        search_path.prepend("recipe-engine-plugins", d if "://" in d else f"file://{d}",
                            anchor="schema")
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name=recipe.stem, config_search_path=search_path)


def _check_recipe_path(path: str | os.PathLike) -> Path:
    recipe = Path(path).resolve()
    if not recipe.is_file():
        raise RecipeError(Problem(key="recipe", message=f"no such recipe file: {path}"))
    if recipe.suffix not in (".yaml", ".yml"):
        raise RecipeError(Problem(key="recipe", message=f"{path}: a recipe is a .yaml file"))
    return recipe


def _check_safe(recipe: Path, overrides: list[str], config_dirs: list[str]) -> None:
    """Refuse, before Hydra composes or instantiates anything, files or overrides that could
    make Hydra run code (every problem at once)."""
    problems = safety.check_recipe(recipe, config_dirs, overrides)
    if problems:
        raise RecipeError(problems)


def _check_name(loaded: LoadedRecipe) -> LoadedRecipe:
    try:
        name = loaded.cfg.get("name")
    except Exception:  # an unresolvable interpolation: validation reports it with its file
        return loaded
    problems = safety.check_names({"name": name}, default_name=loaded.path.stem)
    if problems:
        try:
            file = loaded.locate("name")
        except Exception:
            file = str(loaded.path)
        raise RecipeError([Problem(key=p.key, message=p.message, file=file) for p in problems])
    return loaded


def _load_errors() -> tuple[type[BaseException], ...]:
    """What composing a recipe raises for a bad file: Hydra's and OmegaConf's errors, and what
    they let through from reading YAML (a tag without a constructor, an integer of more than
    4300 digits, a key that cannot be hashed)."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError,
            RecursionError, AssertionError)  # Hydra asserts on some defaults-list values


def _hydra_error(recipe: Path, e: Exception) -> RecipeError:
    msg = str(e).strip().splitlines()
    return RecipeError(Problem(key="recipe", file=str(recipe),
                               message=" ".join(m.strip() for m in msg) or
                               f"Hydra cannot compose it ({type(e).__name__}); check its "
                               "defaults list and interpolations"))


def _search_path_override(config_dirs: list[str]) -> list[str]:
    """Plugin config dirs as Hydra's own ``hydra.searchpath`` (after the recipe's dir)."""
    if not config_dirs:
        return []
    quoted = []
    for d in config_dirs:
        url = d if "://" in d else f"file://{d}"
        quoted.append("'" + url.replace("\\", "\\\\").replace("'", "\\'") + "'")
    return [f"hydra.searchpath=[{','.join(quoted)}]"]


def _compose(recipe: Path, overrides: list[str], config_dirs: list[str]) -> tuple[Any, Any]:
    """Hydra's public compose API: (config with its ``hydra`` node, the config loader)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(recipe.parent), version_base="1.3",
                               job_name=recipe.stem):
        cfg = compose(recipe.stem, _search_path_override(config_dirs) + list(overrides),
                      return_hydra_config=True)
        return cfg, GlobalHydra.instance().config_loader()


def load(path: str | os.PathLike, overrides: list[str], config_dirs: list[str]) -> LoadedRecipe:
    """Compose a recipe with Hydra for a single run."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    recipe = _check_recipe_path(path)
    overrides = list(overrides)
    _check_safe(recipe, overrides, config_dirs)
    try:
        cfg, loader = _compose(recipe, overrides, config_dirs)
    except _load_errors() as e:
        raise _override_error(recipe, overrides, config_dirs, e) or _hydra_error(recipe, e) from e
    choices = dict(OmegaConf.to_container(cfg.hydra.runtime.choices, resolve=False))  # type: ignore
    with open_dict(cfg):
        del cfg["hydra"]
        cfg["name"] = _own_name(recipe, overrides, cfg)

    def sources() -> list[tuple[str, str, Path]]:
        defaults = loader.compute_defaults_list(
            recipe.stem, _search_path_override(config_dirs) + overrides, RunMode.RUN)
        return _sources(defaults, recipe, config_dirs)

    return _check_name(LoadedRecipe(recipe, overrides, cfg, sources, choices))


def _own_name(recipe: Path, overrides: list[str], cfg: Any) -> Any:
    """A recipe's name is its own, never inherited from a recipe it extends: the command
    line's ``name=``, else the ``name:`` in the recipe file itself, else the file's stem."""
    import yaml

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def current() -> Any:  # interpolations left as they are: validation resolves them
        try:
            return cfg.get("name")
        except OmegaConfBaseException:
            return OmegaConf.to_container(cfg, resolve=False).get("name")

    if any(ov.split("=", 1)[0].lstrip("+~") == "name" for ov in overrides):
        return current()
    try:
        own = yaml.safe_load(recipe.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        own = None
    if isinstance(own, dict) and own.get("name") not in (None, ""):
        return current()  # the file's value, interpolations resolved by validation
    return recipe.stem


def _override_error(recipe: Path, overrides: list[str], config_dirs: list[str],
                    e: Exception) -> RecipeError | None:
    """A command-line override of a key that does not exist, reported like a misspelt key
    in a file: the key, a did-you-mean, and the override as the place it came from."""
    from omegaconf import OmegaConf

    m = re.search(r"Could not override '([^']+)'", str(e))
    if not m:
        return None
    key = m.group(1)
    override = next((ov for ov in overrides if ov.split("=", 1)[0].lstrip("~") == key), key)
    rest = [ov for ov in overrides if ov != override]
    try:
        cfg, _ = _compose(recipe, rest, config_dirs)
    except _load_errors():
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    while node is None and parent:  # the missing part may be higher up
        parent, _, leaf = parent.rpartition(".")
        node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    keys = [str(k) for k in node.keys()] if OmegaConf.is_dict(node) else []
    where = f"{parent}.{leaf}" if parent else leaf
    message = (f"no key {leaf!r} to override{did_you_mean(leaf, keys)}"
               + (f"; {parent or 'the recipe'} has: {', '.join(sorted(keys))}" if keys else "")
               + f"; to add a new key, write +{override}")
    return RecipeError(Problem(key=where, message=message,
                               file=f"command-line override {override!r}"))


def from_job_config(path: str | os.PathLike, cfg: Any, config_dirs: list[str]) -> LoadedRecipe:
    """A LoadedRecipe for one job of a multirun (Hydra hands the job its composed config,
    without the ``hydra`` node; that lives in ``HydraConfig``)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    recipe = Path(path).resolve()
    hc = HydraConfig.get()
    overrides = list(OmegaConf.to_container(hc.overrides.task, resolve=False))  # type: ignore
    choices = dict(OmegaConf.to_container(hc.runtime.choices, resolve=False))  # type: ignore
    # provenance falls back to the recipe file: a sweep's jobs share the first job's files
    return _check_name(LoadedRecipe(recipe, overrides, cfg, None, choices))


def _sources(defaults: Any, recipe: Path, config_dirs: list[str]) -> list[tuple[str, str, Path]]:
    dirs = [recipe.parent] + [Path(d[7:] if d.startswith("file://") else d)
                              for d in config_dirs if "://" not in d or d.startswith("file://")]
    out = []
    for d in defaults.defaults:
        cp = d.config_path
        if not cp or cp.startswith("hydra/") or d.package is not None and d.package.startswith("hydra"):
            continue
        for base in dirs:
            f = base / f"{cp}.yaml"
            if f.is_file():
                out.append((d.package or "", cp, f))
                break
    return out


def multirun(
    path: str | os.PathLike,
    overrides: list[str],
    config_dirs: list[str],
    sweep_dir: Path,
    job: Callable[[LoadedRecipe], dict],
) -> list[dict]:
    """Run ``job`` once per point of the Hydra sweep (``a=1,2 b=x,y``), through Hydra's
    configured sweeper and launcher (``hydra/launcher=joblib`` etc. work unchanged).
    Returns one result per job: ``{"overrides": [...], **job result}`` or an ``error``."""

    recipe = _check_recipe_path(path)
    _check_safe(recipe, list(overrides), config_dirs)
    hydra = _hydra(recipe, config_dirs)
    all_overrides = _HYDRA_DEFAULTS + [f"hydra.sweep.dir={sweep_dir}"] + list(overrides)

    def task(cfg: Any) -> dict:
        return job(from_job_config(recipe, cfg, config_dirs))

    try:
        batches = hydra.multirun(recipe.stem, task, all_overrides, with_log_configuration=False)
    except _load_errors() as e:
        raise _hydra_error(recipe, e) from e
    results = []
    for batch in batches:
        for ret in batch:
            entry: dict[str, Any] = {"overrides": list(ret.overrides)}
            try:
                entry.update(ret.return_value)
            except Exception as e:  # the job raised; Hydra keeps the exception
                entry["error"] = f"{type(e).__name__}: {e}"
            results.append(entry)
    return results
