"""A recipe is data: the checks that keep recipe files from running code.

Hydra instantiates a few nodes of a composed config (``hydra.callbacks`` in every run, the
launcher and sweeper in a multirun), each by the dotpath in its ``_target_``, so a YAML file
that reaches those nodes can call anything importable (``builtins.open(path, "w")``,
``os.system``). A recipe names components by registered name instead, and these checks
close Hydra's instantiation points to every file a recipe can compose from, *before* Hydra
composes or runs anything:

- **Files.** The recipe file, every YAML file in the group subdirectories of its directory
  (sibling files are other recipes: checked only when a defaults list names them), and every
  YAML file under each plugin config dir may not contain a top-level ``hydra`` node, a
  defaults-list entry for a ``hydra/...`` group or the ``hydra`` package, a ``# @package
  hydra...`` header, nor any ``_target_``, ``_args_``, ``_partial_``, ``_recursive_`` or
  ``_convert_`` key at any depth. A config dir may not hold a ``hydra/`` group directory.
  Each offending key is one :class:`~recipe_engine.errors.Problem` naming ``file:line``.
- **Command line.** What the user types stays allowed (``hydra/launcher=joblib``,
  ``hydra.sweeper.*``, ``hydra.sweep.dir=...``), except an override carrying ``_target_``
  (or the other instantiation keys) or setting ``hydra.callbacks`` / ``hydra.searchpath``.
- **Names that become paths.** The recipe ``name`` and every stage name match
  :data:`NAME_RE` (:func:`check_names`).
- **Shape.** Hydra and OmegaConf build every node of a file recursively, aliases expanded,
  so a file nested deeper than :data:`MAX_DEPTH` collections, one whose aliases expand to
  more than :data:`MAX_NODES` nodes (a "billion laughs" bomb) or an alias of a node inside
  itself is reported instead of composed. This is measured on libyaml's event stream, which
  is neither recursive nor expanded (libyaml's composer itself crashes on deep nesting).

Only the standard library and PyYAML (a Hydra dependency) are used; nothing is imported
from or instantiated by the files checked. Directories are walked cheaply: hidden ones are
skipped, and a search-path directory with more than :data:`MAX_YAML_FILES` YAML files (or
:data:`MAX_DIRS` directories) is reported instead of scanned.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterable

from .errors import Problem

INSTANTIATION_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_YAML_FILES = 2000
MAX_DIRS = 5000
MAX_DEPTH = 32  # nested mappings/lists in one file (OmegaConf recurses past 90 or so)
MAX_NODES = 10_000  # nodes of one file with its aliases expanded (recipes have hundreds)
YAML_SUFFIXES = (".yaml", ".yml")
COMMAND_LINE = "command line"

_NO_HYDRA = ("a recipe may not configure Hydra (Hydra instantiates what it names, so a file "
             "could run code); choose launchers/sweepers on the command line "
             "(hydra/launcher=joblib)")
_NO_TARGET = ("{key} is Hydra's instantiation syntax, which recipes and config groups may not "
              "use (it runs any importable callable); name components by their registered "
              "name instead (`recipe plugins` lists them)")
_NO_HYDRA_DEFAULT = ("a defaults list may not choose Hydra's config groups or package; choose "
                     "launchers/sweepers on the command line (hydra/launcher=joblib)")
_ALLOWED_ON_COMMAND_LINE = ("allowed: hydra/launcher=..., hydra/sweeper=..., hydra.launcher.*, "
                            "hydra.sweeper.*, hydra.sweep.*")


# -- files ----------------------------------------------------------------------------------


def check_recipe(recipe: Path, config_dirs: Iterable[str],
                 overrides: Iterable[str] = ()) -> list[Problem]:
    """Every problem in the files ``recipe`` can compose from and in the command line."""
    recipe = Path(recipe).resolve()
    problems: list[Problem] = []
    files: list[Path] = [recipe]
    roots = [recipe.parent]
    for d in config_dirs:
        path = _config_dir_path(d)
        if path is None:
            problems.append(Problem(key="config_dirs", message=(
                f"plugin config dir {d!r} cannot be checked for Hydra instantiation keys; "
                "plugins must contribute local directories (or pkg:// packages)")))
        elif path.is_dir():
            roots.append(path.resolve())
            problems += _collect(path, files)
    for sub in sorted(recipe.parent.iterdir()):
        if sub.is_dir() and not _hidden(sub.name):  # group dirs; sibling files are recipes
            problems += _collect(sub, files, group=sub.name)

    seen: set[Path] = set()
    queue = list(files)
    while queue:
        f = queue.pop(0)
        real = f.resolve()
        if real in seen:
            continue
        seen.add(real)
        found, refs = check_file(f, root_level=real.parent in roots)
        problems += found
        # a defaults list may name a root-level config (``- base`` in a root-level file,
        # ``- /base`` anywhere): that sibling of the recipe is composed too, so check it
        for ref in refs:
            for root in roots:
                for suffix in YAML_SUFFIXES:
                    candidate = root / f"{ref}{suffix}"
                    if candidate.is_file() and candidate.resolve() not in seen:
                        queue.append(candidate)
    return problems + check_overrides(overrides)


def check_file(path: Path, root_level: bool = True) -> tuple[list[Problem], list[str]]:
    """Problems in one YAML file, and the root-level configs its defaults list names
    (``root_level``: the file is at the top of a search-path directory, like a recipe)."""
    import yaml

    shown = _display(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [Problem(key="recipe", file=shown, message=f"cannot be read: {e}")], []
    problems = _check_header(text, shown)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        shape = _check_shape(text, shown, loader)
        if shape:
            return problems + shape, []
        docs = list(yaml.compose_all(text, Loader=loader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark is not None else shown
        return problems + [Problem(key="recipe", file=where,
                                   message=f"not valid YAML: {str(e).splitlines()[0]}")], []
    refs: list[str] = []
    for doc in docs:
        if doc is None:
            continue
        problems += _walk(doc, [], shown, set())
        if isinstance(doc, yaml.MappingNode):
            for key_node, value in doc.value:
                key = _scalar(key_node)
                if key is None:
                    continue
                if key.split(".")[0] == "hydra":
                    problems += _hydra_node(key, key_node, value, shown)
                elif key == "defaults":
                    found, found_refs = _check_defaults(value, shown, root_level)
                    problems += found
                    refs += found_refs
    problems.sort(key=_line_of)  # stable: in file order
    return problems, refs


def _check_shape(text: str, shown: str, loader: Any) -> list[Problem]:
    """Too deep, an alias bomb, a recursive alias: measured on the (flat) event stream."""
    import yaml

    open_sizes: list[int] = []  # nodes counted so far in each open collection
    open_anchors: list[str | None] = []
    sizes: dict[str, int] = {}  # anchor -> expanded nodes of the node it names
    total = 0

    def problem(event: Any, message: str) -> list[Problem]:
        return [Problem(key="recipe", file=f"{shown}:{event.start_mark.line + 1}",
                        message=message)]

    def add(n: int) -> None:
        nonlocal total
        total += n
        if open_sizes:
            open_sizes[-1] += n

    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            open_sizes.append(1)
            open_anchors.append(event.anchor)
            if len(open_sizes) > MAX_DEPTH:
                return problem(event, f"nested more than {MAX_DEPTH} mappings/lists deep; "
                                      "a recipe is a shallow tree")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            size, anchor = open_sizes.pop(), open_anchors.pop()
            if anchor is not None:
                sizes[anchor] = size
            add(size)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                sizes[event.anchor] = 1
            add(1)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                return problem(event, f"the alias *{event.anchor} refers to a node inside "
                                      "itself (a recursive structure)")
            add(sizes.get(event.anchor, 1))  # an undefined alias: the composer reports it
        if total > MAX_NODES:
            return problem(event, f"more than {MAX_NODES:,} nodes once its aliases are "
                                  "expanded; a recipe is a small tree (an alias bomb?)")
    return []


def _line_of(problem: Problem) -> int:
    tail = (problem.file or "").rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _collect(top: Path, files: list[Path], group: str = "") -> list[Problem]:
    """Append every YAML file under ``top`` (hidden dirs skipped, links followed once).
    ``group``: the group name ``top`` stands for ("" when ``top`` is a search-path root)."""
    found: list[Path] = []
    visited: set[str] = set()
    num_dirs = 0
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a link loop
            dirnames[:] = []
            continue
        visited.add(real)
        num_dirs += 1
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d) and d != "__pycache__")
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if f.endswith(YAML_SUFFIXES) and not _hidden(f)]
        if len(found) > MAX_YAML_FILES or num_dirs > MAX_DIRS:
            return [Problem(key="recipe", file=_display(top), message=(
                f"more than {MAX_YAML_FILES} YAML files or {MAX_DIRS} directories to check "
                "for Hydra instantiation keys; keep a recipe in a directory of its own, with "
                "only its config groups below it"))]
    files += found
    hydra_dirs = [top] if group == "hydra" else [] if group else \
        [top / "hydra"] if (top / "hydra").is_dir() else []
    return [Problem(key="hydra", file=_display(d), message=(
        "a config directory may not define Hydra's config groups (hydra/...); "
        "choose launchers/sweepers on the command line (hydra/launcher=joblib)"))
        for d in hydra_dirs]


def _config_dir_path(d: str) -> Path | None:
    if d.startswith("file://"):
        return Path(d[len("file://"):])
    if d.startswith("pkg://"):
        name = d[len("pkg://"):].strip("/").replace("/", ".")
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        locations = list(spec.submodule_search_locations or []) if spec else []
        return Path(locations[0]) if locations else None
    if "://" in d:
        return None
    return Path(d)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _display(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _scalar(node: Any) -> str | None:
    import yaml

    return str(node.value) if isinstance(node, yaml.ScalarNode) else None


def _line(node: Any) -> int:
    return node.start_mark.line + 1


def _dotted(path: list[str]) -> str:
    out = ""
    for part in path:
        out += part if part.startswith("[") else (("." if out else "") + part)
    return out


def _walk(node: Any, path: list[str], shown: str, seen: set[int]) -> list[Problem]:
    """Every instantiation key at any depth (mappings, lists, keys of keys, aliases once)."""
    import yaml

    if id(node) in seen:
        return []
    seen.add(id(node))
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            key = _scalar(key_node)
            if key is None:
                problems += _walk(key_node, path + ["<key>"], shown, seen)
                key = "<key>"
            elif any(part in INSTANTIATION_KEYS for part in key.split(".")):
                problems.append(Problem(key=_dotted(path + [key]),
                                        file=f"{shown}:{_line(key_node)}",
                                        message=_NO_TARGET.format(key=key.split(".")[-1])))
            problems += _walk(value, path + [key], shown, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _walk(item, path + [f"[{i}]"], shown, seen)
    return problems


def _hydra_node(key: str, key_node: Any, value: Any, shown: str) -> list[Problem]:
    import yaml

    if key == "hydra" and isinstance(value, yaml.MappingNode) and value.value:
        out = []
        for child_key, _ in value.value:
            name = _scalar(child_key) or "<key>"
            out.append(Problem(key=f"hydra.{name}", file=f"{shown}:{_line(child_key)}",
                               message=_NO_HYDRA))
        return out
    return [Problem(key=key, file=f"{shown}:{_line(key_node)}", message=_NO_HYDRA)]


def _check_header(text: str, shown: str) -> list[Problem]:
    """``# @package hydra...`` in the leading comment lines puts a file under Hydra's node."""
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m and _is_hydra_package(m.group(1)):
            return [Problem(key="@package", file=f"{shown}:{lineno}", message=(
                f"a config file may not place itself in Hydra's package ({m.group(1)}); "
                "choose launchers/sweepers on the command line (hydra/launcher=joblib)"))]
    return []


