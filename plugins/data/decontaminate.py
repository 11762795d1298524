"""``decontaminate``: drop (or flag) training documents that share a long n-gram with an
evaluation task, read from the lm-eval task definitions themselves.

Where the evaluation text comes from. ``tasks`` names lm-eval tasks (or groups) defined by
YAML files under ``task_dirs`` and then under the shipped ``plugins/evaluation/tasks/`` (the
first definition of a name wins, so a copy in ``task_dirs`` overrides a shipped task). A YAML
defines a task (``task: name``; its ``tag``/``group`` entries make it a member of those
groups) or a group (``group: name`` with ``task: [names]``); ``include:`` merges a base YAML.
A task's items are read from its local ``dataset_kwargs.data_files`` (JSON Lines, or a JSON
array), the evaluated split: ``test_split``, else ``validation_split``. Relative paths are
looked up under the tasks directory (as lm-eval's ``--include_path`` and the shipped loader
do), then beside the YAML. A task reading a Hugging Face Hub dataset cannot be used: the
stage fails naming it. lm_eval is not imported; YAML is read with a ``SafeLoader`` that also
accepts lm-eval's ``!function`` tag (as an opaque reference).

The text of an item is ``doc_to_text + target_delimiter + target``, where the target is
``doc_to_target``, or for multiple choice the correct choice (``doc_to_choice[target]``).
Each of these may be a field name, a ``{{field}}`` template without other Jinja, a literal
list (choices) or an index (target). Anything else (``!function``, Jinja filters or
expressions) makes the stage use all string fields of each item, top level and in lists,
joined by spaces, and say so in a log line.

Matching. Texts are normalised: lower case, every run of characters other than letters,
digits and ``_`` is one separator (punctuation stripped, whitespace collapsed); the words are
joined by single spaces and each n-gram is hashed (BLAKE2b, 8 bytes). An item of at least
``ngram`` words contributes every ``ngram``-word window; a shorter item of at least
``min_words`` words contributes its whole text as one shorter n-gram (GPT-3's rule of thumb:
a floor of 8 words), and an item shorter than that is not used (counted per task:
``eval_items_too_short.<task>``; a two-word answer is in every corpus). A training document is
contaminated when any of its windows of any of those lengths has the hash of an evaluation
n-gram. The hash set is built once in the stage's process and saved in the scratch
directory; workers load it once per process.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from recipe_engine import Problems, Stage, StageContext, StageError, did_you_mean
from recipe_engine.artifacts import list_parts, read_documents, write_documents
from recipe_engine.fsutil import atomic_write_bytes

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key

# the lm-eval tasks shipped with the evaluation plugin: read as files, never imported
TASKS_DIR = Path(__file__).resolve().parent.parent / "evaluation" / "tasks"
DIGEST_SIZE = 8
MAX_EXAMPLES = 10  # matches recorded in meta
MAX_INCLUDE_DEPTH = 8
_WORD = re.compile(r"\w+")
_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def words(text: str) -> list[str]:
    """Normalised words: lower case, split at everything but letters, digits and ``_``."""
    return _WORD.findall(text.lower())


def ngram_hash(ngram: list[str]) -> bytes:
    return hashlib.blake2b(" ".join(ngram).encode("utf-8", "surrogatepass"),
                           digest_size=DIGEST_SIZE).digest()


# -- task definitions ----------------------------------------------------------------------


class FunctionRef(str):
    """lm-eval's ``!function module.name``: kept as text, never imported."""


class _TaskLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus lm-eval's ``!function`` tag."""


