"""Fuzzing recipe loading: randomly mutated recipe YAML never produces a traceback, only
validation errors.

Each case is a seeded mutation of a base recipe (``tests/recipes/toy.yaml``, and the composed
structure of ``recipes/micro_code.yaml`` written out as one file): types changed, keys deleted
or renamed, ``${...}`` interpolations (self-cycles, two-node cycles, missing keys, unknown
resolvers), ``_target_`` and ``hydra`` nodes, deep nesting, non-UTF-8 bytes, huge numbers,
YAML tags, recursive anchors and alias bombs (billion laughs), truncation. Every case goes
through ``recipe_engine.cli.main(["validate", path])`` in-process: it must return 0 or 1,
never raise, never print a traceback, and finish within a minute (an alias bomb that
expanded would not).

A failing case names its seed and mutations and leaves its file in the test's tmp_path; the
file alone reproduces it (``recipe validate FILE`` with the toy plugin installed).
"""
from __future__ import annotations

import contextlib
import copy
import random
import signal
import warnings

import pytest
import yaml

from conftest import ROOT, TESTS
from recipe_engine.errors import RecipeWarning

TOY = (TESTS / "recipes" / "toy.yaml").read_text()
SECONDS_PER_CASE = 60  # a case that takes longer (an alias bomb expanding) fails, not hangs

INTERPOLATIONS = [
    "${{{self}}}",  # itself
    "${{{self}.x}}",  # into itself
    "${{nope.missing}}", "${{stages}}", "${{name}}", "${{data}}", "${{..x}}", "${{}}", "${{",
    "}}", "${{oc.env:HOME}}", "${{oc.env:RECIPE_FUZZ_UNSET_VARIABLE}}",
    "${{oc.decode:'[1, 2'}}", "${{oc.create:{{a: 1}}}}", "${{oc.select:nope}}",
    "${{no_such_resolver:1}}", "${{stdlib:}}", "${{oc.dict.values:stages}}", "a ${{name}} b",
    "${{stages.{stage}}}", "${{{self}[0]}}", "\\${{escaped}}", "${{oc.env:}}",
]
KEYS = ["", " ", "a.b", "_target_", "hydra", "..", "名前", "stages", "params", "component",
        "inputs", "x" * 300, "${name}", "1", "defaults", "_self_", "-", "a/b", "?", "~", "@x",
        "true", "null", "[a]", "name", "executor", "max_skip_fraction", "\t"]
SCALARS = [0, -1, 1.5, 10 ** 40, -(10 ** 40), 1e308, float("inf"), float("nan"), True, False,
           None, "", "???", "x" * 2000, [], {}, [1, [2, [3]]], {"name": "serial"},
           {"name": "nope"}, "toy_numbers", "numbers", "serial", "${data.count}", "\x7f\x1b",
           "é ☃ 🐍", "-", "..", "../../etc", "/abs/path", {"_target_": "builtins.print"}]
