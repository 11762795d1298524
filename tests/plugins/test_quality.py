"""The quality and toxicity document filters (gopher_quality, gopher_repetition, c4,
fineweb_quality, word_list) and the StarCoder rules of code_quality.

Every rule has a hand-made document that trips it and only it: the filter drops it with
that rule's reason, and the same filter with only that rule switched off keeps it.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import pickle
import re
import sysconfig
from collections import Counter
from itertools import product

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import iter_documents, write_documents
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data import CodeQualityFilter, FilterStage
from recipe_engine_plugins.data.quality import (C4QualityFilter, FineWebQualityFilter,
                                                GopherQualityFilter, GopherRepetitionFilter,
                                                WordListFilter)
from recipe_engine_plugins.data import quality
from recipe_engine_plugins.data.source import list_files

GOOD_LINES = [
    "The history of the river valley begins with the farmers who settled along its banks.",
    "They cleared the forest, built small houses of stone, and planted wheat in the fields.",
    "Over the centuries their villages grew into market towns that traded wool and timber.",
    "A railway arrived in the nineteenth century and brought new industries to the region.",
    "Today the valley is known for its orchards, its quiet walking trails and old churches.",
    "Visitors come in spring to see the blossom and in autumn to taste the local cider.",
    "Many families have lived here for generations and take pride in their traditions.",
]
GOOD = "\n".join(GOOD_LINES) + "\n"
PROSE_FILTERS = [GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter,
                 FineWebQualityFilter, WordListFilter]


def pseudo_words(n: int, offset: int = 0) -> list[str]:
    """``n`` distinct made-up words of 7 letters (``offset`` starts a disjoint set)."""
    syllables = ["".join(p) for p in product("bdfgklmnprstvz", "aeiou")]
    words = ("".join(p) + "n" for p in product(syllables, repeat=3))
    return [w for _, w in zip(range(offset + n), words)][offset:]


def repeated(n: int, times: int, total_words: int) -> str:
    """One line of ``total_words`` distinct 7-letter words in which one n-gram occurs
    ``times`` times, each occurrence between distinct words."""
    gram = pseudo_words(n, offset=100_000)
    pad = pseudo_words(total_words - n * times)
    assert len(pad) >= times + 1
    per = len(pad) // (times + 1)
    out: list[str] = []
    for i in range(times):
        out += pad[i * per:(i + 1) * per] + gram
    return " ".join(out + pad[times * per:]) + "\n"


@pytest.mark.parametrize("cls", PROSE_FILTERS)
def test_good_prose_passes_every_filter(cls):
    assert cls().reason({"text": GOOD}) is None
    assert cls().reason({"text": GOOD, "language": "en"}) is None


SEPARATOR = "-" * 60
CASES = [  # (filter, params, text, reason, params that switch only that rule off)
    # ---- gopher_quality
    (GopherQualityFilter, {}, "\n".join(GOOD_LINES[:2]), "gopher_short_document",
     {"min_words": 0}),
    (GopherQualityFilter, {}, GOOD * 1000, "gopher_long_document", {"max_words": 10**6}),
    (GopherQualityFilter, {}, "I am at the zoo and we see a big cat and an ox.\n" * 5,
     "gopher_short_words", {"min_mean_word_length": 0}),
    (GopherQualityFilter, {}, "The extraordinarily sophisticated telecommunications "
     "infrastructure and unquestionably revolutionary characteristics.\n" * 8,
     "gopher_long_words", {"max_mean_word_length": 100}),
    (GopherQualityFilter, {}, GOOD + "#" * 20 + "\n", "gopher_hash_ratio",
     {"max_symbol_word_ratio": 1.0}),
    (GopherQualityFilter, {}, GOOD + "Then " + "… " * 13 + "it ended.\n", "gopher_ellipsis_ratio",
     {"max_symbol_word_ratio": 1.0}),
    (GopherQualityFilter, {},
     "".join(f"- item {w} of the list and to be kept\n" for w in pseudo_words(10)),
     "gopher_bullet_lines", {"max_bullet_lines_fraction": 1.0}),
    (GopherQualityFilter, {},
     "\n".join(line[:-1] + "..." if i < 4 else line for i, line in enumerate(GOOD_LINES)),
     "gopher_ellipsis_lines", {"max_ellipsis_lines_fraction": 1.0}),
    (GopherQualityFilter, {}, GOOD + " ".join(str(2000 + i) for i in range(40)) + "\n",
     "gopher_non_alpha_words", {"min_alpha_words_fraction": 0.0}),
    (GopherQualityFilter, {}, "Quick brown foxes jump over lazy dogs near green hills. " * 7,
     "gopher_few_stop_words", {"min_stop_words": 0}),
    # ---- gopher_repetition
    (GopherRepetitionFilter, {},
     "\n".join(sum(([" ".join(pseudo_words(6, 6 * i))] + ["see above"] * (i >= 4)
                    for i in range(10)), [])),
     "gopher_duplicate_lines", {"max_duplicate_line_fraction": 1.0}),
    (GopherRepetitionFilter, {},
     "\n".join([" ".join(pseudo_words(3, 3 * i)) for i in range(6)] + [SEPARATOR] * 2),
     "gopher_duplicate_line_chars", {"max_duplicate_line_char_fraction": 1.0}),
    (GopherRepetitionFilter, {},
     "\n\n".join(sum(([f"{a}\n{b}\n{c}", "* * *"] for a, b, c in
                      zip(*[iter(pseudo_words(9))] * 3)), [])),
     "gopher_duplicate_paragraphs", {"max_duplicate_paragraph_fraction": 1.0}),
    (GopherRepetitionFilter, {},
     "\n\n".join([" ".join(pseudo_words(10, 10 * i)) for i in range(4)]
                 + ["!\n" + " " * 200 + "@"] * 2),
     "gopher_duplicate_paragraph_chars", {"max_duplicate_paragraph_char_fraction": 1.0}),
    (GopherRepetitionFilter, {}, repeated(2, 10, 31), "gopher_top_2gram", {"top_ngrams": []}),
    (GopherRepetitionFilter, {}, repeated(3, 10, 130), "gopher_top_3gram",
     {"top_ngrams": [[2, 0.2], [3, 1.0], [4, 0.16]]}),
    (GopherRepetitionFilter, {}, repeated(4, 10, 200), "gopher_top_4gram",
     {"top_ngrams": [[2, 0.2], [3, 0.18], [4, 1.0]]}),
    *[(GopherRepetitionFilter, {}, repeated(n, times, total), f"gopher_duplicate_{n}grams",
       {"duplicate_ngrams": [[m, 1.0 if m == n else f] for m, f in
                             zip(range(5, 11), [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])]})
      for n, times, total in [(5, 6, 161), (6, 3, 83), (7, 2, 52), (8, 2, 64), (9, 2, 78),
                              (10, 2, 95)]],
    # ---- c4
    (C4QualityFilter, {}, GOOD + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n",
     "c4_lorem_ipsum", {"filter_lorem_ipsum": False}),
    (C4QualityFilter, {}, GOOD + "The function returns {a: 1} when it succeeds.\n",
     "c4_curly_brace", {"filter_curly_brace": False}),
    (C4QualityFilter, {}, "\n".join(GOOD_LINES[:4] + ["Please enable JavaScript to view it."] * 3),
     "c4_javascript", {"filter_javascript": False}),
    (C4QualityFilter, {}, "\n".join(GOOD_LINES[:4] + ["Read our privacy policy first.",
                                                      "This site uses cookies, as all do."]),
     "c4_policy", {"filter_policy": False}),
    (C4QualityFilter, {}, "\n".join(GOOD_LINES[:4] + ["Home page of the village museum",
                                                      "Opening hours and prices"]),
     "c4_no_terminal_punctuation", {"filter_no_terminal_punctuation": False}),
    (C4QualityFilter, {}, "\n".join(GOOD_LINES[:4] + ["Welcome home.", "Thank you!"]),
     "c4_too_few_words", {"min_words_per_line": 0}),
    (C4QualityFilter, {}, "\n".join(GOOD_LINES[:4] + ["x" * 1001 + " is long."] * 2),
     "c4_long_word", {"max_word_length": 10**6}),
    (C4QualityFilter, {}, "\n\n".join(GOOD_LINES[:3]), "c4_too_few_sentences",
     {"min_sentences": 0}),
    (C4QualityFilter, {"bad_words": True},
     GOOD + f"What the {codecs.decode('shpx', 'rot13')} is this.\n", "c4_bad_words",
     {"bad_words": False}),
    # ---- fineweb_quality
    (FineWebQualityFilter, {}, "".join(" ".join(pseudo_words(5, 5 * i)) + "\n" for i in range(10)),
     "fineweb_line_punctuation", {"min_line_punctuation_fraction": 0.0}),
    (FineWebQualityFilter, {}, GOOD + "".join(f"See {w}.\n" for w in pseudo_words(20)),
     "fineweb_short_lines", {"max_short_line_fraction": 1.0}),
    (FineWebQualityFilter, {}, GOOD + GOOD_LINES[0] + "\n", "fineweb_duplicate_line_chars",
     {"max_duplicate_line_char_fraction": 1.0}),
    (FineWebQualityFilter, {},
     "".join(f"Extraordinarily comprehensive {w}documentation.\n" for w in pseudo_words(10)),
     "fineweb_list_ratio", {"max_newline_word_ratio": 10.0}),
    # ---- word_list (the built-in English list; the word is spelt in rot13 here)
    (WordListFilter, {}, GOOD + f"What the {codecs.decode('shpx', 'rot13')}.\n",
     "word_list_matches", {"max_matches": 1}),
    (WordListFilter, {"max_matches": 100, "max_match_fraction": 0.01},
     GOOD + f"{codecs.decode('Fuvg', 'rot13')}, " * 3 + "\n", "word_list_fraction",
     {"max_match_fraction": 1.0}),
    # ---- code_quality: StarCoder2's encoded data, and numeric tables
    (CodeQualityFilter, {}, 'BLOB = """\n' + ("QUJDRA" * 12 + "\n") * 20 + '"""\n'
     + "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(60)), "encoded_run",
     {"max_encoded_run": 0}),
    (CodeQualityFilter, {}, "key = '" + "QUJDRA" * 12 + "'\nx = 1\n", "encoded_fraction",
     {"max_encoded_fraction": 1.0}),
    (CodeQualityFilter, {}, "table = [\n" + "    1.25, 2.5, 3.75, 10, 20,\n" * 20 + "]\n",
     "numeric_data", {"max_numeric_fraction": 1.0}),
]


@pytest.mark.parametrize("cls, params, text, reason, off", CASES,
                         ids=[f"{c[0].name}-{c[3]}" for c in CASES])
def test_each_rule_trips_alone(cls, params, text, reason, off):
    assert cls(**params).reason({"text": text}) == reason
    assert cls(**{**params, **off}).reason({"text": text}) is None, \
        f"with {off}, another rule than {reason} drops the document"


def test_every_reason_is_documented():
    """Each reason a case trips is named in its filter's section of docs/components.md."""
    doc = (ROOT / "docs" / "components.md").read_text(encoding="utf-8")
    for cls in {c[0] for c in CASES}:
        section = doc.split(f"### `{cls.name}` (document_filter)\n", 1)[1].split("\n### ", 1)[0]
        for reason in {c[3] for c in CASES if c[0] is cls}:
            generic = re.sub(r"_(\d+)gram", "_<n>gram", reason)
            assert f"`{reason}`" in section or f"`{generic}`" in section, \
                f"{cls.name}: reason {reason!r} is not documented"
    assert FineWebQualityFilter().reason({"text": " \n\t\n"}) == "fineweb_empty"