def _is_hydra_package(package: str) -> bool:
    package = package.strip()
    if package.startswith("_global_"):
        package = package[len("_global_"):].lstrip(".")
    return package == "hydra" or package.startswith("hydra.")


def _is_hydra_group(group: str) -> bool:
    group = group.strip().lstrip("/")
    return group == "hydra" or group.startswith("hydra/")


def _check_defaults(node: Any, shown: str, root_level: bool) -> tuple[list[Problem], list[str]]:
    """Defaults-list entries naming a hydra group or package, and root-level configs named."""
    import yaml

    problems: list[Problem] = []
    refs: list[str] = []
    if not isinstance(node, yaml.SequenceNode):
        return problems, refs
    for i, item in enumerate(node.value):
        entries: list[tuple[str, Any]] = []
        if isinstance(item, yaml.ScalarNode):
            entries.append((str(item.value), item))
            name = str(item.value).split("@")[0].strip()
            if name and name != "_self_" and "/" not in name.lstrip("/"):
                if name.startswith("/") or root_level:
                    refs.append(name.lstrip("/"))
        elif isinstance(item, yaml.MappingNode):
            entries += [(_scalar(k) or "", k) for k, _ in item.value]
        for text, where in entries:
            words = text.split()
            target = words[-1] if words else ""
            group, _, package = target.partition("@")
            if _is_hydra_group(group) or (package and _is_hydra_package(package)):
                problems.append(Problem(key=f"defaults[{i}]", file=f"{shown}:{_line(where)}",
                                        message=f"{text!r}: {_NO_HYDRA_DEFAULT}"))
    return problems, refs