TEXT_SNIPPETS = [
    # YAML tags: arbitrary objects, binary, timestamps, sets
    "x: !!python/object/apply:os.system ['true']\n",
    "x: !!python/name:os.system\n", "x: !!binary aGVsbG8=\n", "x: 2001-12-14t21:59:43.10-05:00\n",
    "x: !!set {a, b}\n", "x: !!omap [a: 1, b: 2]\n", "x: !custom 1\n", "x: !!float nope\n",
    # huge numbers
    "n: " + "9" * 6000 + "\n", "n: 1e999999\n", "n: -" + "1" * 5000 + "\n",
    "n: 0x" + "f" * 4000 + "\n", "n: 0o" + "7" * 5000 + "\n", "n: 1_000_000_000_000_000\n",
    # keys that are not strings
    "? [a, b]\n: 1\n", "? {a: 1}\n: 2\n", "1: one\n", "null: none\n", "1.5: x\n", "true: t\n",
    # duplicate keys, documents, directives, odd layout
    "name: a\nname: b\n", "---\nname: x\n---\nname: y\n", "%YAML 1.1\n---\nname: z\n",
    "%TAG ! tag:example.com,2000:\n---\nx: !foo 1\n", "\tname: tab\n", "x: [1, 2\n",
    "x: {a: 1\n", "x: 'unterminated\n", "x: |\n  block\n    more\n", "...\n", "x: *undefined\n",
    # recursive anchors
    "r: &r [*r]\n", "r: &r {a: *r}\n", "stages: &s {numbers: *s}\n",
    # header comments
    "# @package hydra\n", "# @package _global_.hydra.callbacks\n", "# @package _global_\n",
    # instantiation points
    "hydra:\n  callbacks:\n    x: {_target_: builtins.open, _args_: [/tmp/x, w]}\n",
    "y: {_target_: os.system, _args_: [id]}\n", "z: [{_partial_: true}]\n",
    "defaults:\n  - hydra/launcher: basic\n", "defaults:\n  - override hydra/sweeper: basic\n",
    "defaults:\n  - nope: x\n", "defaults:\n  - /nope\n", "defaults: 5\n",
    "defaults:\n  - _self_\n  - _self_\n", "defaults:\n  - opt: ???\n", "defaults: [{a: }]\n",
    # strings Hydra and OmegaConf treat specially
    "x: ${oc.env:HOME}\n", "x: ???\n", "x: '${'\n", "x: \\${y}\n", "x: ${x}\n", "x: ${y}\ny: ${x}\n",
    "x: ${oc.decode:${oc.decode:'${x}'}}\n", "x: ${oc.create:'{${x}: 1}'}\n",
]


