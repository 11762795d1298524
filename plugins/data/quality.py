"""Quality and toxicity heuristics for prose: ``document_filter`` components for the
``filter`` stage, each with its published default thresholds and one drop reason per rule.

* ``gopher_quality`` and ``gopher_repetition``: Gopher's quality and repetition rules
  (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
  Gopher", appendix A.1.1, the MassiveText filters).
* ``c4``: the C4 cleaning rules (Raffel et al. 2020, section 2.2, as implemented by the
  ``c4`` dataset builder's ``clean_page`` and bad-words filter), deciding on whole documents.
* ``fineweb_quality``: FineWeb's custom filters (Penedo et al. 2024, "The FineWeb
  Datasets", section 3.3; datatrove's ``FineWebQualityFilter``).
* ``word_list``: a toxicity filter that drops documents containing listed words.

The rules are pure Python (``re``, ``str`` methods) over whitespace tokens: a *token* is a
run of non-whitespace characters; a *word* is a token with punctuation stripped from both
ends (``"end."`` -> ``"end"``), tokens of punctuation alone are not words. No model, no
language-specific tokenizer: the thresholds were tuned on English web text.

Model-based filters (a toxicity or quality classifier) are a plugin slot, not built in: see
``WordListFilter``'s docstring for the interface.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, count
from operator import ne
from pathlib import Path
from typing import Any

from recipe_engine import DocumentFilter, Problems, RecipeError

# Stripped from the ends of a token to make a word (ASCII punctuation and symbols, and the
# common Unicode quotes, dashes, ellipsis, bullets and CJK punctuation).
_EDGE = (string.punctuation + "“”‘’«»‹›„‚…—–‐‑‒―·•‣◦▪●¡¿、。，．！？：；（）［］｛｝【】《》〈〉「」『』")
_BULLETS = ("-", "*", "•", "‣", "◦", "▪", "●", "–")
_ELLIPSES = ("...", "…")


def _words(text: str) -> list[str]:
    """Whitespace tokens with punctuation stripped from their ends; empty ones left out."""
    return [w for t in text.split() if (w := t.strip(_EDGE))]


def _nonblank_lines(text: str) -> list[str]:
    """The lines of ``text`` with surrounding whitespace stripped, blank ones left out."""
    return [s for line in text.split("\n") if (s := line.strip())]


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number, characters) of the items equal to an earlier item."""
    seen: set[str] = set()
    num = chars = 0
    for x in items:
        if x in seen:
            num += 1
            chars += len(x)
        else:
            seen.add(x)
    return num, chars


def _fraction(problems: Problems, key: str, value: float) -> None:
    problems.require(0.0 <= value <= 1.0, key, f"{value} is not a fraction in [0, 1]")


def _at_least(problems: Problems, key: str, value: float, low: float = 0) -> None:
    problems.require(value >= low, key, f"{value} is below {low}")


# --------------------------------------------------------------------------------------
# Gopher


