"""Post-training data: chat records inside the documents artifact, their schema check, and an
embedded default generated from the Python standard library.

**Records.** Conversations (SFT) and preferences (DPO) are ordinary documents, so every data
stage (filters, ``pii_redact``, ``decontaminate``, ``minhash_dedup``, ``heldout_split``...)
works on them unchanged:

* conversation: ``{"id", "text", "source", "path", "messages": [{"role", "content"}, ...]}``,
  roles ``system`` (first only), ``user``, ``assistant``; at least one user turn, the last
  turn the assistant's;
* preference: ``{"id", "text", "source", "path", "prompt": [messages...], "chosen": str,
  "rejected": str}``, the prompt ending with a user turn; ``chosen`` and ``rejected`` are
  the two assistant replies.

``text`` is the rendering the data stages inspect (``chat_text``): the contents in order
(a conversation's messages; a preference's prompt messages, then ``chosen``, then
``rejected``), joined by one blank line (``"\\n\\n"``); roles are not written. Consumers
(SFT, DPO) read ``messages``/``prompt``/``chosen``/``rejected``, never ``text``.

**Keeping the two consistent.** A stage that rewrites ``text`` (``pii_redact``, ``line_dedup``)
leaves the structured fields stale. ``chat_sync`` puts them back in step: with
``authority: text`` (after such stages) it re-derives the contents from the edited text by
aligning the old rendering with the new one (``realign``: lines first, then characters inside
changed lines); every separator between two contents must survive unedited, else the record
is dropped (``dropped.unalignable``), so redacted text can never leave unredacted messages
behind. With ``authority: messages`` (hand-written JSONL whose ``text`` is a placeholder or
stale) it re-renders ``text``. The ``chat_schema`` filter drops records that are malformed or
whose ``text`` no longer matches their contents (``text_mismatch``): run it last, before
SFT/DPO.

**The embedded default.** ``stdlib_instructions`` walks the standard library's source with
``ast`` (never importing it) and turns documented functions and methods into conversations:
the user asks for the function by its signature and the first paragraph of its docstring, the
assistant answers with its source. ``stdlib_preferences`` takes the functions whose docstrings
hold doctests and pairs the real function (chosen) with a mutated copy (rejected) that fails
them while the real one passes.

**Running code.** Only ``stdlib_preferences`` runs code: the library's own (trusted) modules
and their functions with a small AST mutation. It runs them only in a child interpreter per
module (``run_doctests``): ``python -S -P`` (no site-packages, nothing prepended to the path),
an environment of five variables, a fresh temporary working directory and ``HOME``, its own
session (the group is killed afterwards), and ``setrlimit`` before it starts (``RLIMIT_CPU``,
``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_FSIZE`` 16 MiB, ``RLIMIT_NOFILE`` 256, no core
files); each doctest run is cut after ``timeout_s`` seconds (an interval timer in the child,
and a watchdog in the parent that kills a child that stops answering). It is not a sandbox
against hostile code: no network or process isolation; the code is the standard library's.
"""
from __future__ import annotations

import ast
import difflib
import fnmatch
import hashlib
import json
import os
import random
import re
import select
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from recipe_engine import DocumentFilter, Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import chat_kind, chat_record_problem, list_parts, read_documents, write_documents

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key

SEPARATOR = "\n\n"  # between the contents in ``text``

# module names never read: tests, the IDE, demos, modules that act when imported
DEFAULT_EXCLUDE = ["test", "test.*", "*.test", "*.test.*", "*.tests", "*.tests.*",
                   "*.idle_test", "*.idle_test.*", "idlelib", "idlelib.*", "turtledemo",
                   "turtledemo.*", "antigravity", "this", "__main__", "*.__main__",
                   "__phello__", "__phello__.*", "__hello__"]
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # never the library's own

TEMPLATES = [
    "Write a Python {what} that does the following: {para}",
    "Implement the Python {what}.\n\n{para}",
    "Here is the description of a Python {what}:\n\n{para}\n\nWrite it.",
    "{para}\n\nWrite this as the Python {what}.",
]


# -- the record schema ---------------------------------------------------------------------------


def chat_segments(doc: dict[str, Any]) -> list[Any]:
    """The contents ``text`` renders, in order (not checked: see ``schema_problem``)."""
    kind = chat_kind(doc)
    if kind == "conversation":
        return [m.get("content") if isinstance(m, dict) else None for m in doc["messages"]] \
            if isinstance(doc["messages"], list) else []
    if kind == "preference":
        prompt = doc["prompt"] if isinstance(doc["prompt"], list) else []
        return [m.get("content") if isinstance(m, dict) else None for m in prompt] + \
            [doc.get("chosen"), doc.get("rejected")]
    return []