def billion_laughs(levels: int = 12, width: int = 10) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines.append(f"bomb: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def micro_code_flat() -> str:
    """``recipes/micro_code.yaml`` composed (its config groups merged), interpolations kept."""
    from omegaconf import OmegaConf

    from recipe_engine import config
    from recipe_engine.plugins import PluginManager

    loaded = config.load(ROOT / "recipes" / "micro_code.yaml", [], PluginManager().config_dirs())
    tree = OmegaConf.to_container(loaded.cfg, resolve=False)
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


# -- mutations -------------------------------------------------------------------------------


def _paths(node, path=()):
    """Every (path, value) of a YAML tree (mappings and lists), 30 levels deep at most."""
    yield path, node
    if len(path) >= 30:
        return
    if isinstance(node, dict):
        for k, v in list(node.items()):
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _parent(tree, path):
    node = tree
    for p in path[:-1]:
        node = node[p]
    return node


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "name"


def mutate_tree(tree, rng: random.Random, notes: list[str]) -> None:
    """One structural mutation of a parsed recipe, in place."""
    paths = [p for p, _ in _paths(tree) if p]
    if not paths:
        tree["x"] = rng.choice(SCALARS)
        return
    path = rng.choice(paths)
    parent, last = _parent(tree, path), path[-1]
    op = rng.choice(["type", "type", "delete", "rename", "interp", "interp", "target", "hydra",
                     "nest", "cycle", "copy", "top"])
    notes.append(f"{op} {_dotted(path)}")
    if op == "type":
        parent[last] = rng.choice(SCALARS)
    elif op == "delete":
        del parent[last]
    elif op == "rename" and isinstance(parent, dict):
        value = parent.pop(last)
        parent[rng.choice(KEYS + [rng.randint(-5, 5), 1.5, True, None])] = value
    elif op == "interp":
        stage = rng.choice(list(tree.get("stages") or {"numbers": 0}) or ["numbers"])
        parent[last] = rng.choice(INTERPOLATIONS).format(self=_dotted(path), stage=stage)
    elif op == "target":
        target = parent[last] if isinstance(parent[last], dict) else parent
        if isinstance(target, dict):
            target[rng.choice(["_target_", "_args_", "_partial_", "a._target_"])] = "os.system"
    elif op == "hydra":
        tree[rng.choice(["hydra", "hydra.callbacks", "hydra.job"])] = {
            "callbacks": {"x": {"_target_": "builtins.open"}}} if rng.random() < 0.5 else 1
    elif op == "nest":
        value = parent[last]
        for _ in range(rng.choice([5, 40, 200])):
            value = {"n": value} if rng.random() < 0.5 else [value]
        parent[last] = value
    elif op == "cycle":  # two keys interpolating each other
        other = rng.choice(paths)
        parent[last] = "${" + _dotted(other) + "}"
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _parent(tree, other)[other[-1]] = "${" + _dotted(path) + "}"
    elif op == "top":  # a top-level key the recipe schema knows, with an odd value
        key = rng.choice(["max_skip_fraction", "requires", "executor", "name", "stages",
                          "defaults"])
        notes[-1] = f"top {key}"
        tree[key] = rng.choice(SCALARS + [{"recipe-engine": ">=0"}, {"nope-pkg": "=="},
                                          {"x": [1]}, ["a"], 0.5, -0.1, 2])
    elif op == "copy":  # a subtree somewhere else
        other = rng.choice(paths)
        with contextlib.suppress(KeyError, IndexError, TypeError):
            parent[last] = copy.deepcopy(_parent(tree, other)[other[-1]])


def mutate_text(text: str, rng: random.Random, notes: list[str]) -> bytes:
    data = text.encode("utf-8")
    op = rng.choice(["snippet", "snippet", "snippet", "bytes", "truncate", "bomb", "indent",
                     "replace_line"])
    notes.append(op)
    lines = data.split(b"\n")
    at = rng.randrange(len(lines) + 1)
    if op == "snippet":
        snippet = rng.choice(TEXT_SNIPPETS).encode("utf-8")
        if rng.random() < 0.5:  # at the top level
            return data.rstrip(b"\n") + b"\n" + snippet
        return b"\n".join(lines[:at] + [snippet.rstrip(b"\n")] + lines[at:])
    if op == "bytes":
        junk = bytes(rng.choice([0xff, 0xfe, 0xc3, 0x80, 0x00, 0xed, 0xa0, 0x1b, 0xef])
                     for _ in range(rng.randint(1, 4)))
        pos = rng.randrange(len(data) + 1)
        return data[:pos] + junk + data[pos:]
    if op == "truncate":
        return data[:rng.randrange(len(data) + 1)]
    if op == "bomb":
        return data.rstrip(b"\n") + b"\n" + billion_laughs(rng.choice([5, 9, 12])).encode()
    if op == "indent":
        if lines and at < len(lines):
            lines[at] = b" " * rng.choice([1, 3, 7]) + lines[at]
        return b"\n".join(lines)
    # replace a line's value by something odd
    if at < len(lines) and b":" in lines[at]:
        key = lines[at].split(b":", 1)[0]
        lines[at] = key + b": " + rng.choice(TEXT_SNIPPETS).split("\n")[0].split(": ", 1)[-1].encode()
    return b"\n".join(lines)


def make_case(base: str, seed: int) -> tuple[bytes, list[str]]:
    rng = random.Random(seed)
    notes: list[str] = []
    data: bytes
    if rng.random() < 0.75:
        tree = yaml.safe_load(base)
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutate_tree(tree, rng, notes)
        try:
            text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=10 ** 6)
        except RecursionError:  # a mutation nested deeper than PyYAML can write
            text = base
            notes.append("(too deep to dump; base)")
        data = text.encode("utf-8")
        if rng.random() < 0.3:
            data = mutate_text(text, rng, notes)
    else:
        data = mutate_text(base, rng, notes)
    return data, notes