@dataclass(kw_only=True)
class GopherQualityFilter(DocumentFilter,
                          name="gopher_quality",
                          description="Gopher's quality rules: word counts and lengths, "
                                      "symbols, bullets, ellipses, stop words"):
    """Gopher's quality filter (Rae et al. 2021, appendix A.1.1; MassiveText), with its
    published defaults. Rules, in the order they are checked, and their drop reasons:

    * fewer than ``min_words`` / more than ``max_words`` words: ``gopher_short_document``,
      ``gopher_long_document``;
    * mean word length below ``min_mean_word_length`` / above ``max_mean_word_length``
      characters: ``gopher_short_words``, ``gopher_long_words``;
    * ``#`` characters per word above ``max_symbol_word_ratio``: ``gopher_hash_ratio``;
      ellipses (``...`` or ``…``) per word above it: ``gopher_ellipsis_ratio``;
    * more than ``max_bullet_lines_fraction`` of the non-blank lines start with a bullet
      (``- * • ‣ ◦ ▪ ● –``): ``gopher_bullet_lines``;
    * more than ``max_ellipsis_lines_fraction`` of them end with an ellipsis:
      ``gopher_ellipsis_lines``;
    * fewer than ``min_alpha_words_fraction`` of the tokens contain a letter:
      ``gopher_non_alpha_words``;
    * fewer than ``min_stop_words`` occurrences of ``stop_words`` (case-insensitive):
      ``gopher_few_stop_words``.
    """

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_fraction: float = 0.9
    max_ellipsis_lines_fraction: float = 0.3
    min_alpha_words_fraction: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = field(default_factory=lambda: [
        "the", "be", "to", "of", "and", "that", "have", "with"])

    def __post_init__(self) -> None:
        super().__post_init__()
        self._stop = frozenset(w.lower() for w in self.stop_words)

    def check(self, problems: Problems) -> None:
        _at_least(problems, "min_words", self.min_words)
        problems.require(self.min_words <= self.max_words, "min_words",
                         f"{self.min_words} exceeds max_words={self.max_words}")
        _at_least(problems, "min_mean_word_length", self.min_mean_word_length)
        problems.require(self.min_mean_word_length <= self.max_mean_word_length,
                         "min_mean_word_length", f"{self.min_mean_word_length} exceeds "
                         f"max_mean_word_length={self.max_mean_word_length}")
        _at_least(problems, "max_symbol_word_ratio", self.max_symbol_word_ratio)
        _fraction(problems, "max_bullet_lines_fraction", self.max_bullet_lines_fraction)
        _fraction(problems, "max_ellipsis_lines_fraction", self.max_ellipsis_lines_fraction)
        _fraction(problems, "min_alpha_words_fraction", self.min_alpha_words_fraction)
        _at_least(problems, "min_stop_words", self.min_stop_words)
        problems.require(bool(self.stop_words) or self.min_stop_words == 0, "stop_words",
                         "is empty while min_stop_words > 0: give words or set min_stop_words: 0")

    def reason(self, doc: dict[str, Any]) -> str | None:
        text: str = doc["text"]
        tokens = text.split()
        words = [w for t in tokens if (w := t.strip(_EDGE))]
        n = len(words)
        if n < self.min_words:
            return "gopher_short_document"
        if n > self.max_words:
            return "gopher_long_document"
        if n:
            mean = sum(map(len, words)) / n
            if mean < self.min_mean_word_length:
                return "gopher_short_words"
            if mean > self.max_mean_word_length:
                return "gopher_long_words"
        per_word = max(n, 1)
        if text.count("#") / per_word > self.max_symbol_word_ratio:
            return "gopher_hash_ratio"
        if (text.count("...") + text.count("…")) / per_word > self.max_symbol_word_ratio:
            return "gopher_ellipsis_ratio"
        lines = _nonblank_lines(text)
        if lines:
            if sum(s.startswith(_BULLETS) for s in lines) / len(lines) \
                    > self.max_bullet_lines_fraction:
                return "gopher_bullet_lines"
            if sum(s.endswith(_ELLIPSES) for s in lines) / len(lines) \
                    > self.max_ellipsis_lines_fraction:
                return "gopher_ellipsis_lines"
        if tokens and sum(any(c.isalpha() for c in t) for t in tokens) / len(tokens) \
                < self.min_alpha_words_fraction:
            return "gopher_non_alpha_words"
        if self.min_stop_words:
            stop = self._stop
            if sum(w.lower() in stop for w in words) < self.min_stop_words:
                return "gopher_few_stop_words"
        return None


_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _check_ngram_pairs(problems: Problems, key: str, pairs: list[list[float]]) -> None:
    for pair in pairs:
        if (len(pair) != 2 or pair[0] != int(pair[0]) or pair[0] < 1
                or not 0.0 <= pair[1] <= 1.0):
            problems.add(key, f"{pair!r} is not a pair [n, fraction] with n >= 1 and "
                              f"0 <= fraction <= 1")