# -- command line -------------------------------------------------------------------------------


def check_overrides(overrides: Iterable[str]) -> list[Problem]:
    """Command-line overrides: Hydra launcher/sweeper choices and values are the user's to
    make; instantiation keys, ``hydra.callbacks`` and ``hydra.searchpath`` are not."""
    problems: list[Problem] = []
    for ov in overrides:
        found = sorted(k for k in INSTANTIATION_KEYS if k in ov)
        lhs = ov.split("=", 1)[0].strip().lstrip("~+").strip()
        if found:
            problems.append(Problem(key=lhs or ov, file=COMMAND_LINE, message=(
                f"override {ov!r} uses {', '.join(found)}, Hydra's instantiation syntax, which "
                "may not be used (it runs any importable callable); name components by their "
                "registered name")))
            continue
        group, _, package = lhs.partition("@")
        targets = [group.replace("/", "."), package]
        for t in targets:
            if t.startswith("_global_"):
                t = t[len("_global_"):].lstrip(".")
            if t == "hydra" or any(t == b or t.startswith(b + ".")
                                   for b in ("hydra.callbacks", "hydra.searchpath")):
                problems.append(Problem(key=lhs, file=COMMAND_LINE, message=(
                    f"override {ov!r} may not set {t} (Hydra would import and run what it "
                    f"names); {_ALLOWED_ON_COMMAND_LINE}")))
                break
    return problems


