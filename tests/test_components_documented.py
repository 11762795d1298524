"""docs/components.md documents every built-in component, and only what the code has.

For each component the built-in package registers: a section ``### `name` (kind)`` under
its kind's ``##`` heading; a parameter table naming exactly ``params_spec()``'s keys, with
``required`` exactly where there is no default and the code's defaults elsewhere; for a
stage, an ``Inputs:`` line matching its slots and output; a YAML example that parses, names
the component and whose parameters build (``instantiate`` runs the component's checks).
Every section names a built-in component, so a removed or renamed one fails here too.

Only the registry is loaded (no ML framework is imported): this test is fast.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

from recipe_engine.component import REQUIRED, Component, Stage, instantiate
from recipe_engine.errors import RecipeError
from recipe_engine.plugins import PluginManager, Registered, Registry
from recipe_engine.validate import STAGE_KEYS
from recipe_engine.validate import _type_error  # the check `recipe validate` applies to a value

DOC = ROOT / "docs" / "components.md"
BUILTIN = "recipe-engine"  # the distribution the built-in plugins register under
SECTIONS = {  # kind -> the ## heading its components are documented under
    "stage": "Stages",
    "document_filter": "Document filters",
    "model": "Models",
    "optimizer": "Optimizers",
    "scheduler": "Schedulers",
    "parallelism": "Parallelism",
    "logger": "Loggers",
    "evaluator": "Evaluators",
    "executor": "Executors",
}
HEADING = re.compile(r"^### `([^`]+)` \(([a-z_]+)\)$")
NO_PARAMS = ["—", "", "", "takes no parameters"]
INTERPOLATION = re.compile(r"\$\{")


@dataclass
class Entry:
    name: str
    kind: str
    section: str
    line: int
    body: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"docs/components.md:{self.line} `{self.name}` ({self.kind})"

    def prose(self) -> list[str]:
        """Body lines outside code fences."""
        out, fenced = [], False
        for line in self.body:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced:
                out.append(line)
        return out

    def rows(self) -> list[list[str]]:
        """The parameter table's rows (header and separator left out), as stripped cells."""
        rows = []
        for line in self.prose():
            if not line.startswith("|"):
                continue
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if cells and (cells[0] == "parameter" or set(cells[0]) <= set("-: ")):
                continue
            rows.append(cells)
        return rows

    def yaml_blocks(self) -> list[str]:
        return re.findall(r"^```yaml\n(.*?)^```$", "\n".join(self.body) + "\n", re.S | re.M)


def parse(text: str) -> list[Entry]:
    """The component sections, each with its ## section and the lines up to the next heading."""
    entries: list[Entry] = []
    section, current, fenced = "", None, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            section, current = line[3:].strip(), None
            continue
        elif not fenced and line.startswith("### "):
            m = HEADING.match(line)
            assert m, (f"docs/components.md:{number}: a component heading is written "
                       f"### `<name>` (<kind>), got {line!r}")
            current = Entry(m.group(1), m.group(2), section, number)
            entries.append(current)
            continue
        if current is not None:
            current.body.append(line)
    return entries


@lru_cache(maxsize=None)
def registry() -> Registry:
    return PluginManager().registry


def builtins() -> list[Registered]:
    return [r for r in registry().all() if r.package == BUILTIN]


@lru_cache(maxsize=None)
def entries() -> dict[tuple[str, str], Entry]:
    found: dict[tuple[str, str], Entry] = {}
    for e in parse(DOC.read_text(encoding="utf-8")):
        assert (e.kind, e.name) not in found, f"{e.where}: documented twice"
        found[(e.kind, e.name)] = e
    return found


def entry(reg: Registered) -> Entry:
    e = entries().get((reg.kind, reg.name))
    assert e is not None, (f"docs/components.md has no section for {reg.kind} {reg.name!r}: "
                           f"add ### `{reg.name}` ({reg.kind}) under ## {SECTIONS.get(reg.kind)}")
    return e


def load_yaml(text: str) -> Any:
    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def cell_value(cell: str) -> Any:
    """A default cell: one YAML value in backticks (`64mb`, `[]`, `{name: adamw}`)."""
    m = re.fullmatch(r"`(.*)`", cell)
    assert m, f"a default is `required` or one YAML value in backticks, got {cell!r}"
    return load_yaml(f"v: {m.group(1)}")["v"]