def chat_text(doc: dict[str, Any]) -> str:
    """The ``text`` a chat record must carry: its contents joined by a blank line."""
    return SEPARATOR.join(s if isinstance(s, str) else "" for s in chat_segments(doc))


def with_segments(doc: dict[str, Any], segments: list[str]) -> dict[str, Any]:
    """A copy of a well-formed chat record with its contents replaced (in ``chat_segments``
    order) and ``text`` re-rendered."""
    out = dict(doc)
    if chat_kind(doc) == "conversation":
        out["messages"] = [{**m, "content": s} for m, s in zip(doc["messages"], segments)]
    else:
        n = len(doc["prompt"])
        out["prompt"] = [{**m, "content": s} for m, s in zip(doc["prompt"], segments[:n])]
        out["chosen"], out["rejected"] = segments[n], segments[n + 1]
    out["text"] = SEPARATOR.join(segments)
    return out


def schema_problem(doc: dict[str, Any], expect: str = "any",
                   check_text: bool = True) -> str | None:
    """Why a record is no valid chat record of type ``expect`` (any, conversation,
    preference), or
    None. The reasons, in the order they are checked, are ``chat_schema``'s."""
    why = chat_record_problem(doc, expect)
    if why:
        return why
    if check_text and doc.get("text") != chat_text(doc):
        return "text_mismatch"
    return None


def realign(segments: list[str], new_text: str) -> list[str] | None:
    """The contents of ``new_text``, an edited ``SEPARATOR.join(segments)``: the old and new
    texts are aligned line by line, then character by character inside the changed lines, and
    every separator must fall in an unchanged stretch. None when one does not (an edit touched
    it, or removed it)."""
    old = SEPARATOR.join(segments)
    if old == new_text:
        return list(segments)
    spans, pos = [], 0
    for s in segments[:-1]:
        pos += len(s)
        spans.append(pos)
        pos += len(SEPARATOR)
    blocks = _equal_blocks(old, new_text)
    cuts = []
    for s in spans:
        e = s + len(SEPARATOR)
        hit = next((j + s - i for i, j, n in blocks if i <= s and e <= i + n), None)
        if hit is None:
            return None
        cuts.append(hit)
    if cuts != sorted(cuts):
        return None
    out, start = [], 0
    for c in cuts:
        out.append(new_text[start:c])
        start = c + len(SEPARATOR)
    out.append(new_text[start:])
    return out


def _equal_blocks(a: str, b: str) -> list[tuple[int, int, int]]:
    """(i, j, n): ``a[i:i+n] == b[j:j+n]``, the unchanged stretches, merged when contiguous."""
    la, lb = a.splitlines(keepends=True), b.splitlines(keepends=True)
    oa = [0]
    for line in la:
        oa.append(oa[-1] + len(line))
    ob = [0]
    for line in lb:
        ob.append(ob[-1] + len(line))
    raw: list[tuple[int, int, int]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, la, lb, autojunk=False).get_opcodes():
        ca, cb = oa[i1], ob[j1]
        if tag == "equal":
            raw.append((ca, cb, oa[i2] - ca))
        elif tag == "replace":
            sub = difflib.SequenceMatcher(None, a[ca:oa[i2]], b[cb:ob[j2]], autojunk=False)
            raw += [(ca + i, cb + j, n) for i, j, n in sub.get_matching_blocks() if n]
    merged: list[tuple[int, int, int]] = []
    for i, j, n in raw:
        if merged and merged[-1][0] + merged[-1][2] == i and merged[-1][1] + merged[-1][2] == j:
            pi, pj, pn = merged[-1]
            merged[-1] = (pi, pj, pn + n)
        else:
            merged.append((i, j, n))
    return merged


@dataclass(kw_only=True)
class ChatSchemaFilter(DocumentFilter,
                       name="chat_schema",
                       description="drop malformed conversation and preference records"):
    """Keep well-formed chat records whose ``text`` renders their contents."""

    expect: Literal["any", "conversation", "preference"] = "any"  # the record type kept
    check_text: bool = True  # drop records whose text is not their contents' rendering

    def reason(self, doc: dict[str, Any]) -> str | None:
        return schema_problem(doc, self.expect, self.check_text)