def test_every_reason_in_the_code_has_a_case():
    source = (ROOT / "plugins" / "data" / "quality.py").read_text(encoding="utf-8")
    in_code = set(re.findall(r'return f?"((?:gopher|c4|fineweb|word_list)_[a-z_{}]+)"', source))
    in_code |= {"c4_" + rule for rule in quality._C4_LINE_RULES}
    tested = {re.sub(r"_(\d+)gram", "_{n}gram", c[3]) for c in CASES} | {"fineweb_empty"}
    assert in_code <= tested, f"reasons without a case: {sorted(in_code - tested)}"
    assert len(in_code) > 25


def test_gopher_details():
    f = GopherQualityFilter()
    # words are tokens with punctuation stripped; tokens of punctuation alone do not count
    text = "Word, " * 49 + "-- -- -- --"
    assert f.reason({"text": text}) == "gopher_short_document"
    # stop words count occurrences, case-insensitively
    few = GopherQualityFilter(min_words=0, min_stop_words=2)
    assert few.reason({"text": "The cat sat."}) == "gopher_few_stop_words"
    assert few.reason({"text": "THE cattle rested on the meadow."}) is None
    # blank lines do not count as lines for the bullet rule
    bullets = "\n\n".join(f"- {w} of the list" for w in pseudo_words(60))
    assert f.reason({"text": bullets}) == "gopher_bullet_lines"