# -- running a case --------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"validate took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_case(toy, tmp_path, label: str, data: bytes, notes: list[str]) -> int:
    """Validate one mutated recipe; assert it ends in 0 or 1 without a traceback."""
    from recipe_engine.cli import main

    d = tmp_path / label
    d.mkdir()
    path = d / "fuzz.yaml"  # alone in its directory: the recipe's directory is scanned
    path.write_bytes(data)
    what = f"case {label} ({'; '.join(notes)}), file {path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        try:
            with time_limit(SECONDS_PER_CASE):
                rc, out, err = toy("validate", path)
        except BaseException as e:  # noqa: BLE001  (any escape is the failure we look for)
            raise AssertionError(f"{what}: raised {type(e).__name__}: {e}") from e
    assert rc in (0, 1), f"{what}: exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in out + err, f"{what}:\n{err[-3000:]}"
    if rc == 1:
        assert err.startswith("error: "), f"{what}: {err[-2000:]}"
    return rc


def run_cases(toy, tmp_path, base: str, name: str, seeds) -> dict[int, int]:
    outcomes = {0: 0, 1: 0}
    for seed in seeds:
        data, notes = make_case(base, seed)
        outcomes[check_case(toy, tmp_path, f"{name}-{seed}", data, notes)] += 1
    return outcomes


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("snippet", [
    billion_laughs(), "r: &r [*r]\n", "stages: &s {numbers: *s}\n",
    "n: " + "9" * 6000 + "\n", "x: !!python/object/apply:os.system ['true']\n",
    "x: 2001-12-14t21:59:43.10-05:00\n", "x: !!binary aGVsbG8=\n", "x: !!set {a, b}\n",
    "? [a, b]\n: 1\n", "x: ${x}\n", "x: ${y}\ny: ${x}\n", "%YAML 1.1\n---\nname: z\n",
    "1: one\n", "null: none\n", "max_skip_fraction: abc\n",
    "defaults:\n  - opt: slow\n  - '${oc.create:{a: 1}}'\n",
    "stages:\n  3: {component: toy_numbers, params: {count: 1}}\n"
    "  r: {component: toy_report, inputs: nope}\n",
    "stages:\n  n: {component: toy_numbers, params: {count: 1}}\n"
    "  r: {component: toy_report, inputs: {documents: {a: 1}}}\n",
], ids=["billion-laughs", "recursive-list", "recursive-stages", "huge-int", "python-tag",
        "timestamp", "binary", "set", "list-key", "self-cycle", "two-cycle", "directive",
        "int-key", "null-key", "max-skip-string", "defaults-interpolation", "int-stage-name",
        "input-mapping"])
def test_hostile_yaml_is_an_error_not_a_traceback(toy, tmp_path, snippet):
    body = TOY.rstrip("\n") + "\n" + snippet if not snippet.startswith("%") else snippet
    check_case(toy, tmp_path, "case", body.encode(), [snippet[:40]])


def test_deep_nesting_and_non_utf8(toy, tmp_path):
    deep = "x: " + "[" * 5000 + "]" * 5000 + "\n"
    check_case(toy, tmp_path, "deep", (TOY + deep).encode(), ["deep list"])
    deep_map = "".join("  " * i + f"k{i}:\n" for i in range(400)) + "  " * 400 + "v: 1\n"
    check_case(toy, tmp_path, "deepmap", (TOY + deep_map).encode(), ["deep mapping"])
    check_case(toy, tmp_path, "bytes", TOY.encode() + b"\nx: \xff\xfe\n", ["non-UTF-8"])


def test_fuzz_toy_recipe_quick(toy, tmp_path):
    """A quick pass for the default test run; the slow test below runs 240 cases."""
    outcomes = run_cases(toy, tmp_path, TOY, "toy", range(12))
    assert outcomes[1] > 0  # the mutations do break recipes


@pytest.mark.slow
def test_fuzz_recipe_loading(toy, tmp_path):
    toy_outcomes = run_cases(toy, tmp_path, TOY, "toy", range(1000, 1120))
    micro_outcomes = run_cases(toy, tmp_path, micro_code_flat(), "micro", range(2000, 2120))
    # both kinds of outcome happen: the fuzzer is neither vacuous nor always breaking things
    assert toy_outcomes[0] and toy_outcomes[1] and micro_outcomes[1], (toy_outcomes,
                                                                      micro_outcomes)