@dataclass(kw_only=True)
class GopherRepetitionFilter(DocumentFilter,
                             name="gopher_repetition",
                             description="Gopher's repetition rules: duplicate lines, "
                                         "paragraphs and n-grams"):
    """Gopher's repetition filter (Rae et al. 2021, appendix A.1.1, table A1; MassiveText),
    with its published defaults. Rules, in the order they are checked, and their reasons:

    * lines (non-blank, stripped) equal to an earlier line: more than
      ``max_duplicate_line_fraction`` of the lines (``gopher_duplicate_lines``) or more than
      ``max_duplicate_line_char_fraction`` of their characters
      (``gopher_duplicate_line_chars``);
    * the same for paragraphs (separated by blank lines): ``gopher_duplicate_paragraphs``,
      ``gopher_duplicate_paragraph_chars``;
    * for each ``[n, fraction]`` of ``top_ngrams``: the most frequent word n-gram, if it
      occurs more than once, covers more than ``fraction`` of the word characters
      (its length in characters times its count): ``gopher_top_<n>gram``;
    * for each ``[n, fraction]`` of ``duplicate_ngrams``: the words inside repeated
      occurrences of n-grams (every occurrence after the first, each word counted once)
      hold more than ``fraction`` of the word characters: ``gopher_duplicate_<n>grams``.

    Words are counted without the spaces between them; case is kept (as datatrove does).
    """

    max_duplicate_line_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_paragraph_char_fraction: float = 0.2
    top_ngrams: list[list[float]] = field(default_factory=lambda: [
        [2, 0.2], [3, 0.18], [4, 0.16]])
    duplicate_ngrams: list[list[float]] = field(default_factory=lambda: [
        [5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]])

    def __post_init__(self) -> None:
        super().__post_init__()
        self._top = [(int(n), float(f)) for n, f in self.top_ngrams]
        self._dup = [(int(n), float(f)) for n, f in self.duplicate_ngrams]

    def check(self, problems: Problems) -> None:
        for key in ("max_duplicate_line_fraction", "max_duplicate_line_char_fraction",
                    "max_duplicate_paragraph_fraction", "max_duplicate_paragraph_char_fraction"):
            _fraction(problems, key, getattr(self, key))
        _check_ngram_pairs(problems, "top_ngrams", self.top_ngrams)
        _check_ngram_pairs(problems, "duplicate_ngrams", self.duplicate_ngrams)

    def reason(self, doc: dict[str, Any]) -> str | None:
        text: str = doc["text"]
        lines = _nonblank_lines(text)
        if lines:
            num, chars = _duplicates(lines)
            if num / len(lines) > self.max_duplicate_line_fraction:
                return "gopher_duplicate_lines"
            if chars / sum(map(len, lines)) > self.max_duplicate_line_char_fraction:
                return "gopher_duplicate_line_chars"
        paragraphs = [s for p in _PARAGRAPH_BREAK.split(text) if (s := p.strip())]
        if paragraphs:
            num, chars = _duplicates(paragraphs)
            if num / len(paragraphs) > self.max_duplicate_paragraph_fraction:
                return "gopher_duplicate_paragraphs"
            if chars / sum(map(len, paragraphs)) > self.max_duplicate_paragraph_char_fraction:
                return "gopher_duplicate_paragraph_chars"
        words = _words(text)
        total = sum(map(len, words))
        if not total:
            return None
        ids: dict[str, int] = {}
        seq = [ids.setdefault(w, len(ids)) for w in words]  # n-grams as tuples of ints
        id_length = [len(w) for w in ids]
        for n, limit in self._top:
            counts = Counter(zip(*(seq[i:] for i in range(n))))
            if not counts:
                continue
            gram, count = counts.most_common(1)[0]
            if count > 1 and sum(id_length[i] for i in gram) * count / total > limit:
                return f"gopher_top_{n}gram"
        lengths = [id_length[i] for i in seq]
        for n, limit in sorted(self._dup):
            chars = _duplicate_ngram_chars(seq, lengths, n)
            if chars / total > limit:
                return f"gopher_duplicate_{n}grams"
            if not chars:  # no repeated n-gram: no repeated longer one either
                break
        return None