def test_gopher_repetition_counts_each_word_once():
    # "a b c d e" three times in a row: the ten words after the first occurrence lie in
    # repeated n-grams for n = 5..10 (overlapping n-grams add no character twice)
    f = GopherRepetitionFilter(top_ngrams=[], duplicate_ngrams=[[5, 0.0]])
    gram = pseudo_words(5, 1000)
    text = " ".join(pseudo_words(10) + gram * 3 + pseudo_words(10, 10))
    assert f.reason({"text": text}) == "gopher_duplicate_5grams"
    from recipe_engine_plugins.data.quality import _duplicate_ngram_chars
    ids = {w: i for i, w in enumerate(dict.fromkeys(text.split()))}
    seq = [ids[w] for w in text.split()]
    assert _duplicate_ngram_chars(seq, [7] * len(seq), 5) == 7 * 10
    assert _duplicate_ngram_chars(seq, [7] * len(seq), 10) == 7 * 10
    assert _duplicate_ngram_chars(seq, [7] * len(seq), 11) == 0
    # an n-gram that occurs once is never "top", however long
    assert GopherRepetitionFilter().reason({"text": "supercalifragilistic expialidocious"}) is None


def test_c4_keeps_text_and_checks_whole_document_rules_on_kept_lines():
    f = C4QualityFilter()
    doc = {"text": GOOD + "int main() { return 0; }\n"}  # no end mark: the line is removed
    assert f.reason(doc) is None and doc["text"].endswith("}\n")  # the text is not rewritten
    cited = "\n".join(line[:-1] + ".[12]" for line in GOOD_LINES)  # citations removed first
    assert f.reason({"text": cited}) is None
    assert C4QualityFilter(remove_citations=False).reason({"text": cited}) == \
        "c4_no_terminal_punctuation"
    # tie between rules: the first in C4's order names the drop
    tie = "\n".join(GOOD_LINES[:2] + ["Enable javascript to go on.", "No end mark here"])
    assert f.reason({"text": tie}) == "c4_no_terminal_punctuation"
    # several sentences on one line count
    many = " ".join(line for line in GOOD_LINES[:5])
    assert f.reason({"text": many}) is None


