"""What the tokenizer stages share: the deterministic training sample and the report.

**Sample.** Every document gets a key ``blake2b(seed, id)``; documents are taken in key
order, first a small held-aside set (at most ``HELDOUT_BYTES`` and ``HELDOUT_FRACTION`` of
the corpus, for the report), then training documents up to ``max_training_bytes`` (the last
one cut to fit). The sample depends neither on the order of the parts nor on the number of
workers. The input may be several documents artifacts (a list slot: one per data stream);
their parts are read as one corpus.

**Evaluation documents.** A document marked held out upstream (``split: heldout``, the
``heldout_split`` stage) is never trained on. When the corpus has such documents, the
report is computed on them (the smallest keys, up to ``HELDOUT_BYTES``) instead of on a
held-aside set, so its figures are the tokenizer's on the text every evaluation uses, and
no training document is set aside. Without marks the sample is what it always was.

Memory stays bounded whatever the corpus size: a part is scanned as a stream into a heap
that keeps only the smallest keys whose sizes add up to the budget (plus the largest
document seen, the most the held-aside set can overshoot its target by), and the parts'
heaps are merged into one with the same rule. So at most about ``budget / smallest
document`` rows are held, never one per document of the corpus, and the rows the selection
needs are never dropped (see ``KeyHeap``).

**Report.** ``tokenizer_report`` encodes the held-aside documents and gives bytes and words
per token overall, per source and per language, the byte-fallback rate and the share of the
vocabulary used.
"""
from __future__ import annotations

import hashlib
import heapq
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from recipe_engine import StageContext, StageError
from recipe_engine.artifacts import is_heldout, list_parts, read_documents

SENTENCE_BYTES = 1 << 16  # documents longer than this are cut at line ends for the trainer
HELDOUT_BYTES = 1_000_000  # at most this much text held aside for the report
HELDOUT_FRACTION = 0.05  # ... and at most this fraction of the corpus
MAX_REPORT_GROUPS = 50  # sources / languages listed one by one; the rest as "(other)"
UNKNOWN = "unknown"

Row = tuple[int, int, int, int]  # key, part index, line in part, UTF-8 bytes