def same(documented: Any, default: Any) -> bool:
    """Does a documented default equal the code's? A sub-component default is written
    ``{name: adamw}``, optionally with some of its parameters."""
    if isinstance(default, Component):
        return (isinstance(documented, dict) and documented.get("name") == default.name
                and all(default.params().get(k) == v for k, v in documented.items() if k != "name"))
    if isinstance(default, bool) or isinstance(documented, bool):
        return documented is default
    if isinstance(default, (int, float)):
        return isinstance(documented, (int, float)) and documented == default
    if isinstance(default, tuple):
        default = list(default)
    return documented == default


BUILTINS = builtins()
IDS = [f"{r.kind}/{r.name}" for r in BUILTINS]


def test_builtins_are_found():
    names = {(r.kind, r.name) for r in BUILTINS}
    assert ("stage", "files_source") in names and ("model", "llama") in names, \
        f"no built-in components registered by {BUILTIN!r}: {sorted(names)}"
    assert {r.kind for r in BUILTINS} <= set(SECTIONS), \
        f"a built-in kind has no section in this test's SECTIONS: {sorted({r.kind for r in BUILTINS})}"


@pytest.mark.parametrize("reg", BUILTINS, ids=IDS)
def test_section_exists_under_its_kind(reg):
    e = entry(reg)
    assert e.section == SECTIONS[reg.kind], \
        f"{e.where} is under ## {e.section}, not ## {SECTIONS[reg.kind]}"
    assert any(line.strip() and not line.startswith("|") for line in e.prose()), \
        f"{e.where}: no description"


@pytest.mark.parametrize("reg", BUILTINS, ids=IDS)
def test_table_lists_exactly_the_parameters(reg):
    e = entry(reg)
    spec = reg.cls.params_spec()
    rows = e.rows()
    assert rows, f"{e.where}: no parameter table"
    assert all(len(r) == 4 for r in rows), f"{e.where}: a table row has not 4 cells: {rows}"
    if not spec:
        assert rows == [NO_PARAMS], \
            f"{e.where} takes no parameters: its table is the one row | — | | | takes no parameters |"
        return
    names = []
    for r in rows:
        m = re.fullmatch(r"`([A-Za-z_][A-Za-z0-9_]*)`", r[0])
        assert m, f"{e.where}: the first cell is a parameter name in backticks, got {r[0]!r}"
        names.append(m.group(1))
    assert len(names) == len(set(names)), f"{e.where}: a parameter is listed twice: {names}"
    assert set(names) == set(spec), (
        f"{e.where}: the table's parameters differ from the code's; "
        f"undocumented: {sorted(set(spec) - set(names))}, not parameters: "
        f"{sorted(set(names) - set(spec))}")
    for name, r in zip(names, rows):
        cell, meaning = r[2], r[3]
        assert meaning, f"{e.where}: `{name}` has no meaning"
        default = spec[name][1]
        if default is REQUIRED:
            assert cell == "required", f"{e.where}: `{name}` has no default: write `required`"
            continue
        assert cell != "required", f"{e.where}: `{name}` has a default ({default!r})"
        documented = cell_value(cell)
        assert same(documented, default), \
            f"{e.where}: `{name}` defaults to {default!r} in the code, the docs say {cell}"


@pytest.mark.parametrize("reg", [r for r in BUILTINS if issubclass(r.cls, Stage)],
                         ids=[i for r, i in zip(BUILTINS, IDS) if issubclass(r.cls, Stage)])
def test_stage_inputs_line(reg):
    e = entry(reg)
    lines = [line for line in e.prose() if line.startswith("Inputs:")]
    assert len(lines) == 1, f"{e.where}: one line `Inputs: slot (kind), ... → output: kind`"
    slots = ", ".join(f"{slot} ({'one or more ' if reg.cls.slot_is_list(slot) else ''}"
                      f"{reg.cls.slot_kind(slot)})" for slot in reg.cls.inputs) or "none"
    want = f"Inputs: {slots} → output: {reg.cls.output}"
    assert lines[0].strip() == want, f"{e.where}: expected {want!r}, got {lines[0]!r}"