def _duplicate_ngram_chars(seq: list[int], lengths: list[int], n: int) -> int:
    """Characters of the words covered by an n-gram equal to an earlier one (each word once)."""
    grams = list(zip(*(seq[j:] for j in range(n))))
    if len(set(grams)) == len(grams):
        return 0
    first = dict(zip(reversed(grams), range(len(grams) - 1, -1, -1)))  # gram -> first index
    repeats = compress(count(), map(ne, map(first.__getitem__, grams), count()))
    chars = covered_to = 0  # words before covered_to are already counted
    for i in repeats:
        chars += sum(lengths[max(i, covered_to):i + n])
        covered_to = i + n
    return chars


# --------------------------------------------------------------------------------------
# C4

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_C4_END_MARKS = (".", "?", "!", '"')
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
           "use of cookies", "use cookies")
# a sentence ends in . ! ? (closing quotes or brackets may follow) before whitespace or the end
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]’”]*(?=\s|$)")
_C4_LINE_RULES = ("long_word", "no_terminal_punctuation", "too_few_words", "javascript",
                  "policy")


@dataclass(kw_only=True)
class C4QualityFilter(DocumentFilter,
                      name="c4",
                      description="C4's cleaning rules: terminal punctuation, javascript, "
                                  "lorem ipsum, curly braces, policy lines, bad words"):
    """C4's rules (Raffel et al. 2020, section 2.2; the ``c4`` builder's ``clean_page`` and
    bad-words filter), deciding on whole documents.

    C4 removes bad lines and keeps the rest of a page. A document filter decides keep or
    drop only and never rewrites the text, so this filter goes through the non-blank lines
    in C4's order and drops the document when C4 would have dropped the page:

    * C4's line rules remove (here: do not count) a line with a word longer than
      ``max_word_length``; then, after removing citation marks (``[1]``, ``[edit]``,
      ``[citation needed]``), a line not ending in ``. ? ! "`` or ending in ``...``; with
      fewer than ``min_words_per_line`` words; containing ``javascript``; containing a
      policy phrase (``terms of use``, ``privacy policy``, ``cookie policy``, ``uses
      cookies``, ``use of cookies``, ``use cookies``). Each can be switched off.
    * Whole-document rules, checked on the lines the line rules keep, in C4's order:
      ``lorem ipsum`` (``c4_lorem_ipsum``), a ``{`` (``c4_curly_brace``).
    * Fewer than ``min_sentences`` sentences in the kept lines drop the document; the reason
      names the line rule that removed the most lines (ties: in the order above):
      ``c4_long_word``, ``c4_no_terminal_punctuation``, ``c4_too_few_words``,
      ``c4_javascript``, ``c4_policy``, or ``c4_too_few_sentences`` when no line was removed.
      A sentence ends in ``.``, ``!`` or ``?`` (closing quotes or brackets may follow) before
      whitespace or the line's end — a regex, where C4 used NLTK's punkt.
    * With ``bad_words``, a listed word (whole word, case-insensitive) in the kept lines:
      ``c4_bad_words``. C4 used the LDNOOBW English list; by default this uses the small
      built-in list of ``word_list``, or ``bad_words_file`` (same formats as ``word_list``'s
      ``words_file``, the ``en`` list or a list for every language).

    A kept document is written unchanged, its removed lines included.
    """

    min_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    remove_citations: bool = True
    filter_no_terminal_punctuation: bool = True
    filter_javascript: bool = True
    filter_lorem_ipsum: bool = True
    filter_curly_brace: bool = True
    filter_policy: bool = True
    bad_words: bool = False
    bad_words_file: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._bad: _Matcher | None = None

    def check(self, problems: Problems) -> None:
        _at_least(problems, "min_sentences", self.min_sentences)
        _at_least(problems, "min_words_per_line", self.min_words_per_line)
        _at_least(problems, "max_word_length", self.max_word_length, 1)
        if self.bad_words_file:
            _check_words_file(problems, "bad_words_file", self.bad_words_file)
            if not self.bad_words:
                problems.add("bad_words_file", "is set but bad_words is false: set "
                                               "bad_words: true or remove bad_words_file")

    def reason(self, doc: dict[str, Any]) -> str | None:
        removed: Counter[str] = Counter()
        kept: list[str] = []
        sentences = 0
        for line in doc["text"].splitlines():
            line = line.strip()
            if not line:
                continue
            words = line.split()
            if any(len(w) > self.max_word_length for w in words):
                removed["long_word"] += 1
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punctuation and (
                    not line.endswith(_C4_END_MARKS) or line.endswith("...")):
                removed["no_terminal_punctuation"] += 1
                continue
            if len(line.split()) < self.min_words_per_line:
                removed["too_few_words"] += 1
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "c4_lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                removed["javascript"] += 1
                continue
            if self.filter_curly_brace and "{" in line:
                return "c4_curly_brace"
            if self.filter_policy and any(p in lower for p in _POLICY):
                removed["policy"] += 1
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
        if sentences < self.min_sentences:
            if not removed:
                return "c4_too_few_sentences"
            most = max(removed.values())
            return "c4_" + next(r for r in _C4_LINE_RULES if removed[r] == most)
        if self.bad_words:
            if self._bad is None:
                self._bad = _load_matcher(self.bad_words_file, "en")
            if self._bad.count(" ".join(kept))[0]:
                return "c4_bad_words"
        return None