_TaskLoader.add_constructor(
    "!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))


def _read_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        config = yaml.load(f, Loader=_TaskLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(config, dict):
        raise ValueError("not a mapping")
    include = config.pop("include", None)
    if isinstance(include, str):
        if depth >= MAX_INCLUDE_DEPTH:
            raise ValueError(f"include: nested more than {MAX_INCLUDE_DEPTH} deep")
        base = _read_yaml(path.parent / include, depth + 1)
        config = {**base, **config, "_includes": [*base.get("_includes", []),
                                                  str(path.parent / include)]}
    return config


@dataclass
class EvalTask:
    """A resolved task: its YAML (with includes merged) and the files its items come from."""

    name: str
    yaml_path: Path
    root: Path  # the tasks directory the YAML was found under
    config: dict[str, Any]

    def files(self) -> list[Path]:
        """The YAML, its includes and its data files: what the fingerprint covers."""
        return [self.yaml_path, *map(Path, self.config.get("_includes", [])),
                *self.data_files()]

    def data_files(self) -> list[Path]:
        kwargs = self.config.get("dataset_kwargs") or {}
        spec = kwargs.get("data_files") if isinstance(kwargs, dict) else None
        if spec is None:
            raise StageError(
                f"task {self.name!r} ({self.yaml_path}) has no dataset_kwargs.data_files: it "
                f"reads dataset_path={self.config.get('dataset_path')!r}, presumably from the "
                f"Hugging Face Hub; decontaminate reads local JSON Lines files only")
        if isinstance(spec, dict):
            split = self.config.get("test_split") or self.config.get("validation_split")
            if split not in spec:
                raise StageError(
                    f"task {self.name!r} ({self.yaml_path}): the evaluated split {split!r} "
                    f"(test_split, else validation_split) is not in data_files {sorted(spec)}")
            spec = spec[split]
        names = [spec] if isinstance(spec, str) else list(spec)
        out = []
        for name in names:
            for base in (self.root, self.yaml_path.parent):
                if (base / name).is_file():
                    out.append(base / name)
                    break
            else:
                raise StageError(f"task {self.name!r} ({self.yaml_path}): data file {name!r} "
                                 f"not found under {self.root} or {self.yaml_path.parent}")
        return out

    def items(self) -> list[dict[str, Any]]:
        rows: list[Any] = []
        for path in self.data_files():
            text = path.read_text(encoding="utf-8")
            try:
                whole = json.loads(text)
                rows += whole if isinstance(whole, list) else [whole]
            except ValueError:
                try:
                    rows += [json.loads(line) for line in text.splitlines() if line.strip()]
                except ValueError as e:
                    raise StageError(f"task {self.name!r}: {path} is neither JSON Lines nor a "
                                     f"JSON array: {e}") from None
        return [r for r in rows if isinstance(r, dict)]


def find_tasks(names: list[str], dirs: list[Path]) -> list[EvalTask]:
    """Resolve task and group names to tasks, in order, without duplicates."""
    defined: dict[str, EvalTask] = {}
    groups: dict[str, list[str]] = {}
    unreadable: list[str] = []
    for root in dirs:
        if not root.is_dir():
            raise StageError(f"task directory {root} does not exist")
        for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            try:
                config = _read_yaml(path)
            except (OSError, ValueError, yaml.YAMLError) as e:
                unreadable.append(f"{path} ({str(e).splitlines()[0] if str(e) else e!r})")
                continue
            task = config.get("task")
            if isinstance(task, str):
                defined.setdefault(task, EvalTask(task, path, root, config))
                for key in ("tag", "group"):
                    member_of = config.get(key) or []
                    for g in [member_of] if isinstance(member_of, str) else member_of:
                        if isinstance(g, str):
                            groups.setdefault(g, []).append(task)
            elif isinstance(task, list) and isinstance(config.get("group"), str):
                groups.setdefault(config["group"], [t for t in task if isinstance(t, str)])
    out: dict[str, EvalTask] = {}

    def resolve(name: str, trail: tuple[str, ...]) -> None:
        if name in defined:
            out.setdefault(name, defined[name])
        elif name in groups and name not in trail:
            for member in groups[name]:
                resolve(member, (*trail, name))
        elif not trail:
            known = sorted({*defined, *groups})
            raise StageError(
                f"no lm-eval task or group {name!r} in {', '.join(map(str, dirs))}"
                f"{did_you_mean(name, known)}; defined there: {', '.join(known) or 'none'}"
                + (f"; unreadable YAML: {'; '.join(unreadable)}" if unreadable else ""))

    for name in names:
        resolve(name, ())
    return list(out.values())


def _template(spec: str, item: dict[str, Any]) -> str | None:
    """A field name or a ``{{field}}`` template with nothing else of Jinja; else None."""
    if spec in item:
        return str(item[spec])
    if "{{" not in spec or "{%" in spec or "{#" in spec:
        return None
    rest = _FIELD.sub("", spec)
    if "{{" in rest or "}}" in rest:
        return None
    try:
        return _FIELD.sub(lambda m: str(item[m.group(1)]), spec)
    except KeyError:
        return None


def _choices(spec: Any, item: dict[str, Any]) -> list[str] | None:
    if isinstance(spec, list):
        return [str(c) for c in spec]
    if isinstance(spec, str) and not isinstance(spec, FunctionRef):
        m = _FIELD.fullmatch(spec.strip())
        value = item.get(m.group(1) if m else spec)
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return [str(c) for c in value]
    return None


def item_text(config: dict[str, Any], item: dict[str, Any]) -> str | None:
    """``doc_to_text + target_delimiter + target`` of one item, or None when the task's
    templates are not the simple kinds this stage understands."""
    spec = config.get("doc_to_text")
    if not isinstance(spec, str) or isinstance(spec, FunctionRef):
        return None
    text = _template(spec, item)
    if text is None:
        return None
    target_spec = config.get("doc_to_target")
    if target_spec is None:
        return text
    choices = _choices(config["doc_to_choice"], item) if "doc_to_choice" in config else None
    if "doc_to_choice" in config and choices is None:
        return None
    if isinstance(target_spec, bool) or isinstance(target_spec, FunctionRef):
        return None
    if isinstance(target_spec, int):
        target: Any = target_spec
    elif isinstance(target_spec, str):
        target = item[target_spec] if target_spec in item else _template(target_spec, item)
        if target is None:
            return None
        if isinstance(target, str) and target.strip().isdigit() and choices is not None:
            target = int(target)
    else:
        return None
    if isinstance(target, list):  # several acceptable answers: the first
        target = target[0] if target else ""
    if choices is not None and isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < len(choices):
            return None
        target = choices[target]
    delimiter = config.get("target_delimiter", " ")
    return f"{text}{delimiter if isinstance(delimiter, str) else ' '}{target}"


def all_strings(item: Any) -> str:
    """The fallback text: every string in the item, top level and in lists, joined."""
    out: list[str] = []
    for value in item.values():
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out += [v for v in value if isinstance(v, str)]
    return " ".join(out)


@dataclass
class EvalIndex:
    """Hashes of the evaluation n-grams, with which tasks each came from (a bit mask)."""

    tasks: list[str]
    ngrams: dict[bytes, int] = field(default_factory=dict)
    lengths: set[int] = field(default_factory=set)  # n-gram lengths present
    firsts: set[str] = field(default_factory=set)  # first words of the n-grams
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, task_index: int, ngram: list[str]) -> None:
        h = ngram_hash(ngram)
        self.ngrams[h] = self.ngrams.get(h, 0) | (1 << task_index)
        self.lengths.add(len(ngram))
        self.firsts.add(ngram[0])


def build_index(tasks: list[EvalTask], ngram: int, min_words: int,
                log: Callable[[str], None]) -> EvalIndex:
    index = EvalIndex(tasks=[t.name for t in tasks])
    for ti, task in enumerate(tasks):
        items = task.items()
        stats = {"items": len(items), "items_whole_text": 0, "items_too_short": 0,
                 "ngrams": 0, "fallback": False}
        mine: set[bytes] = set()
        for item in items:
            text = item_text(task.config, item)
            if text is None:
                if not stats["fallback"]:
                    log(f"task {task.name}: doc_to_text/doc_to_target/doc_to_choice are not "
                        f"field names or {{{{field}}}} templates; using all string fields of "
                        f"each item")
                stats["fallback"] = True
                text = all_strings(item)
            w = words(text)
            if len(w) >= ngram:
                grams = [w[i:i + ngram] for i in range(len(w) - ngram + 1)]
            elif len(w) >= min_words:
                grams = [w]
                stats["items_whole_text"] += 1
            else:
                stats["items_too_short"] += 1
                continue
            for g in grams:
                index.add(ti, g)
                mine.add(ngram_hash(g))
        stats["ngrams"] = len(mine)
        index.stats[task.name] = stats
    return index


# -- the stage -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class Decontaminate(Stage,
                    name="decontaminate",
                    description="drop or flag documents sharing an n-gram with eval tasks",
                    inputs={"documents": "documents"},
                    output="documents"):
    """Drop (or flag) training documents that share a long n-gram with evaluation tasks."""

    tasks: list[str] = field(default_factory=lambda: ["python_basics"])  # lm-eval names
    task_dirs: list[str] = field(default_factory=list)  # searched before the shipped tasks
    ngram: int = 13  # words per n-gram
    min_words: int = 8  # shorter eval items are not used
    mode: Literal["drop", "flag"] = "drop"
    keep_dropped: bool = False  # drop mode: write dropped documents to dropped/

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.tasks), "tasks", "is empty; name at least one lm-eval task")
        problems.require(self.ngram >= 1, "ngram", f"{self.ngram} must be >= 1")
        problems.require(1 <= self.min_words <= self.ngram, "min_words",
                         f"{self.min_words} must be between 1 and ngram={self.ngram}")
        problems.require(not (self.keep_dropped and self.mode == "flag"), "keep_dropped",
                         "only applies to mode: drop (flag mode keeps every document)")

    def search_dirs(self) -> list[Path]:
        return [*(Path(d).expanduser() for d in self.task_dirs), TASKS_DIR]

    def fingerprint_extra(self) -> str:
        """The resolved tasks' files (YAML, includes, data): editing one reruns the stage."""
        digest = hashlib.sha256()
        try:
            for task in find_tasks(self.tasks, self.search_dirs()):
                for path in task.files():
                    digest.update(f"{task.name}\0{path.name}\0".encode())
                    digest.update(path.read_bytes())
        except (StageError, OSError) as e:  # the run reports it; plan still works
            return f"unresolved: {e}"
        return digest.hexdigest()

    def run(self, ctx: StageContext) -> None:
        tasks = find_tasks(self.tasks, self.search_dirs())
        index = build_index(tasks, self.ngram, self.min_words, ctx.log)
        for name, s in index.stats.items():
            ctx.log(f"task {name}: {s['items']} items, {s['ngrams']} n-grams "
                    f"({s['items_whole_text']} items shorter than {self.ngram} words used "
                    f"whole, {s['items_too_short']} shorter than {self.min_words} words "
                    f"not used)")
            ctx.count(f"eval_items.{name}", s["items"])
            ctx.count(f"eval_items_too_short.{name}", s["items_too_short"])
        if not index.ngrams:
            raise StageError(
                f"no evaluation n-grams: every item of {', '.join(index.tasks)} has fewer "
                f"than min_words={self.min_words} words; lower min_words or drop the stage")
        # JSON, not a pickle: the file outlives the attempt, and reading it runs no code
        payload = json.dumps({
            "tasks": list(index.tasks), "lengths": sorted(index.lengths, reverse=True),
            "firsts": sorted(index.firsts),
            "ngrams": sorted([h.hex(), m] for h, m in index.ngrams.items())},
            separators=(",", ":")).encode()
        index_digest = hashlib.sha256(payload).hexdigest()[:16]
        index_file = ctx.work / "decontaminate" / f"index-{index_digest}.json"
        if not index_file.is_file():
            index_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(index_file, payload)

        parts = list_parts(ctx.inputs["documents"].path)
        work_tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, file_stamp(part), index_digest, self.mode, self.keep_dropped)
            work_tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                     "index": str(index_file), "mode": self.mode,
                                     "keep_dropped": self.keep_dropped}))
        results = run_tasks(ctx, decontaminate_part, work_tasks, "decontaminate")

        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in results if r["documents_out"]],
                    ctx.output)
        if self.keep_dropped:
            clear_parts(ctx.output / "dropped")
            place_parts(ctx.work, [r["files"][1] for r in results if r["dropped"]],
                        ctx.output / "dropped")
        verb = "dropped" if self.mode == "drop" else "flagged"
        ctx.count(verb, 0)
        for name in index.tasks:  # every task shows up, even when it matched nothing
            ctx.count(f"{verb}.{name}", 0)
        for r in results:
            merge_counts(ctx, r["counts"])
        docs_in = sum(r["documents_in"] for r in results)
        docs_out = sum(r["documents_out"] for r in results)
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.count("eval_ngrams", len(index.ngrams))
        ctx.check_skips(docs_in)
        examples = [e for r in results for e in r["examples"]][:MAX_EXAMPLES]
        ctx.log(f"{verb} {ctx.counts[verb]} of {docs_in} documents "
                f"({len(index.ngrams)} evaluation n-grams)")
        ctx.meta.update({
            "num_documents": docs_out,
            "num_bytes": sum(r["bytes"] for r in results),
            "decontamination": {
                "mode": self.mode, "ngram": self.ngram, "min_words": self.min_words,
                "num_eval_ngrams": len(index.ngrams), "tasks": index.stats,
                verb: {name: ctx.counts[f"{verb}.{name}"] for name in index.tasks},
                "examples": examples,
            },
        })
        ctx.metrics.update({"documents_in": docs_in, "documents_out": docs_out,
                            verb: ctx.counts[verb], "eval_ngrams": len(index.ngrams)})