@dataclass(kw_only=True)
class ChatSync(Stage,
               name="chat_sync",
               version="1",
               description="put chat records' text and messages back in step after a stage "
                           "edited one of them",
               inputs={"documents": "documents"},
               output="documents"):
    """Re-derive chat records' contents from their edited ``text`` (or ``text`` from them)."""

    authority: Literal["text", "messages"] = "text"  # which side wins when they differ

    def run(self, ctx: StageContext) -> None:
        parts = list_parts(ctx.inputs["documents"].path)
        tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, file_stamp(part), self.version, self.authority)
            tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                "authority": self.authority}))
        results = run_tasks(ctx, sync_part, tasks, "chat_sync")
        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in results if r["documents_out"]],
                    ctx.output)
        for key in ("in_step", "rebuilt", "not_chat", "malformed", "dropped.unalignable"):
            ctx.count(key, 0)
        for r in results:
            merge_counts(ctx, r["counts"])
        docs_in = sum(r["documents_in"] for r in results)
        docs_out = sum(r["documents_out"] for r in results)
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.check_skips(docs_in)
        ctx.meta.update({"num_documents": docs_out,
                         "num_bytes": sum(r["bytes"] for r in results)})
        ctx.metrics.update({"documents_in": docs_in, "documents_out": docs_out,
                            "rebuilt": ctx.counts["rebuilt"],
                            "unalignable": ctx.counts["dropped.unalignable"]})


def sync_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: one part with every chat record's text and contents in step."""
    counts: dict[str, int] = {}
    totals = {"in": 0, "out": 0, "bytes": 0}

    def bump(k: str) -> None:
        counts[k] = counts.get(k, 0) + 1

    def synced() -> Iterator[dict[str, Any]]:
        for doc in read_documents(Path(task["part"])):
            totals["in"] += 1
            kind = chat_kind(doc)
            segments = chat_segments(doc)
            if kind is None:
                bump("not_chat")
            elif kind == "both" or not segments or \
                    not all(isinstance(s, str) for s in segments):
                bump("malformed")  # left for chat_schema to drop, with its reason
            elif doc.get("text") == SEPARATOR.join(segments):
                bump("in_step")
            elif task["authority"] == "messages":
                doc = with_segments(doc, segments)
                bump("rebuilt")
            else:
                text = doc.get("text")
                new = realign(segments, text) if isinstance(text, str) else None
                if new is None:
                    bump("dropped.unalignable")
                    continue
                doc = with_segments(doc, new)
                bump("rebuilt")
            text = doc.get("text")
            totals["out"] += 1
            totals["bytes"] += len(text.encode("utf-8", "surrogatepass")) \
                if isinstance(text, str) else 0
            yield doc

    rel = f"chat_sync/{task['key']}.jsonl.zst"
    (Path(task["work"]) / rel).parent.mkdir(parents=True, exist_ok=True)
    write_documents(Path(task["work"]) / rel, synced())
    return {"files": [rel], "documents_in": totals["in"], "documents_out": totals["out"],
            "bytes": totals["bytes"], "counts": counts}


# -- reading the standard library ---------------------------------------------------------------


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_modules(root: str, modules: list[str], exclude: list[str]) -> list[tuple[str, str]]:
    """``(module, path relative to root)`` of the ``.py`` files under ``root``, sorted by
    path: those ``modules`` names (a package includes its submodules; empty: all), less the
    names ``exclude`` matches and the directories in ``SKIP_DIRS``."""
    found = []
    for d, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(d, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and x.isidentifier())
        for f in sorted(files):
            if not f.endswith(".py") or not f[:-3].isidentifier():
                continue
            names = parts + ([] if f == "__init__.py" else [f[:-3]])
            if not names:
                continue
            module = ".".join(names)
            if modules and not any(module == m or module.startswith(m + ".") for m in modules):
                continue
            if any(fnmatch.fnmatchcase(module, g) for g in exclude):
                continue
            found.append((module, "/".join(parts + [f])))
    return sorted(found, key=lambda mr: mr[1])


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph, its lines joined: up to a blank or a ``>>>`` line."""
    lines = []
    for line in doc.strip().splitlines():
        if not line.strip() or line.lstrip().startswith(">>>"):
            break
        lines.append(line.strip())
    return " ".join(lines)


def _to_char(line: str, col: int) -> int:
    """ast's column (UTF-8 bytes) as a character index into ``line``."""
    return len(line.encode("utf-8")[:col].decode("utf-8", "ignore"))