# --------------------------------------------------------------------------------------
# FineWeb

# Characters that end a sentence in common scripts (a subset of Unicode's Sentence_Terminal).
_TERMINAL = tuple(".!?…。！？｡؟۔।॥።፧፨᙮᠃᠉‼‽⁇⁈⁉")


@dataclass(kw_only=True)
class FineWebQualityFilter(DocumentFilter,
                           name="fineweb_quality",
                           description="FineWeb's rules: line punctuation, short lines, "
                                       "duplicated line characters, list-like documents"):
    """FineWeb's custom quality filters (Penedo et al. 2024, section 3.3; datatrove's
    ``FineWebQualityFilter``), with the published thresholds. On the non-blank lines,
    stripped, in this order:

    * no non-blank line: ``fineweb_empty``;
    * fewer than ``min_line_punctuation_fraction`` of the lines end in terminal punctuation
      (``. ! ? …`` and their CJK, Arabic and Indic forms): ``fineweb_line_punctuation``;
    * more than ``max_short_line_fraction`` of the lines have at most ``short_line_length``
      characters: ``fineweb_short_lines``;
    * lines equal to an earlier line hold more than ``max_duplicate_line_char_fraction`` of
      the lines' characters: ``fineweb_duplicate_line_chars`` (the paper's 0.1; datatrove's
      code defaults to 0.01);
    * newlines per whitespace token above ``max_newline_word_ratio``: ``fineweb_list_ratio``
      (datatrove's list filter).
    """

    min_line_punctuation_fraction: float = 0.12
    max_short_line_fraction: float = 0.67
    short_line_length: int = 30
    max_duplicate_line_char_fraction: float = 0.1
    max_newline_word_ratio: float = 0.3

    def check(self, problems: Problems) -> None:
        _fraction(problems, "min_line_punctuation_fraction", self.min_line_punctuation_fraction)
        _fraction(problems, "max_short_line_fraction", self.max_short_line_fraction)
        _at_least(problems, "short_line_length", self.short_line_length)
        _fraction(problems, "max_duplicate_line_char_fraction",
                  self.max_duplicate_line_char_fraction)
        _at_least(problems, "max_newline_word_ratio", self.max_newline_word_ratio)

    def reason(self, doc: dict[str, Any]) -> str | None:
        text: str = doc["text"]
        lines = _nonblank_lines(text)
        if not lines:
            return "fineweb_empty"
        n = len(lines)
        if sum(s.endswith(_TERMINAL) for s in lines) / n < self.min_line_punctuation_fraction:
            return "fineweb_line_punctuation"
        if sum(len(s) <= self.short_line_length for s in lines) / n > self.max_short_line_fraction:
            return "fineweb_short_lines"
        if _duplicates(lines)[1] / sum(map(len, lines)) > self.max_duplicate_line_char_fraction:
            return "fineweb_duplicate_line_chars"
        if text.count("\n") / len(text.split()) > self.max_newline_word_ratio:
            return "fineweb_list_ratio"
        return None