def test_c4_bad_words_from_a_file(tmp_path):
    words = tmp_path / "bad.txt"
    words.write_text("# my list\nzorblax\nflim flam\n", encoding="utf-8")
    f = C4QualityFilter(bad_words=True, bad_words_file=str(words))
    assert f.reason({"text": GOOD}) is None
    assert f.reason({"text": GOOD + "The zorblax came back again.\n"}) == "c4_bad_words"
    assert f.reason({"text": GOOD + "A Flim-Flam man came back.\n"}) == "c4_bad_words"
    assert f.reason({"text": GOOD + "The zorblaxes came back again.\n"}) is None
    # only kept lines are checked: a bad word on a removed line does not drop
    assert f.reason({"text": GOOD + "zorblax\n"}) is None


def test_word_list_languages_and_formats(tmp_path):
    listed = codecs.decode("shpx", "rot13")
    text = f"{GOOD}What the {listed.upper()}?\n"
    auto = WordListFilter()
    assert auto.reason({"text": text}) == "word_list_matches"  # no language: fallback en
    assert auto.reason({"text": text, "language": "en-US"}) == "word_list_matches"
    assert auto.reason({"text": text, "language": "__label__en"}) == "word_list_matches"
    assert auto.reason({"text": text, "language": "de"}) is None  # no German list
    assert WordListFilter(fallback_language="").reason({"text": text}) is None
    assert WordListFilter(language="en").reason({"text": text, "language": "de"}) == \
        "word_list_matches"
    assert auto.reason({"text": GOOD + f"{listed}ed{listed}\n"}) is None  # whole words only

    per_language = tmp_path / "words.json"
    per_language.write_text(json.dumps({"de": ["Mist"], "en": ["darn it"]}), encoding="utf-8")
    f = WordListFilter(words_file=str(per_language))
    assert f.reason({"text": "So ein MIST.", "language": "de"}) == "word_list_matches"
    assert f.reason({"text": "Darn it, again.", "language": "en"}) == "word_list_matches"
    assert f.reason({"text": "Darn the rain, it is late.", "language": "en"}) is None
    assert f.reason({"text": "Darn it.", "language": "fr"}) is None

    every = tmp_path / "words.txt"
    every.write_text("zorblax  # a comment\n\n", encoding="utf-8")
    assert WordListFilter(words_file=str(every)).reason(
        {"text": "A zorblax.", "language": "fr"}) == "word_list_matches"
    plain_list = tmp_path / "list.json"
    plain_list.write_text(json.dumps(["zorblax"]), encoding="utf-8")
    assert WordListFilter(words_file=str(plain_list)).reason({"text": "Zorblax!"}) == \
        "word_list_matches"

    hashed = tmp_path / "hashed.json"
    hashed.write_text(json.dumps({"hash": "sha256", "max_words": 2, "languages": {
        "en": [hashlib.sha256(b"flim flam").hexdigest()]}}), encoding="utf-8")
    assert WordListFilter(words_file=str(hashed)).reason({"text": "Flim-flam!"}) == \
        "word_list_matches"

    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(RecipeError, match="broken.json"):
        WordListFilter(words_file=str(broken)).reason({"text": GOOD})