# -- names that become paths ----------------------------------------------------------------


def check_name(value: Any, key: str) -> Problem | None:
    """A Problem when ``value`` may not be used as a file or directory name."""
    text = str(value)
    if NAME_RE.match(text) and ".." not in text:
        return None
    return Problem(key=key, message=(
        f"{text!r} is not a valid name: it becomes part of file paths, so use 1-128 letters, "
        "digits, '_', '.' or '-', starting with a letter or digit, without '..'"))


def check_names(config: dict, default_name: str | None = None) -> list[Problem]:
    """Problems with the recipe ``name`` (``default_name``, the file stem, when unset) and
    the names of the stages under ``stages``. ``config`` is the composed recipe as a dict."""
    problems: list[Problem] = []
    if not isinstance(config, dict):
        return problems
    name = config.get("name")
    if name not in (None, ""):
        p = check_name(name, "name")
    elif default_name is not None:
        p = check_name(default_name, "name")
        if p:
            p = Problem(key="name", message=p.message + " (the recipe file's name stands in "
                        "for an unset `name`: set `name:` in the recipe)")
    else:
        p = None
    if p:
        problems.append(p)
    stages = config.get("stages")
    if isinstance(stages, dict):
        for stage in stages:
            p = check_name(stage, f"stages.{stage}")
            if p:
                problems.append(p)
    return problems