# --------------------------------------------------------------------------------------
# Toxicity: word lists

WORDLISTS = Path(__file__).parent / "wordlists"
BUILTIN_WORDS = WORDLISTS / "toxic_words.json"
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits


def _entry_key(entry: str) -> str:
    """An entry as it is matched: its runs of letters and digits, lowercased, one space apart."""
    return " ".join(_TOKEN.findall(entry.lower()))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _Matcher:
    """Counts whole-word occurrences of a list's entries (plain or SHA-256 hashed keys)."""

    def __init__(self, entries: list[str], hashed: bool, max_words: int = 1) -> None:
        self.hashed = hashed
        if hashed:
            self.keys = frozenset(e.lower() for e in entries)
            self.sizes = list(range(1, max_words + 1))
        else:
            self.keys = frozenset(k for e in entries if (k := _entry_key(e)))
            self.sizes = sorted({k.count(" ") + 1 for k in self.keys})

    def count(self, text: str) -> tuple[int, int]:
        """(matches, tokens) in ``text``."""
        tokens = _TOKEN.findall(text.lower())
        matches = 0
        for n in self.sizes:
            grams = Counter(tokens) if n == 1 else Counter(
                " ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
            for gram, c in grams.items():
                if (_digest(gram) if self.hashed else gram) in self.keys:
                    matches += c
        return matches, len(tokens)


def _read_lists(path: Path) -> tuple[dict[str, list[str]], bool, int]:
    """A words file as (language -> entries, hashed, max_words); language ``*`` is every
    language. Formats: ``.txt`` (one entry a line, ``#`` comments), a JSON list, a JSON
    object ``{language: [entries]}`` or ``{"languages": {...}, "hash": "sha256",
    "max_words": n}``."""
    try:
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            return {"*": [s for line in raw.splitlines()
                          if (s := line.split("#", 1)[0].strip())]}, False, 1
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"word list {str(path)!r} cannot be read: {e}") from e
    if isinstance(data, list):
        return {"*": [str(x) for x in data]}, False, 1
    if isinstance(data, dict) and isinstance(data.get("languages"), dict):
        hashed = data.get("hash") == "sha256"
        return ({str(k).lower(): [str(x) for x in v] for k, v in data["languages"].items()},
                hashed, int(data.get("max_words", 1)))
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {str(k).lower(): [str(x) for x in v] for k, v in data.items()}, False, 1
    raise RecipeError(f"word list {str(path)!r}: expected a JSON list, {{language: [words]}} "
                      f"or {{\"languages\": {{...}}}}")


class _Lists:
    """The matchers of one words file, built per language on first use."""

    def __init__(self, path: Path) -> None:
        self.lists, self.hashed, self.max_words = _read_lists(path)
        self.matchers: dict[str, _Matcher | None] = {}

    def get(self, language: str) -> _Matcher | None:
        if language not in self.matchers:
            entries = self.lists.get(language, self.lists.get("*"))
            self.matchers[language] = (None if entries is None
                                       else _Matcher(entries, self.hashed, self.max_words))
        return self.matchers[language]


def _load_matcher(words_file: str, language: str) -> _Matcher:
    lists = _Lists(Path(words_file).expanduser() if words_file else BUILTIN_WORDS)
    return lists.get(language) or _Matcher([], False)


def _check_words_file(problems: Problems, key: str, path: str) -> None:
    problems.require(path.endswith((".json", ".txt")), key,
                     f"{path!r}: a word list is a .json or .txt file")


def _builtin_languages() -> set[str]:
    return set(json.loads(BUILTIN_WORDS.read_text(encoding="utf-8"))["languages"])


def _language_code(value: Any) -> str:
    """``"en"`` from ``"en"``, ``"EN-us"``, ``"__label__en"``, ``"en_Latn"``."""
    code = str(value).strip().lower().removeprefix("__label__")
    return re.split(r"[-_]", code, maxsplit=1)[0]