def example_params(reg: Registered, e: Entry) -> dict[str, Any]:
    """The parameters the component's YAML example gives it, checked for shape."""
    blocks = e.yaml_blocks()
    assert len(blocks) == 1, f"{e.where}: one ```yaml example, found {len(blocks)}"
    assert not INTERPOLATION.search(blocks[0]), \
        f"{e.where}: the example uses ${{...}}; write literal values"
    doc = load_yaml(blocks[0])
    assert isinstance(doc, dict) and len(doc) == 1, f"{e.where}: the example has one top-level key"
    if issubclass(reg.cls, Stage):
        stages = doc.get("stages")
        assert isinstance(stages, dict) and len(stages) == 1, \
            f"{e.where}: a stage example is a `stages:` mapping with one stage"
        (stage,) = stages.values()
        assert stage.get("component") == reg.name, f"{e.where}: the example names component " \
            f"{stage.get('component')!r}"
        assert set(stage) <= set(STAGE_KEYS), \
            f"{e.where}: unknown stage keys {sorted(stage)}"
        inputs = stage.get("inputs") or {}
        assert set(inputs) == set(reg.cls.inputs), \
            f"{e.where}: the example's inputs {sorted(inputs)} are not the slots " \
            f"{sorted(reg.cls.inputs)}"
        return dict(stage.get("params") or {})
    (key, spec), = doc.items()
    where_used = {"executor"} if reg.kind == "executor" else {
        pname for r in BUILTINS if issubclass(r.cls, Stage)
        for pname, (base, _) in r.cls.subcomponent_params().items() if base.kind == reg.kind}
    assert key in where_used, \
        f"{e.where}: the example's key {key!r} is not where a recipe writes a {reg.kind} " \
        f"({sorted(where_used)})"
    if isinstance(spec, list):
        assert spec, f"{e.where}: the example's list is empty"
        spec = spec[0]
    if isinstance(spec, str):
        spec = {"name": spec}
    assert isinstance(spec, dict) and spec.get("name") == reg.name, \
        f"{e.where}: the example's spec names {spec!r}, not {reg.name!r}"
    return {k: v for k, v in spec.items() if k != "name"}


def param_problems(cls: type[Component], params: dict[str, Any], key: str) -> list[str]:
    """Unknown parameters and values of the wrong type, sub-components' included (the
    checks ``recipe validate`` makes before it constructs anything)."""
    spec, subs, out = cls.params_spec(), cls.subcomponent_params(), []
    for name, value in params.items():
        if name not in spec:
            out.append(f"{key}.{name}: unknown parameter of {cls.kind} {cls.name!r}")
        elif name in subs:
            base, many = subs[name]
            for item in value if many and isinstance(value, list) else [value]:
                item = {"name": item} if isinstance(item, str) else item
                found = isinstance(item, dict) and registry().find(base.kind, str(item.get("name")))
                if found:  # an unknown name fails in instantiate, with the registry's message
                    out += param_problems(found.cls, {k: v for k, v in item.items() if k != "name"},
                                          f"{key}.{name}")
        elif err := _type_error(value, spec[name][0]):
            out.append(f"{key}.{name}: {err}")
    return out


@pytest.mark.parametrize("reg", BUILTINS, ids=IDS)
def test_example_builds(reg):
    e = entry(reg)
    params = example_params(reg, e)
    problems = param_problems(reg.cls, params, "params")
    assert not problems, f"{e.where}: the example's parameters: {'; '.join(problems)}"
    missing = sorted(k for k, (_, d) in reg.cls.params_spec().items()
                     if d is REQUIRED and k not in params)
    assert not missing, f"{e.where}: the example lacks required parameters {missing}"
    try:  # builds the sub-components too; every component's check() runs
        built = instantiate(reg.cls, params, registry().build)
    except (RecipeError, TypeError, ValueError) as err:
        pytest.fail(f"{e.where}: the example's parameters do not build: {err}")
    assert isinstance(built, reg.cls)


def test_no_stale_sections():
    known = {(r.kind, r.name) for r in BUILTINS}
    for (kind, name), e in entries().items():
        assert (kind, name) in known, (
            f"{e.where}: no built-in {kind} is registered as {name!r}"
            + (f" (it comes from {r.package})" if (r := registry().find(kind, name)) else ""))
    sections = re.findall(r"^## (.+)$", DOC.read_text(encoding="utf-8"), re.M)
    assert sections == list(SECTIONS.values()), \
        f"docs/components.md's ## sections are {sections}, expected {list(SECTIONS.values())}"