def _is_stub(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True  # a docstring, or ...
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def extract_functions(source: str, module: str, rel: str, *, min_doc_words: int,
                      max_lines: int, keep_docstring: bool,
                      exclude: list[str], bump: Any) -> list[dict[str, Any]]:
    """The documented functions and methods of one module's source that make an
    instruction pair, in source order (a name defined twice: the last definition)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        bump("skipped.module_unparsable")
        return []
    lines = source.splitlines(keepends=True)
    nodes: list[tuple[ast.AST, str | None]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nodes.append((node, None))
        elif isinstance(node, ast.ClassDef):
            nodes += [(n, node.name) for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found: dict[str, dict[str, Any]] = {}
    for node, cls in nodes:
        bump("functions_seen")
        qualname = f"{cls}.{node.name}" if cls else node.name
        if any(fnmatch.fnmatchcase(f"{module}.{qualname}", g) for g in exclude):
            bump("ignored.excluded")
            continue
        why, fn = _function(node, cls, qualname, lines, min_doc_words, max_lines,
                            keep_docstring)
        if fn is None:
            bump(f"ignored.{why}")
            continue
        if qualname in found:
            bump("ignored.redefined")
            del found[qualname]
        found[qualname] = {**fn, "module": module, "path": rel}
    return list(found.values())


def _function(node: Any, cls: str | None, qualname: str, lines: list[str],
              min_doc_words: int, max_lines: int,
              keep_docstring: bool) -> tuple[str, dict[str, Any] | None]:
    if isinstance(node, ast.AsyncFunctionDef):
        return "async", None
    doc = ast.get_docstring(node)
    if not doc:
        return "no_docstring", None
    para = first_paragraph(doc)
    if len(para.split()) < min_doc_words:
        return "short_docstring", None
    if all(_is_stub(s) for s in node.body):
        return "no_body", None
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    end = node.end_lineno
    indent = node.col_offset
    if lines[start - 1].encode("utf-8")[:indent].strip() or node.body[0].lineno == node.lineno:
        return "one_line", None  # "class A: def f(): ..." or "def f(): 'doc'; ..."
    keep = list(range(start - 1, end))
    if not keep_docstring:
        ds = node.body[0]
        after = lines[ds.end_lineno - 1][_to_char(lines[ds.end_lineno - 1],
                                                  ds.end_col_offset):]
        if after.strip() and not after.strip().startswith("#"):
            return "one_line", None  # the docstring shares its last line with code
        drop = set(range(ds.lineno - 1, ds.end_lineno))
        nxt = ds.end_lineno
        while nxt < end and not lines[nxt].strip():  # blank lines after the docstring
            drop.add(nxt)
            nxt += 1
        keep = [i for i in keep if i not in drop]
    out = []
    for i in keep:
        line = lines[i]
        raw = line.encode("utf-8")
        prefix = raw[:indent]
        out.append(raw[indent:].decode("utf-8") if not prefix.strip() else line)
    src = "".join(out).rstrip() + "\n"
    if src.count("\n") > max_lines:
        return "too_long", None
    try:
        ast.parse(src)
    except SyntaxError:
        return "unparsable", None
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    signature = f"{node.name}({ast.unparse(node.args)}){returns}"
    return "", {"qualname": qualname, "name": node.name, "class": cls,
                "signature": signature, "para": para, "source": src,
                "docstring": doc, "lineno": node.lineno}


def instruction(fn: dict[str, Any], rng: random.Random) -> str:
    if fn["class"]:
        what = f"method `{fn['signature']}` of a class `{fn['class']}`"
    else:
        what = f"function `{fn['signature']}`"
    return rng.choice(TEMPLATES).format(what=what, para=fn["para"])


def _rng(seed: int, ident: str) -> random.Random:
    return random.Random(f"{seed}:{ident}")


@dataclass(kw_only=True)
class StdlibSource(Stage):
    """Base of the two generators (no name: not registered)."""

    modules: list[str] = field(default_factory=list)  # names (a package: its submodules); []: all
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    root: str = ""  # a tree of Python modules; "": the standard library of this interpreter
    min_doc_words: int = 8
    max_lines: int = 40
    keep_docstring: bool = False
    system_prompt: str = ""
    seed: int = 0
    modules_per_task: int = 40

    def check(self, problems: Problems) -> None:
        problems.require(self.min_doc_words >= 1, "min_doc_words", "must be at least 1")
        problems.require(self.max_lines >= 2, "max_lines", "must be at least 2")
        problems.require(self.modules_per_task >= 1, "modules_per_task", "must be positive")
        problems.require(bool(self.source_name.strip()) and "/" not in self.source_name,
                         "source_name", "must be a non-empty name without '/'")
        for m in self.modules:
            problems.require(all(p.isidentifier() for p in str(m).split(".")), "modules",
                             f"{m!r} is not a dotted module name")

    @property
    def tree(self) -> str:
        return os.path.expanduser(self.root) if self.root else stdlib_root()

    def listing(self) -> list[tuple[str, str]]:
        return list_modules(self.tree, self.modules, self.exclude)

    def fingerprint_extra(self) -> str:
        """The Python version and a digest of every listed file's path and content."""
        h = hashlib.sha256(sys.version.encode())
        for module, rel in self.listing():
            h.update(f"\0{module}\0{rel}\0".encode())
            try:
                h.update(hashlib.sha256(Path(self.tree, rel).read_bytes()).digest())
            except OSError:
                h.update(b"unreadable")
        return h.hexdigest()

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.params().items() if k not in ("modules", "root",
                                                                      "modules_per_task")}

    def run_generator(self, ctx: StageContext, fn: Any, state: str) -> None:
        listing = self.listing()
        if not listing:
            raise StageError(f"{self.name}: no module under {self.tree!r} matches "
                             f"modules={self.modules} exclude={self.exclude}")
        options = {**self.options(), "root": self.tree, "work": str(ctx.work)}
        step = self.modules_per_task
        tasks = []
        for i in range(0, len(listing), step):
            chunk = listing[i:i + step]
            key = task_key(i // step, self.name, self.version, self.options(),
                           [(m, rel, *file_stamp(Path(self.tree, rel))[1:]) for m, rel in chunk])
            tasks.append((key, {**options, "key": key, "modules": chunk}))
        ctx.log(f"{len(listing)} modules under {self.tree} in {len(tasks)} tasks")
        results = run_tasks(ctx, fn, tasks, state, "modules",
                            weights=[len(t[1]["modules"]) for t in tasks])
        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in results if r["documents"]], ctx.output)
        for r in results:
            merge_counts(ctx, r["counts"])
        docs = sum(r["documents"] for r in results)
        ctx.count("documents_out", 0)
        ctx.check_skips(ctx.counts.get("modules_read", 0))
        ctx.meta.update({"num_documents": docs, "num_bytes": sum(r["bytes"] for r in results),
                         "source": self.source_name})
        ctx.metrics.update({"documents": docs, "modules": len(listing),
                            "functions_seen": ctx.counts.get("functions_seen", 0)})
        if docs == 0:
            raise StageError(f"{self.name}: no record from the {len(listing)} modules "
                             f"({dict(ctx.counts)})")