@dataclass(kw_only=True)
class WordListFilter(DocumentFilter,
                     name="word_list",
                     description="drop documents containing words of a per-language list "
                                 "(toxicity)"):
    """Toxicity by word list: drop a document when more than ``max_matches`` of its words
    are listed (``word_list_matches``), or when listed words are more than
    ``max_match_fraction`` of its words (``word_list_fraction``). An entry matches whole
    words, case-insensitively: its runs of letters and digits must appear consecutively in
    the text (``"f-word"`` matches ``f-word``, ``F word``, not ``f-words``).

    The list is chosen per document: ``language`` names it, or with ``language: auto`` the
    document's ``language`` field (written by a language-ID stage; ``en-US``,
    ``__label__en`` read as ``en``), else ``fallback_language``. A document whose language
    has no list (or, with an empty ``fallback_language``, that has no ``language`` field) is
    kept unchecked.

    The built-in list (``wordlists/toxic_words.json``) is deliberately small: English
    obscenities and slurs that are unambiguous as whole words, stored as SHA-256 digests of
    the normalised entry so the repository holds no plain slurs. Supply your own with
    ``words_file``: a ``.txt`` file (one entry a line, ``#`` comments; used for every
    language), a JSON list (every language), a JSON object ``{"en": [...], "de": [...]}``,
    or ``{"languages": {...}, "hash": "sha256", "max_words": 1}`` for hashed entries
    (``sha256`` of the entry's lowercased letter-and-digit runs joined by one space;
    ``max_words``: the longest entry in words).

    A model-based (classifier) filter plugs into the same slot. It is a ``DocumentFilter``
    subclass registered by a plugin's ``recipe_components`` hook, whose ``reason()`` scores
    ``doc["text"]`` and returns a reason above a threshold. It imports its framework inside
    ``reason()`` (modules defining components import no ML framework), loads the model
    once per process into a private attribute, and keeps that out of pickling (the
    ``filter`` stage sends filters to executor workers)::

        @dataclass(kw_only=True)
        class ToxicityClassifier(DocumentFilter, name="toxicity_classifier"):
            '''Drop documents a classifier scores as toxic.'''
            model: str = "path/to/model"
            threshold: float = 0.5

            def __post_init__(self):
                super().__post_init__()
                self._model = None

            def __getstate__(self):
                return {**self.__dict__, "_model": None}

            def reason(self, doc):
                if self._model is None:
                    from my_toxicity import load  # heavy import, at first use
                    self._model = load(self.model)
                return "toxic" if self._model.score(doc["text"]) > self.threshold else None
    """

    language: str = "auto"
    fallback_language: str = "en"
    words_file: str = ""
    max_matches: int = 0
    max_match_fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._lists: _Lists | None = None

    def check(self, problems: Problems) -> None:
        _at_least(problems, "max_matches", self.max_matches)
        _fraction(problems, "max_match_fraction", self.max_match_fraction)
        if self.words_file:
            _check_words_file(problems, "words_file", self.words_file)
            return
        known = _builtin_languages()
        for key in ("language", "fallback_language"):
            value = getattr(self, key)
            if value and value != "auto" and value.lower() not in known:
                problems.add(key, f"{value!r}: the built-in list has {sorted(known)}; "
                                  f"give your list with words_file")
        problems.require(self.fallback_language != "auto", "fallback_language",
                         "'auto' is not a language: name one, or '' to keep such documents")

    def reason(self, doc: dict[str, Any]) -> str | None:
        if self.language != "auto":
            language = self.language.lower()
        elif doc.get("language"):
            language = _language_code(doc["language"])
        elif self.fallback_language:
            language = self.fallback_language.lower()
        else:
            return None
        if self._lists is None:
            self._lists = _Lists(Path(self.words_file).expanduser() if self.words_file
                                 else BUILTIN_WORDS)
        matcher = self._lists.get(language)
        if matcher is None:
            return None
        matches, tokens = matcher.count(doc["text"])
        if matches > self.max_matches:
            return "word_list_matches"
        if tokens and matches / tokens > self.max_match_fraction:
            return "word_list_fraction"
        return None


COMPONENTS: list[type] = [GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter,
                          FineWebQualityFilter, WordListFilter]