def test_builtin_word_list_is_hashed_english():
    from recipe_engine_plugins.data.quality import BUILTIN_WORDS
    data = json.loads(BUILTIN_WORDS.read_text(encoding="utf-8"))
    assert data["hash"] == "sha256" and set(data["languages"]) == {"en"}
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in data["languages"]["en"])
    # common words that contain listed ones, or that lists often catch by mistake, pass
    harmless = "Scunthorpe class assessment cocktail shitake Dickens analysis hello"
    assert WordListFilter(max_match_fraction=0.0).reason({"text": harmless}) is None


CHECKS = [
    (GopherQualityFilter, {"min_words": 100, "max_words": 10}, "min_words"),
    (GopherQualityFilter, {"min_mean_word_length": 11}, "min_mean_word_length"),
    (GopherQualityFilter, {"max_bullet_lines_fraction": 1.5}, "max_bullet_lines_fraction"),
    (GopherQualityFilter, {"max_ellipsis_lines_fraction": -0.1}, "max_ellipsis_lines_fraction"),
    (GopherQualityFilter, {"min_alpha_words_fraction": 2.0}, "min_alpha_words_fraction"),
    (GopherQualityFilter, {"max_symbol_word_ratio": -1.0}, "max_symbol_word_ratio"),
    (GopherQualityFilter, {"min_stop_words": -1}, "min_stop_words"),
    (GopherQualityFilter, {"stop_words": []}, "stop_words"),
    (GopherRepetitionFilter, {"max_duplicate_line_fraction": 1.2}, "max_duplicate_line_fraction"),
    (GopherRepetitionFilter, {"max_duplicate_paragraph_char_fraction": -0.5},
     "max_duplicate_paragraph_char_fraction"),
    (GopherRepetitionFilter, {"top_ngrams": [[2, 1.5]]}, "top_ngrams"),
    (GopherRepetitionFilter, {"duplicate_ngrams": [[0, 0.1]]}, "duplicate_ngrams"),
    (GopherRepetitionFilter, {"duplicate_ngrams": [[5.5, 0.1]]}, "duplicate_ngrams"),
    (GopherRepetitionFilter, {"duplicate_ngrams": [[5]]}, "duplicate_ngrams"),
    (C4QualityFilter, {"min_sentences": -1}, "min_sentences"),
    (C4QualityFilter, {"max_word_length": 0}, "max_word_length"),
    (C4QualityFilter, {"bad_words_file": "words.json"}, "bad_words_file"),
    (C4QualityFilter, {"bad_words": True, "bad_words_file": "words.csv"}, "bad_words_file"),
    (FineWebQualityFilter, {"min_line_punctuation_fraction": 1.1},
     "min_line_punctuation_fraction"),
    (FineWebQualityFilter, {"max_short_line_fraction": -0.2}, "max_short_line_fraction"),
    (FineWebQualityFilter, {"max_duplicate_line_char_fraction": 3},
     "max_duplicate_line_char_fraction"),
    (FineWebQualityFilter, {"short_line_length": -1}, "short_line_length"),
    (FineWebQualityFilter, {"max_newline_word_ratio": -1}, "max_newline_word_ratio"),
    (WordListFilter, {"max_matches": -1}, "max_matches"),
    (WordListFilter, {"max_match_fraction": 1.5}, "max_match_fraction"),
    (WordListFilter, {"language": "xx"}, "language"),
    (WordListFilter, {"fallback_language": "auto"}, "fallback_language"),
    (WordListFilter, {"words_file": "words.csv"}, "words_file"),
    (CodeQualityFilter, {"max_encoded_fraction": 1.5}, "max_encoded_fraction"),
    (CodeQualityFilter, {"max_numeric_fraction": -0.1}, "max_numeric_fraction"),
    (CodeQualityFilter, {"max_encoded_run": -1}, "max_encoded_run"),
    (CodeQualityFilter, {"min_alnum_fraction": 1.1}, "min_alnum_fraction"),
]