def sample_key(seed: int, doc_id: str) -> int:
    """Position of a document in the training sample's order."""
    digest = hashlib.blake2b(f"tokenizer-sample:{seed}:{doc_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


class KeyHeap:
    """The rows of smallest key whose sizes add up to ``budget`` plus the largest size seen.

    A row is dropped only when the rows of smaller key left in the heap already hold
    ``budget + max_size`` bytes. The selection takes a held-aside prefix that ends at most
    one document past ``HELDOUT_BYTES`` and then training rows up to ``max_training_bytes``
    (``budget`` is their sum), so every row it takes has fewer bytes of smaller key before
    it than that and is kept. Merging heaps keeps the property (``merge``)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.total = 0
        self.total_seen = 0  # rows ever pushed
        self.max_size = 0
        self._heap: list[tuple[int, int, int, int]] = []  # negated key/part/line: a max-heap

    def push(self, row: Row) -> None:
        heapq.heappush(self._heap, (-row[0], -row[1], -row[2], row[3]))
        self.total_seen += 1
        self.total += row[3]
        self.max_size = max(self.max_size, row[3])
        while self._heap and self.total - self._heap[0][3] >= self.budget + self.max_size:
            self.total -= heapq.heappop(self._heap)[3]

    def merge(self, rows: Iterable[Row], max_size: int) -> None:
        self.max_size = max(self.max_size, max_size)
        for row in rows:
            self.push(row)

    def rows(self) -> list[Row]:
        return sorted((-k, -p, -i, n) for k, p, i, n in self._heap)

    def __len__(self) -> int:
        return len(self._heap)


def _scan_part(task: tuple[str, int, int, int]) -> dict[str, Any]:
    """Worker: keys and sizes of one part's documents, keeping only what the sample can take
    from it (``KeyHeap`` with the global budget)."""
    path, part_index, seed, budget = task
    heap = KeyHeap(budget)
    marked = KeyHeap(HELDOUT_BYTES)  # evaluation documents: the report's, never trained on
    seen = total = empty = 0
    for line, doc in enumerate(read_documents(Path(path))):
        seen += 1
        text = doc.get("text")
        if not isinstance(text, str) or not text:
            empty += 1
            continue
        size = len(text.encode("utf-8"))
        row = (sample_key(seed, str(doc.get("id", text))), part_index, line, size)
        if is_heldout(doc):
            marked.push(row)
            continue
        total += size
        heap.push(row)
    return {"seen": seen, "empty": empty, "bytes": total, "rows": heap.rows(),
            "max_size": heap.max_size, "marked_rows": marked.rows(),
            "marked_max_size": marked.max_size, "marked": marked.total_seen}


def doc_source(doc: dict[str, Any]) -> str:
    """The source a document is reported under: its ``source`` field, else its id's prefix
    before the first ``/``."""
    source = doc.get("source")
    if isinstance(source, str) and source:
        return source
    doc_id = str(doc.get("id") or "")
    return doc_id.split("/", 1)[0] if "/" in doc_id else UNKNOWN


def _read_texts(task: tuple[str, dict[int, int]]) -> dict[int, tuple[str, str, str | None]]:
    """Worker: (text, source, language) of the chosen lines of one part, each text cut to
    its byte allowance."""
    path, take = task
    out: dict[int, tuple[str, str, str | None]] = {}
    for line, doc in enumerate(read_documents(Path(path))):
        if line in take:
            text = doc["text"]
            if len(text.encode("utf-8")) > take[line]:
                text = text.encode("utf-8")[: take[line]].decode("utf-8", "ignore")
            language = doc.get("language")
            out[line] = (text, doc_source(doc),
                         language if isinstance(language, str) and language else None)
    return out


class Sample:
    """The training texts and the held-aside documents ``(text, source, language)``."""

    def __init__(self, train: list[str], heldout: list[tuple[str, str, str | None]],
                 total_bytes: int, marked: bool = False) -> None:
        self.train = train
        self.heldout = heldout
        self.marked = marked  # heldout holds the corpus's marked evaluation documents
        self.total_bytes = total_bytes
        self.training_bytes = sum(len(t.encode("utf-8")) for t in train)


def select_sample(ctx: StageContext, seed: int, max_training_bytes: int) -> Sample:
    """Scan the ``documents`` input(s) (in parallel, part by part), pick the held-aside (or
    the marked evaluation) and the training documents in key order and read their texts.
    Counts ``documents``, ``skipped.empty_text``, ``training_documents``,
    ``heldout_documents`` and ``excluded_heldout`` (marked documents, not trained on)."""
    arts = ctx.input_lists.get("documents") or [ctx.inputs["documents"]]
    parts = [p for art in arts for p in list_parts(art.path)]
    if not parts:
        raise StageError("no document parts in " + ", ".join(str(a.path) for a in arts))

    # 1. keys and sizes, part by part (in parallel); keep what the sample can take
    budget = max_training_bytes + HELDOUT_BYTES
    tasks = [(str(p), i, seed, budget) for i, p in enumerate(parts)]
    heap = KeyHeap(budget)
    marked = KeyHeap(HELDOUT_BYTES)
    seen = total = num_marked = 0
    for done, res in enumerate(ctx.executor.map(_scan_part, tasks), 1):
        seen += res["seen"]
        total += res["bytes"]
        num_marked += res["marked"]
        if res["empty"]:
            ctx.skip("empty_text", res["empty"])
        heap.merge(res["rows"], res["max_size"])
        marked.merge(res["marked_rows"], res["marked_max_size"])
        ctx.progress(done, len(parts), "parts scanned")
    ctx.count("documents", seen)
    ctx.check_skips(seen)
    rows = heap.rows()
    if not rows:
        raise StageError("the documents artifact holds no text to train a tokenizer on"
                         + (f" ({num_marked} documents are marked held out)" if num_marked else ""))

    # 2. held-aside documents first, then the training sample, both in key order
    heldout, train = [], []
    acc = 0
    i = 0
    if num_marked:  # the marked evaluation documents are the report's; none set aside
        ctx.count("excluded_heldout", num_marked)
        for row in marked.rows():
            if acc >= HELDOUT_BYTES:
                break
            heldout.append(row)
            acc += row[3]
    else:
        heldout_target = min(HELDOUT_BYTES, HELDOUT_FRACTION * total)
        while i < len(rows) - 1 and acc < heldout_target:  # always leave one to train on
            heldout.append(rows[i])
            acc += rows[i][3]
            i += 1
    acc = 0
    take: dict[tuple[int, int], int] = {}
    for row in rows[i:]:
        if acc >= max_training_bytes:
            break
        train.append(row)
        take[(row[1], row[2])] = min(row[3], max_training_bytes - acc)
        acc += row[3]
    for row in heldout:
        take[(row[1], row[2])] = row[3]

    by_part: dict[int, dict[int, int]] = {}
    for (part, line), n in take.items():
        by_part.setdefault(part, {})[line] = n
    wanted = sorted(by_part)
    read_tasks = [(str(parts[p]), by_part[p]) for p in wanted]
    docs: dict[tuple[int, int], tuple[str, str, str | None]] = {}
    for part, got in zip(wanted, ctx.executor.map(_read_texts, read_tasks)):
        docs.update({(part, line): d for line, d in got.items()})
    sample = Sample([docs[(r[1], r[2])][0] for r in train],
                    [docs[(r[1], r[2])] for r in heldout], total, marked=bool(num_marked))
    ctx.count("training_documents", len(sample.train))
    ctx.count("heldout_documents", len(sample.heldout))
    ctx.log(f"training on {len(sample.train)} documents ({sample.training_bytes / 1e6:.1f} MB "
            f"of {total / 1e6:.1f} MB), {len(sample.heldout)} held aside")
    return sample


def training_sentences(texts: Iterable[str], limit: int = SENTENCE_BYTES):
    """Yield ``texts`` whole, or cut at line ends into pieces of at most ``limit`` bytes."""
    for text in texts:
        if len(text) * 4 <= limit or len(text.encode("utf-8")) <= limit:
            yield text
            continue
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size + n > limit and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            if n > limit:
                step = limit // 4
                for i in range(0, len(line), step):
                    yield line[i : i + step]
                continue
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


# -- special tokens ------------------------------------------------------------------------

RESERVED_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def check_special_tokens(tokens: Sequence[str], problems: Any, key: str = "special_tokens"
                         ) -> None:
    """Declared special tokens: non-empty, distinct, no whitespace, not a reserved piece."""
    seen: set[str] = set()
    for token in tokens:
        if not isinstance(token, str) or not token:
            problems.add(key, f"{token!r} is not a non-empty string")
            continue
        if token in seen:
            problems.add(key, f"{token!r} is declared twice")
        seen.add(token)
        if any(c.isspace() for c in token) or "\u2581" in token or "\ue000" in token:
            problems.add(key, f"{token!r} holds whitespace, U+2581 or U+E000; a special "
                              "token is one word of visible characters")
        if token in RESERVED_TOKENS:
            problems.add(key, f"{token!r} is already unk/bos/eos/pad (ids 0-3); declare only "
                              "additional tokens")
        if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            problems.add(key, f"{token!r} looks like a byte-fallback piece")


# -- report ----------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def _groups(stats: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Per-group figures, the largest groups (by bytes) first; past MAX_REPORT_GROUPS the rest
    summed as ``(other)``."""
    order = sorted(stats, key=lambda g: (-stats[g][1], g))
    kept = {g: stats[g] for g in order[:MAX_REPORT_GROUPS]}
    rest = order[MAX_REPORT_GROUPS:]
    if rest:
        kept["(other)"] = [sum(stats[g][k] for g in rest) for k in range(4)]
    return {g: {"documents": d, "bytes": b, "words": w, "tokens": t,
                "bytes_per_token": _ratio(b, t), "words_per_token": _ratio(w, t)}
            for g, (d, b, w, t) in kept.items()}


def tokenizer_report(encode_batch: Callable[[list[str]], list[list[int]]],
                     docs: Sequence[tuple[str, str, str | None]], vocab_size: int,
                     byte_ids: set[int]) -> dict[str, Any]:
    """Figures of a tokenizer on ``docs`` ``(text, source, language)``:

    ``bytes_per_token`` and ``words_per_token`` (words: whitespace-separated runs) overall,
    ``by_source`` and ``by_language`` (documents without a ``language`` field are left out
    of the latter); ``byte_fallback_rate``, the share of tokens that are byte pieces
    (``byte_ids``); ``vocab_used_fraction``, distinct ids seen / ``vocab_size``."""
    ids = encode_batch([d[0] for d in docs])
    by_source: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    by_language: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    used: set[int] = set()
    byte_tokens = 0
    for (text, source, language), seq in zip(docs, ids):
        figures = (1, len(text.encode("utf-8")), len(text.split()), len(seq))
        for table, group in ((by_source, source), (by_language, language)):
            if group is not None:
                row = table[group]
                for k in range(4):
                    row[k] += figures[k]
        used.update(seq)
        byte_tokens += sum(1 for i in seq if i in byte_ids)
    num_bytes = sum(r[1] for r in by_source.values())
    words = sum(r[2] for r in by_source.values())
    tokens = sum(r[3] for r in by_source.values())
    return {
        "documents": len(docs), "bytes": num_bytes, "words": words, "tokens": tokens,
        "bytes_per_token": _ratio(num_bytes, tokens),
        "words_per_token": _ratio(words, tokens),
        "byte_fallback_rate": round(byte_tokens / tokens, 6) if tokens else 0.0,
        "vocab_used_fraction": _ratio(len(used), vocab_size),
        "by_source": _groups(by_source),
        "by_language": _groups(by_language),
    }


def measured_on(sample: Sample) -> str:
    """What the report was computed on: ``evaluation`` (the marked held-out documents),
    ``heldout`` (the held-aside set) or ``training`` (the training text: a tiny corpus)."""
    return "evaluation" if sample.marked else "heldout" if sample.heldout else "training"


def publish_report(ctx: StageContext, report: dict[str, Any], measured_on: str) -> None:
    """The report into the stage's manifest: whole in ``meta["report"]``, the headline
    figures in ``metrics``."""
    ctx.meta["report"] = {"measured_on": measured_on, **report}
    ctx.metrics.update({
        "bytes_per_token": report["bytes_per_token"],
        "words_per_token": report["words_per_token"],
        "byte_fallback_rate": report["byte_fallback_rate"],
        "vocab_used_fraction": report["vocab_used_fraction"],
    })