def _read_module(root: str, rel: str, bump: Any) -> str | None:
    bump("modules_read")
    try:
        return Path(root, rel).read_bytes().decode("utf-8")
    except OSError:
        bump("skipped.unreadable")
    except UnicodeDecodeError:
        bump("skipped.bad_utf8")
    return None


def _messages(task: dict[str, Any], prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": task["system_prompt"]}] \
        if task["system_prompt"].strip() else []
    return system + [{"role": "user", "content": prompt}]


def _write(task: dict[str, Any], docs: list[dict[str, Any]], counts: dict[str, int],
           state: str) -> dict[str, Any]:
    rel = f"{state}/{task['key']}.jsonl.zst"
    (Path(task["work"]) / rel).parent.mkdir(parents=True, exist_ok=True)
    write_documents(Path(task["work"]) / rel, docs)
    counts["documents_out"] = counts.get("documents_out", 0) + len(docs)
    return {"files": [rel], "documents": len(docs), "counts": counts,
            "bytes": sum(len(d["text"].encode("utf-8")) for d in docs)}


def _functions(task: dict[str, Any], module: str, rel: str, bump: Any) -> list[dict[str, Any]]:
    source = _read_module(task["root"], rel, bump)
    if source is None:
        return []
    return extract_functions(source, module, rel, min_doc_words=task["min_doc_words"],
                             max_lines=task["max_lines"], keep_docstring=task["keep_docstring"],
                             exclude=task["exclude"], bump=bump)


@dataclass(kw_only=True)
class StdlibInstructions(StdlibSource,
                         name="stdlib_instructions",
                         version="1",
                         description="instruction pairs (conversations) from the documented "
                                     "functions of the Python standard library",
                         output="documents"):
    """Conversations: a function asked for by signature and docstring, answered by its source."""

    source_name: str = "stdlib-instructions"

    def run(self, ctx: StageContext) -> None:
        self.run_generator(ctx, instructions_task, "instructions")


def instructions_task(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: the conversations of a chunk of modules."""
    counts: dict[str, int] = {}

    def bump(k: str) -> None:
        counts[k] = counts.get(k, 0) + 1

    docs = []
    for module, rel in task["modules"]:
        for fn in _functions(task, module, rel, bump):
            ident = f"{task['source_name']}/{module}.{fn['qualname']}"
            messages = _messages(task, instruction(fn, _rng(task["seed"], ident)))
            messages.append({"role": "assistant", "content": fn["source"]})
            doc = {"id": ident, "text": "", "source": task["source_name"], "path": rel,
                   "messages": messages, "module": module, "qualname": fn["qualname"]}
            doc["text"] = chat_text(doc)
            docs.append(doc)
    return _write(task, docs, counts, "instructions")


# -- preferences: mutations and doctests ---------------------------------------------------------

_FLIP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="),
         ast.GtE: (">=", ">"), ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="),
         ast.Is: ("is", "is not"), ast.IsNot: (r"is\s+not", "is"),
         ast.In: ("in", "not in"), ast.NotIn: (r"not\s+in", "in")}
_ARITH = {ast.Add: (r"\+", "-"), ast.Sub: ("-", "+")}
_BOOL = {ast.And: ("and", "or"), ast.Or: ("or", "and")}


class _Text:
    """Character offsets of ast positions in one source text."""

    def __init__(self, src: str):
        self.src = src
        self.lines = src.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def at(self, lineno: int, col: int) -> int:
        return self.starts[lineno - 1] + _to_char(self.lines[lineno - 1], col)

    def span(self, node: Any) -> tuple[int, int]:
        return self.at(node.lineno, node.col_offset), self.at(node.end_lineno,
                                                              node.end_col_offset)


def _gap_edit(t: _Text, left: Any, right: Any, token: str,
              new: str) -> tuple[int, int, str] | None:
    """Replace the operator ``token`` (a regex) between two operands with ``new``."""
    a, b = t.span(left)[1], t.span(right)[0]
    gap = t.src[a:b]
    m = re.fullmatch(rf"([\s()\\]*)({token})([\s()\\]*)", gap)
    if not m:
        return None
    return a + m.start(2), a + m.end(2), new


def mutations(src: str) -> list[tuple[int, int, str, str]]:
    """Every single-site mutation of a function's source: ``(start, end, replacement,
    label)``, in ``ast.walk`` order of the body: a comparison flipped (``<`` to ``<=``,
    ``==`` to ``!=``, ``in`` to ``not in``...), ``and``/``or`` swapped, ``+``/``-`` swapped,
    an integer constant off by one, ``True``/``False`` flipped, a condition negated (``if``,
    ``while``, ``assert``, conditional expressions), a ``not`` removed, a returned name
    replaced by another local."""
    t = _Text(src)
    fn = ast.parse(src).body[0]
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    inside_fstring = {id(n) for s in body for j in ast.walk(s)
                      if isinstance(j, ast.JoinedStr) for n in ast.walk(j)}
    local = sorted({a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
                   | {n.id for s in body for n in ast.walk(s)
                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)})
    out: list[tuple[int, int, str, str]] = []

    def add(edit: tuple[int, int, str] | None, label: str) -> None:
        if edit is not None:
            out.append((*edit, label))

    for node in (n for s in body for n in ast.walk(s)):
        if id(node) in inside_fstring or not hasattr(node, "lineno"):
            continue
        line = node.lineno
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for k, op in enumerate(node.ops):
                token, new = _FLIP[type(op)]
                add(_gap_edit(t, operands[k], operands[k + 1], token, new),
                    f"comparison flipped to {new!r} (line {line})")
        elif isinstance(node, ast.BoolOp):
            token, new = _BOOL[type(node.op)]
            for k in range(len(node.values) - 1):
                add(_gap_edit(t, node.values[k], node.values[k + 1], token, new),
                    f"{token!r} swapped for {new!r} (line {line})")
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            token, new = _ARITH[type(node.op)]
            add(_gap_edit(t, node.left, node.right, token, new),
                f"arithmetic operator swapped for {new!r} (line {line})")
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            a, b = t.span(node)
            add((a, b, repr(not node.value)), f"{node.value} -> {not node.value} (line {line})")
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            a, b = t.span(node)
            new = node.value + (1 if node.value <= 1 else -1)
            add((a, b, repr(new)), f"constant {node.value} -> {new} (line {line})")
        elif isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            if isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not):
                continue  # "not" removed, below, is that mutation
            a, b = t.span(node.test)
            add((a, b, f"not ({src[a:b]})"), f"condition negated (line {line})")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            a, b = t.span(node)
            c, d = t.span(node.operand)
            add((a, b, f"({src[c:d]})"), f"'not' removed (line {line})")
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
            others = [n for n in local if n != node.value.id]
            if others:
                pick = others[(node.lineno + len(node.value.id)) % len(others)]
                a, b = t.span(node.value)
                add((a, b, pick), f"returns {pick} instead of {node.value.id} (line {line})")
    return out


def mutants(src: str, rng: random.Random, attempts: int) -> list[tuple[str, str]]:
    """Up to ``attempts`` distinct parsable mutants ``(source, label)``, in a seeded order."""
    sites = mutations(src)
    rng.shuffle(sites)
    out: list[tuple[str, str]] = []
    seen = {src}
    for a, b, new, label in sites:
        if len(out) >= attempts:
            break
        m = src[:a] + new + src[b:]
        if m in seen:
            continue
        try:
            ast.parse(m)
        except SyntaxError:
            continue
        seen.add(m)
        out.append((m, label))
    return out


# The child interpreter: reads one JSON job from stdin, answers one JSON line per run on the
# descriptor that was its stdout (0, 1 and 2 then point to /dev/null). A group is a function:
# its chosen source (run twice: a doctest that passes only sometimes is not used), then its
# mutants until one fails. Each run execs the source in a copy of the module's namespace,
# binds it in the module (or its class) for the run, and runs the docstring's examples.
CHILD = r'''
import doctest, importlib, json, os, signal, sys
job = json.loads(sys.stdin.read())
out = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
sys.path.insert(0, job["root"])
class Timeout(KeyboardInterrupt):
    pass
def alarm(signum, frame):
    raise Timeout()
signal.signal(signal.SIGALRM, alarm)
def say(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()
try:
    mod = importlib.import_module(job["module"])
except BaseException as e:
    mod = None
    error = f"import: {type(e).__name__}"
def run(group, source):
    if mod is None:
        return "error", error
    owner, name = mod, group["name"]
    if group["class"]:
        owner = getattr(mod, group["class"], None)
        if not isinstance(owner, type):
            return "error", "class not found"
    globs = dict(vars(mod))
    try:
        exec(compile(source, "<" + group["qualname"] + ">", "exec"), globs)
    except BaseException as e:
        return "error", f"exec: {type(e).__name__}"
    missing = object()
    if isinstance(owner, type):
        saved = owner.__dict__.get(name, missing)
    else:
        saved = getattr(owner, name, missing)
    try:
        setattr(owner, name, globs[name])
        test = doctest.DocTestParser().get_doctest(group["docstring"], dict(globs),
                                                   group["qualname"], None, 0)
        runner = doctest.DocTestRunner(verbose=False, optionflags=0)
        signal.setitimer(signal.ITIMER_REAL, job["timeout"])
        try:
            failed, attempted = runner.run(test, out=lambda s: None)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Timeout:
        return "timeout", ""
    except BaseException as e:
        return "error", f"run: {type(e).__name__}"
    finally:
        try:
            if saved is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, saved)
        except BaseException:
            pass
    if not attempted:
        return "error", "no examples"
    return ("fail" if failed else "pass"), ""
for g, group in enumerate(job["groups"]):
    runs = group["runs"]
    for k in range(group.get("start", 0), len(runs)):
        status, detail = run(group, runs[k])
        say(g=g, k=k, status=status, detail=detail)
        if k < 2 and status != "pass":
            break
        if k >= 2 and status == "fail":
            break
'''


def _limits(cpu_s: int, memory_mb: int) -> Any:
    def apply() -> None:
        import resource

        for name, value in (("RLIMIT_CPU", (cpu_s, cpu_s + 1)),
                            ("RLIMIT_AS", (memory_mb << 20,) * 2),
                            ("RLIMIT_FSIZE", (16 << 20,) * 2),
                            ("RLIMIT_NOFILE", (256, 256)), ("RLIMIT_CORE", (0, 0))):
            try:
                resource.setrlimit(getattr(resource, name), value)
            except (ValueError, OSError):  # cannot raise a hard limit set above us
                pass

    return apply


def run_doctests(root: str, module: str, groups: list[dict[str, Any]], timeout_s: float,
                 memory_mb: int) -> list[list[str]]:
    """Run each group's sources (``runs``: chosen, chosen, mutants...) against the group's
    docstring examples in a limited child interpreter; returns the statuses per group
    (``pass``, ``fail``, ``error``, ``timeout``, ``crash``), as far as they ran: the chosen
    must pass twice before any mutant runs, and the mutants stop at the first ``fail``. A
    child that dies or stops answering is replaced, the run it was on counted as ``crash`` or
    ``timeout``."""
    results: list[list[str]] = [[] for _ in groups]
    todo = [(g, 0) for g in range(len(groups))]
    while todo:
        g0, k0 = todo[0]
        pending = [dict(groups[g], start=(k0 if g == g0 else 0)) for g, _ in todo]
        index = [g for g, _ in todo]
        heard = sum(map(len, results))
        last = _run_child(root, module, pending, timeout_s, memory_mb, results, index)
        if last is None:
            break
        g, k, status = last  # the run the child was on when it died or hung
        if sum(map(len, results)) == heard and k < 2:  # not one answer: the import failed
            for h in index:
                results[h].append(status)
            break
        results[g].append(status)
        runs = len(groups[g]["runs"])
        nxt = k + 1 if k >= 2 and k + 1 < runs else None
        todo = ([(g, nxt)] if nxt is not None else []) + \
            [(h, 0) for h in index if h > g]
    return results


def _run_child(root: str, module: str, groups: list[dict[str, Any]], timeout_s: float,
               memory_mb: int, results: list[list[str]],
               index: list[int]) -> tuple[int, int, str] | None:
    """One child over ``groups``; None when it finished them, else the unfinished run."""
    job = json.dumps({"root": root, "module": module, "timeout": timeout_s,
                      "groups": groups}).encode()
    total = sum(len(g["runs"]) - g.get("start", 0) for g in groups)
    with tempfile.TemporaryDirectory(prefix="stdlib-doctest-") as tmp:
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0",
               "LC_ALL": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-S", "-P", "-c", CHILD], cwd=tmp, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limits(int(30 + 2 * timeout_s * total), memory_mb))
        try:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(job)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            at = (0, groups[0].get("start", 0)) if groups else (0, 0)
            buf = b""
            deadline = time.monotonic() + 60 + 2 * timeout_s  # the first run imports
            while True:
                wait = deadline - time.monotonic()
                ready = select.select([proc.stdout], [], [], max(wait, 0))[0] if wait > 0 else []
                if not ready:
                    return None if _finished(groups, at) else (index[at[0]], at[1], "timeout")
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    proc.wait()
                    return None if _finished(groups, at) else (index[at[0]], at[1], "crash")
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        r = json.loads(line)
                        g, k = int(r["g"]), int(r["k"])
                    except (ValueError, KeyError, TypeError):
                        continue  # not the child's answer: someone wrote to its descriptor
                    results[index[g]].append(r["status"])
                    at = _next_run(groups, g, k, r["status"])
                deadline = time.monotonic() + 10 + 3 * timeout_s
        finally:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass
            proc.wait()


def _next_run(groups: list[dict[str, Any]], g: int, k: int, status: str) -> tuple[int, int]:
    """The run the child does after run ``k`` of group ``g`` ended with ``status``."""
    runs = len(groups[g]["runs"])
    stop = (k < 2 and status != "pass") or (k >= 2 and status == "fail") or k + 1 >= runs
    return (g + 1, 0) if stop else (g, k + 1)


def _finished(groups: list[dict[str, Any]], at: tuple[int, int]) -> bool:
    return at[0] >= len(groups)


@dataclass(kw_only=True)
class StdlibPreferences(StdlibSource,
                        name="stdlib_preferences",
                        version="1",
                        description="preference triples from the standard library: the real "
                                    "function against a mutant that fails its doctests",
                        output="documents"):
    """Preferences: chosen = a function that passes its doctests, rejected = a mutant that
    fails them."""

    source_name: str = "stdlib-preferences"
    max_attempts: int = 6  # mutants tried per function before it is skipped
    timeout_s: float = 2.0  # per doctest run
    memory_mb: int = 1024  # RLIMIT_AS of the child interpreter

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.require(self.max_attempts >= 1, "max_attempts", "must be at least 1")
        problems.require(self.timeout_s > 0, "timeout_s", "must be positive")
        problems.require(self.memory_mb >= 128, "memory_mb", "must be at least 128")

    def run(self, ctx: StageContext) -> None:
        self.run_generator(ctx, preferences_task, "preferences")


def preferences_task(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: the preference triples of a chunk of modules (one child per module)."""
    counts: dict[str, int] = {}

    def bump(k: str, n: int = 1) -> None:
        counts[k] = counts.get(k, 0) + n

    docs = []
    for module, rel in task["modules"]:
        fns = [f for f in _functions(task, module, rel, bump) if ">>>" in f["docstring"]]
        groups, kept = [], []
        for fn in fns:
            bump("with_doctests")
            ident = f"{task['source_name']}/{module}.{fn['qualname']}"
            found = mutants(fn["source"], _rng(task["seed"], ident), task["max_attempts"])
            if not found:
                bump("ignored.no_mutation_site")
                continue
            groups.append({"name": fn["name"], "class": fn["class"], "qualname": fn["qualname"],
                           "docstring": fn["docstring"],
                           "runs": [fn["source"], fn["source"]] + [m for m, _ in found]})
            kept.append((fn, ident, found))
        if not groups:
            continue
        results = run_doctests(task["root"], module, groups, task["timeout_s"],
                               task["memory_mb"])
        for (fn, ident, found), statuses in zip(kept, results):
            if statuses[:2] != ["pass", "pass"]:
                bump("ignored.chosen_fails_doctest")
                continue
            for status in statuses[2:]:
                bump(f"mutants.{status}")
            if not statuses[2:] or statuses[-1] != "fail":
                bump("ignored.no_failing_mutant")
                continue
            rejected, label = found[len(statuses) - 3]
            prompt = _messages(task, instruction(fn, _rng(task["seed"], ident)))
            doc = {"id": ident, "text": "", "source": task["source_name"], "path": rel,
                   "prompt": prompt, "chosen": fn["source"], "rejected": rejected,
                   "module": module, "qualname": fn["qualname"], "mutation": label}
            doc["text"] = chat_text(doc)
            docs.append(doc)
    return _write(task, docs, counts, "preferences")


COMPONENTS: list[type] = [StdlibInstructions, StdlibPreferences, ChatSync, ChatSchemaFilter]