@pytest.mark.parametrize("cls, params, key", CHECKS,
                         ids=[f"{c[0].name}-{c[2]}" for c in CHECKS])
def test_parameter_checks(cls, params, key):
    with pytest.raises(RecipeError) as err:
        cls(**params)
    assert [p.key for p in err.value.problems] == [key]


def test_a_language_with_a_user_list_is_not_checked_against_the_builtin_one():
    assert WordListFilter(language="de", words_file="my_words.json").language == "de"


def test_registered_and_run_by_the_filter_stage(tmp_path):
    reg = PluginManager().registry
    for cls in PROSE_FILTERS:
        assert isinstance(reg.build("document_filter", {"name": cls.name}), cls)
    inp = tmp_path / "in"
    inp.mkdir()
    texts = [GOOD, GOOD_LINES[0], GOOD + f"Oh {codecs.decode('shpx', 'rot13')}.\n", GOOD * 2]
    write_documents(inp / "part-00000.jsonl.zst",
                    [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    stage = FilterStage(filters=[{"name": "gopher_quality"}, {"name": "word_list"},
                                 {"name": "gopher_repetition"}, {"name": "c4"},
                                 {"name": "fineweb_quality"}])
    art = run_stage(stage, tmp_path / "run",
                    inputs={"documents": Artifact(kind="documents", path=inp, manifest={})})
    assert [d["id"] for d in iter_documents(art.path)] == ["d0"]
    c = art.manifest["counts"]
    assert c["gopher_quality.dropped.gopher_short_document"] == 1
    assert c["word_list.dropped.word_list_matches"] == 1
    assert c["gopher_repetition.dropped.gopher_duplicate_lines"] == 1
    for cls in PROSE_FILTERS:  # filters travel to executor workers, also after first use
        f = cls()
        f.reason({"text": GOOD})
        assert pickle.loads(pickle.dumps(f)).reason({"text": GOOD}) is None


@pytest.mark.slow
def test_code_quality_new_rules_keep_every_stdlib_file():
    """micro_code's corpus is unchanged: with the defaults, StarCoder2's encoded-data rules
    and the numeric rule drop none of the files conf/data/stdlib_code.yaml selects (they run
    after the old rules, so a file gets a new reason only if the old rules kept it)."""
    conf = OmegaConf.load(ROOT / "conf" / "data" / "stdlib_code.yaml")
    params = {k: v for k, v in OmegaConf.to_container(conf.quality).items() if k != "name"}
    f = CodeQualityFilter(**params)
    root = sysconfig.get_paths()["stdlib"]
    entries = list_files(root, list(conf.source.include), list(conf.source.exclude))
    assert len(entries) > 300
    reasons: Counter[str | None] = Counter()
    for e in entries:
        with open(os.path.join(root, e.rel), "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        reasons[f.reason({"text": text})] += 1
    new = {"encoded_run", "encoded_fraction", "numeric_data"}
    assert not new & set(reasons), reasons