_LOADED: dict[str, tuple[list[str], dict[bytes, int], list[int], set[str]]] = {}


def _load_index(path: str) -> tuple[list[str], dict[bytes, int], list[int], set[str]]:
    """The stage's index, read once per worker process (the file name holds its digest)."""
    if path not in _LOADED:
        _LOADED.clear()
        with open(path, "rb") as f:
            data = json.load(f)
        _LOADED[path] = (data["tasks"], {bytes.fromhex(h): m for h, m in data["ngrams"]},
                         data["lengths"], set(data["firsts"]))
    return _LOADED[path]


def match(text: str, ngrams: dict[bytes, int], lengths: list[int],
          firsts: set[str]) -> tuple[int, str]:
    """(bit mask of the tasks matched, the first matching n-gram) for one text."""
    w = words(text)
    mask, first = 0, ""
    for i, word in enumerate(w):
        if word not in firsts:
            continue
        for n in lengths:  # longest first
            if i + n > len(w):
                continue
            found = ngrams.get(ngram_hash(w[i:i + n]))
            if found:
                mask |= found
                first = first or " ".join(w[i:i + n])
    return mask, first


def decontaminate_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: one part, contaminated documents dropped or flagged."""
    names, ngrams, lengths, firsts = _load_index(task["index"])
    drop = task["mode"] == "drop"
    verb = "dropped" if drop else "flagged"
    counts: dict[str, int] = {}
    dropped: list[dict[str, Any]] = []
    examples: list[dict[str, str]] = []
    totals = {"in": 0, "out": 0, "bytes": 0}

    def bump(k: str) -> None:
        counts[k] = counts.get(k, 0) + 1

    def kept():
        for doc in read_documents(Path(task["part"])):
            totals["in"] += 1
            text = doc.get("text")
            if not isinstance(text, str):
                bump("skipped.missing_text")
                continue
            mask, first = match(text, ngrams, lengths, firsts)
            if mask:
                matched = [n for i, n in enumerate(names) if mask >> i & 1]
                bump(verb)
                for name in matched:
                    bump(f"{verb}.{name}")
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"id": str(doc.get("id")), "task": matched[0],
                                     "ngram": first})
                doc = {**doc, "contaminated": True, "contaminated_tasks": matched,
                       "contaminated_ngram": first}
                if drop:
                    if task["keep_dropped"]:
                        dropped.append({**doc, "drop_reason": f"decontaminate.{matched[0]}"})
                    continue
            totals["out"] += 1
            totals["bytes"] += len(text.encode("utf-8", "surrogatepass"))
            yield doc

    work = Path(task["work"])
    (work / "decontaminate").mkdir(parents=True, exist_ok=True)
    files = [f"decontaminate/{task['key']}.jsonl.zst"]
    write_documents(work / files[0], kept())
    if task["keep_dropped"]:
        files.append(f"decontaminate/{task['key']}.dropped.jsonl.zst")
        write_documents(work / files[1], dropped)
    return {"files": files, "documents_in": totals["in"], "documents_out": totals["out"],
            "dropped": len(dropped), "bytes": totals["bytes"], "counts": counts,
            "examples": examples}


COMPONENTS: list[type] = [Decontaminate]
