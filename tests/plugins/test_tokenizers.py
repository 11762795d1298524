"""sentencepiece_bpe, the runtime Tokenizer and mds_shards, on a tiny synthetic code corpus."""
import json
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from recipe_engine import RecipeError, StageError
from recipe_engine.artifacts import iter_documents, part_name, write_documents
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.executors import LocalExecutor, SerialExecutor
from recipe_engine_plugins.tokenizers.shards import MDSShards, split_value
from recipe_engine_plugins.tokenizers.spm import Tokenizer, escape, unescape
from recipe_engine_plugins.tokenizers.train import SentencePieceBPE, training_sentences

TRICKY = [
    "def f(x):\n\tif x:\n\t\treturn  x   \n\n\n    pass\n",
    "class A:\n    def g(self):  \n        return '日本語 😀🐍 café'\t# ünïcode\n",
    "windows\r\nline\rends\r\n",
    "  leading spaces",
    "trailing spaces   ",
    "\n\n\n",
    "\t\t\t",
    " ",
    "",
    "x = 1\n" * 3 + "        \n" + "\x00\x0b\x0c\x1f\x7f",
    "nbsp\u00a0ideo\u3000ls\u2028ps\u2029bom\ufeff",
    "visible space ▁ and ▁▁ pieces ▁",
    "private \ue000 use \ue000_ and \ue000\ue000▁ and end \ue000",
    "\ue000",
    "ε = λ ω: ω ** 2  # 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def _synthetic_doc(rng: random.Random, i: int) -> str:
    names = ["value", "items", "result", "count", "node", "path", "data", "self", "key", "buf"]
    lines = [f'"""Module {i}: generated for tests."""', "import os", "import sys", ""]
    for f in range(rng.randint(2, 5)):
        a, b = rng.sample(names, 2)
        lines.append(f"def func_{i}_{f}({a}, {b}=None):")
        lines.append(f'    """Return {a} combined with {b}."""')
        for _ in range(rng.randint(2, 6)):
            indent = "    " * rng.randint(1, 3)
            c = rng.choice(names)
            lines.append(rng.choice([
                f"{indent}if {a} is None:",
                f"{indent}{c} = {a} + {rng.randint(0, 999)}",
                f"{indent}for {c} in range(len({b})):",
                f"{indent}return {a}",
                f"{indent}print('héllo', {c!r}, sep='\\t')  # ünïcode ✓",
                f"{indent}\t{c}.append({b})",
            ]))
        lines.append("")
    return "\n".join(lines) + "\n"


def _corpus() -> list[dict]:
    rng = random.Random(0)
    docs = [{"id": f"syn-{i:03d}", "text": _synthetic_doc(rng, i), "source": "synthetic",
             "path": None} for i in range(90)]
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    for p in sorted(stdlib.glob("*.py")):
        docs.append({"id": f"stdlib/json/{p.name}", "text": p.read_text(encoding="utf-8"),
                     "source": "stdlib", "path": str(p)})
    docs.append({"id": "empty", "text": "", "source": "synthetic", "path": None})
    return docs


def _write_parts(directory: Path, docs: list[dict], num_parts: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(docs) // num_parts)
    for k in range(num_parts):
        write_documents(directory / part_name(k), docs[k * size : (k + 1) * size])
    return directory


def _documents(directory: Path, docs: list[dict], num_parts: int = 3):
    from recipe_engine import Artifact

    _write_parts(directory, docs, num_parts)
    return Artifact(kind="documents", path=directory, manifest={"meta": {}})


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def docs_artifact(tmp_path_factory, corpus):
    return _documents(tmp_path_factory.mktemp("docs"), corpus)


@pytest.fixture(scope="module")
def tokenizer_artifact(tmp_path_factory, docs_artifact):
    return run_stage(SentencePieceBPE(vocab_size=400, num_threads=1),
                     tmp_path_factory.mktemp("tok"), inputs={"documents": docs_artifact})


# -- registration ---------------------------------------------------------------------


def test_registered_and_light():
    reg = PluginManager().registry
    assert reg.get("stage", "sentencepiece_bpe").cls is SentencePieceBPE
    assert reg.get("stage", "mds_shards").cls is MDSShards
    code = ("import sys, recipe_engine_plugins.tokenizers; "
            "print([m for m in ('numpy', 'sentencepiece', 'streaming', 'torch') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_params_rejected():
    with pytest.raises(RecipeError, match="vocab_size"):
        SentencePieceBPE(vocab_size=100)
    with pytest.raises(RecipeError, match="val_fraction"):
        MDSShards(val_fraction=1.0)
    with pytest.raises(RecipeError, match="size_limit"):
        MDSShards(size_limit="lots")
    MDSShards(size_limit="1.5kb")
    MDSShards(size_limit=1 << 20)


# -- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_artifact(tokenizer_artifact):
    out = tokenizer_artifact.path
    for name in ("tokenizer.model", "tokenizer.vocab", "tokenizer.json"):
        assert (out / name).is_file()
    info = json.loads((out / "tokenizer.json").read_text())
    tok = Tokenizer.load(out)
    meta = tokenizer_artifact.meta
    assert meta["vocab_size"] == tok.vocab_size == info["vocab_size"] == 400
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len({tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id}) == 4
    assert "newline" in info and info["escape"] is True
    m = tokenizer_artifact.manifest["metrics"]
    assert 0 < m["training_bytes"] and m["heldout_bytes"] > 0 and m["bytes_per_token"] > 1.5
    counts = tokenizer_artifact.manifest["counts"]
    assert counts["skipped.empty_text"] == 1 and counts["heldout_documents"] >= 1


def test_round_trip_exact(tokenizer_artifact, corpus):
    tok = Tokenizer.load(tokenizer_artifact.path)
    for text in TRICKY + [d["text"] for d in corpus[:5]]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text, repr(text)
    batch = tok.encode_batch(TRICKY)
    assert batch == [tok.encode(t) for t in TRICKY]
    assert tok.decode(np.asarray(batch[0], dtype=np.uint16)) == TRICKY[0]
    assert tok.decode([tok.bos_id] + batch[0] + [tok.eos_id, tok.pad_id]) == TRICKY[0]


def test_code_whitespace_pieces(tokenizer_artifact):
    tok = Tokenizer.load(tokenizer_artifact.path)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert "▁▁▁▁" in pieces  # an indent level is one piece
    assert any("\n" in p for p in pieces)  # newlines merge like any other character


def test_escape_is_bijective():
    for text in TRICKY:
        assert "▁" not in escape(text)
        assert unescape(escape(text)) == text


def test_long_documents_cut_at_line_ends():
    text = "x = 1  # " + "é" * 30000 + "\n" + "y = 2\n" * 5000
    chunks = list(training_sentences([text, "short\n"], limit=4096))
    assert "".join(chunks[:-1]) == text and chunks[-1] == "short\n"
    assert max(len(c.encode()) for c in chunks) <= 4096
    assert all(c.endswith("\n") for c in chunks[-5:])


def test_training_sample_independent_of_parts(tmp_path, corpus, tokenizer_artifact):
    shuffled = corpus[:]
    random.Random(1).shuffle(shuffled)
    docs = _documents(tmp_path / "docs", shuffled, num_parts=5)
    art = run_stage(SentencePieceBPE(vocab_size=400, num_threads=1), tmp_path / "tok",
                    inputs={"documents": docs})
    assert (art.path / "tokenizer.model").read_bytes() == \
        (tokenizer_artifact.path / "tokenizer.model").read_bytes()
    assert art.manifest["metrics"]["training_bytes"] == \
        tokenizer_artifact.manifest["metrics"]["training_bytes"]


def test_unigram_and_byte_cap(tmp_path, docs_artifact):
    art = run_stage(SentencePieceBPE(vocab_size=420, model_type="unigram", num_threads=1,
                                     max_training_bytes=30_000),
                    tmp_path, inputs={"documents": docs_artifact})
    assert art.manifest["metrics"]["training_bytes"] <= 30_000
    tok = Tokenizer.load(art.path)
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text


# -- shards -----------------------------------------------------------------------------------


def _read_mds(directory: Path) -> list[np.ndarray]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(directory), remote=None, shuffle=False, batch_size=1)
    try:
        return [np.asarray(ds[i]["tokens"]) for i in range(ds.num_samples)]
    finally:
        del ds
        clean_stale_shared_memory()


def _expected_packing(tok: Tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    flat = [t for text in texts for t in [tok.bos_id, *tok.encode(text), tok.eos_id]]
    n = len(flat) // seq_len * seq_len
    return np.asarray(flat[:n]).reshape(-1, seq_len)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, docs_artifact, tokenizer_artifact):
    return run_stage(MDSShards(seq_len=64, val_fraction=0.1, size_limit="16kb"),
                     tmp_path_factory.mktemp("shards"),
                     inputs={"documents": docs_artifact, "tokenizer": tokenizer_artifact})


def test_shards_packing(shards, corpus, tokenizer_artifact):
    tok = Tokenizer.load(tokenizer_artifact.path)
    meta = shards.meta
    val_ids = {d["id"] for d in iter_documents(shards.path / "val_documents")}
    assert val_ids and meta["num_val_documents"] == len(val_ids)
    nonempty = [d for d in corpus if d["text"]]
    train = [d for d in nonempty if d["id"] not in val_ids]
    val = [d for d in nonempty if d["id"] in val_ids]
    assert meta["num_train_documents"] == len(train)
    assert meta["train_bytes"] == sum(len(d["text"].encode()) for d in train)
    assert shards.manifest["counts"]["skipped.empty_text"] == 1

    samples = _read_mds(shards.path / "train")
    assert len(samples) == meta["num_train_samples"] > 0
    assert meta["num_train_tokens"] == 64 * len(samples)
    assert all(s.shape == (64,) and s.dtype == np.uint16 for s in samples)
    assert max(int(s.max()) for s in samples) < meta["vocab_size"]
    expected = _expected_packing(tok, [d["text"] for d in train], 64)
    np.testing.assert_array_equal(np.stack(samples), expected)
    assert len(list((shards.path / "train").glob("shard.*.mds.zstd"))) > 1  # size_limit honoured

    val_samples = _read_mds(shards.path / "val")
    assert len(val_samples) == meta["num_val_samples"]
    expected_val = _expected_packing(tok, [d["text"] for d in val], 64)
    assert len(expected_val) > 0
    np.testing.assert_array_equal(np.stack(val_samples), expected_val)
    # validation documents keep every field, in document order
    assert [d for d in iter_documents(shards.path / "val_documents")] == val

    for key in ("seq_len", "vocab_size", "bos_id", "eos_id", "pad_id", "dtype"):
        assert key in meta
    assert meta["vocab_size"] == tokenizer_artifact.meta["vocab_size"]
    assert meta["dtype"] == "uint16" and meta["seq_len"] == 64


def test_split_rule(shards, corpus):
    val_ids = {d["id"] for d in iter_documents(shards.path / "val_documents")}
    for d in corpus:
        if d["text"]:
            assert (d["id"] in val_ids) == (split_value(0, d["id"]) < 0.1)


def test_split_deterministic_across_executors(tmp_path, corpus, tokenizer_artifact, shards):
    shuffled = list(reversed(corpus))
    docs = _documents(tmp_path / "docs", shuffled, num_parts=4)
    art = run_stage(MDSShards(seq_len=64, val_fraction=0.1, size_limit="16kb"), tmp_path / "s",
                    inputs={"documents": docs, "tokenizer": tokenizer_artifact},
                    executor=LocalExecutor(num_workers=2))
    ids = lambda a: sorted(d["id"] for d in iter_documents(a.path / "val_documents"))  # noqa: E731
    assert ids(art) == ids(shards)
    for key in ("num_train_documents", "num_val_documents", "train_bytes", "val_bytes"):
        assert art.meta[key] == shards.meta[key]
    # same order of documents, serial vs process pool: identical shards
    again = run_stage(MDSShards(seq_len=64, val_fraction=0.1, size_limit="16kb"), tmp_path / "t",
                      inputs={"documents": docs, "tokenizer": tokenizer_artifact},
                      executor=SerialExecutor())
    np.testing.assert_array_equal(np.stack(_read_mds(art.path / "train")),
                                  np.stack(_read_mds(again.path / "train")))
    assert art.meta == again.meta


def test_max_val_documents(tmp_path, docs_artifact, tokenizer_artifact, corpus):
    art = run_stage(MDSShards(seq_len=32, val_fraction=0.5, max_val_documents=3), tmp_path,
                    inputs={"documents": docs_artifact, "tokenizer": tokenizer_artifact})
    got = sorted(d["id"] for d in iter_documents(art.path / "val_documents"))
    smallest = sorted((split_value(0, d["id"]), d["id"]) for d in corpus if d["text"])[:3]
    assert got == sorted(i for _, i in smallest)
    assert art.meta["num_train_documents"] == len([d for d in corpus if d["text"]]) - 3


def test_resume_reuses_tokenized_parts(tmp_path, docs_artifact, tokenizer_artifact):
    stage = MDSShards(seq_len=64, val_fraction=0.1)
    inputs = {"documents": docs_artifact, "tokenizer": tokenizer_artifact}
    first = run_stage(stage, tmp_path, inputs=inputs)
    meta = dict(first.meta)
    assert list((tmp_path / "work" / "tokens").glob("part-*.json"))
    second = run_stage(stage, tmp_path, inputs=inputs)  # same scratch: parts are not redone
    assert second.meta == meta


def test_not_enough_data(tmp_path, tokenizer_artifact):
    docs = _documents(tmp_path / "docs", [{"id": "a", "text": "x = 1\n", "source": "t",
                                           "path": None}], num_parts=1)
    with pytest.raises(StageError, match="not enough data"):
        run_stage(MDSShards(seq_len=512, val_fraction=0.0), tmp_path / "s",
                  inputs={"documents": docs, "tokenizer": tokenizer_artifact})


# -- declared special tokens, digit splitting, unigram end to end -------------------------------

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>",
           "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
CHAT = [
    "<|im_start|>user\nfix\tthis<|im_end|>\n<|im_start|>assistant\n    return x<|im_end|>",
    "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>y = x * 2",
    "<|system|><|user|><|assistant|>", "<|im_start|><|im_start|>", "<|im_start", "<|im_end|x",
    "<s> </s> <pad> <unk> are text", "x = 1234567 + 0.5e10  # 😀",
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def special_artifact(request, tmp_path_factory, docs_artifact):
    return run_stage(SentencePieceBPE(vocab_size=500, model_type=request.param, num_threads=1,
                                      special_tokens=SPECIAL, split_digits=True),
                     tmp_path_factory.mktemp(f"special-{request.param}"),
                     inputs={"documents": docs_artifact})


def test_special_tokens_are_single_ids(special_artifact):
    tok = Tokenizer.load(special_artifact.path)
    info = json.loads((special_artifact.path / "tokenizer.json").read_text())
    assert info["special_tokens"] == special_artifact.meta["special_tokens"] == \
        tok.special_tokens == {t: 4 + i for i, t in enumerate(SPECIAL)}
    assert info["split_digits"] is True and tok.vocab_size == 500
    for token, i in tok.special_tokens.items():
        assert tok.encode(token) == [i] and tok.decode([i]) == token
    ids = tok.encode(CHAT[0])
    assert ids.count(tok.special_tokens["<|im_start|>"]) == 2
    assert ids.count(tok.special_tokens["<|im_end|>"]) == 2
    assert not set(tok.encode("<|im_start")) & set(tok.special_tokens.values())  # no partial
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(tok.encode(CHAT[6]))  # text, not ids
    for text in TRICKY + CHAT:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_split_digits(special_artifact, tokenizer_artifact):
    split = Tokenizer.load(special_artifact.path)
    pieces = [split.sp.id_to_piece(i) for i in split.encode("x = 1234567")]
    assert pieces[-7:] == list("1234567")
    vocab = [split.sp.id_to_piece(i) for i in range(split.vocab_size) if not split.sp.is_byte(i)]
    assert not any(sum(c in "0123456789" for c in p) > 1 for p in vocab)  # no multi-digit piece
    default = json.loads((tokenizer_artifact.path / "tokenizer.json").read_text())
    assert "split_digits" not in default and "special_tokens" not in default  # as before


def test_bad_special_tokens_rejected():
    for bad in (["<s>"], ["<|a|>", "<|a|>"], ["two words"], [""], ["<0x41>"]):
        with pytest.raises(RecipeError, match="special_tokens"):
            SentencePieceBPE(special_tokens=bad)
    with pytest.raises(RecipeError, match="vocab_size"):
        SentencePieceBPE(vocab_size=265, special_tokens=SPECIAL)


def test_shards_with_special_tokens_bpe_and_unigram(tmp_path, docs_artifact, special_artifact):
    """A unigram tokenizer, or one with special tokens, drives mds_shards like the default."""
    art = run_stage(MDSShards(seq_len=64, val_fraction=0.1), tmp_path,
                    inputs={"documents": docs_artifact, "tokenizer": special_artifact})
    tok = Tokenizer.load(special_artifact.path)
    assert (art.meta["vocab_size"], art.meta["bos_id"], art.meta["eos_id"]) == \
        (tok.vocab_size, tok.bos_id, tok.eos_id)
    val_ids = {d["id"] for d in iter_documents(art.path / "val_documents")}
    train = [d["text"] for d in iter_documents(docs_artifact.path)
             if d["text"] and d["id"] not in val_ids]
    np.testing.assert_array_equal(np.stack(_read_mds(art.path / "train")),
                                  _expected_packing(tok, train, 64))


# -- the report ----------------------------------------------------------------------------


def test_report_in_manifest(tmp_path):
    prose = {"en": "The quick brown fox jumps over the lazy dog. " * 20,
             "fr": "Le vif renard brun saute par-dessus le chien paresseux. " * 20,
             "ja": "速い茶色の狐がのろまな犬を飛び越える。" * 20}
    docs = []
    for i in range(120):
        lang = list(prose)[i % 3]
        docs.append({"id": f"web/{i}", "text": f"{i}: " + prose[lang], "language": lang,
                     "path": None})  # no source field: the id prefix names the source
        docs.append({"id": f"code-{i}", "text": _synthetic_doc(random.Random(i), i),
                     "source": "code", "path": None})
    art = run_stage(SentencePieceBPE(vocab_size=400, num_threads=1, character_coverage=0.99),
                    tmp_path / "tok", inputs={"documents": _documents(tmp_path / "d", docs)})
    report = art.meta["report"]
    assert report["measured_on"] == "heldout"
    assert report["documents"] == art.manifest["counts"]["heldout_documents"] >= 4
    assert set(report["by_source"]) == {"web", "code"}
    assert set(report["by_language"]) <= {"en", "fr", "ja"} and report["by_language"]
    assert sum(g["documents"] for g in report["by_source"].values()) == report["documents"]
    assert sum(g["documents"] for g in report["by_language"].values()) == \
        report["by_source"]["web"]["documents"]
    for group in [report, *report["by_source"].values(), *report["by_language"].values()]:
        assert group["bytes_per_token"] == round(group["bytes"] / group["tokens"], 4)
        assert group["words_per_token"] == round(group["words"] / group["tokens"], 4)
    # some characters are rarer than character_coverage keeps: they fall back to bytes
    assert 0 < report["byte_fallback_rate"] < 1
    assert 0 < report["vocab_used_fraction"] <= 1
    m = art.manifest["metrics"]
    for key in ("bytes_per_token", "words_per_token", "byte_fallback_rate",
                "vocab_used_fraction"):
        assert m[key] == report[key]


# -- bounded memory of the sample ---------------------------------------------------------------


def test_sample_heap_is_bounded_and_exact():
    """The streamed heaps keep every row the selection takes (the same selection as sorting
    all rows), while holding about budget / document size rows, not one per document."""
    from recipe_engine_plugins.tokenizers import sampling

    def select(rows, total, max_training):
        rows = sorted(rows)
        target = min(sampling.HELDOUT_BYTES, sampling.HELDOUT_FRACTION * total)
        acc = i = 0
        while i < len(rows) - 1 and acc < target:
            acc += rows[i][3]
            i += 1
        taken, acc = rows[:i], 0
        for row in rows[i:]:
            if acc >= max_training:
                break
            taken.append(row)
            acc += row[3]
        return taken

    rng = random.Random(0)
    for trial in range(20):
        max_training = rng.choice([1, 5_000, 50_000, 400_000])
        parts = [[(rng.getrandbits(64), p, line, rng.choice([1, 50, 900, 30_000, 2_000_000]))
                  for line in range(rng.randint(0, 3000))] for p in range(rng.randint(1, 4))]
        everything = [r for part in parts for r in part]
        total = sum(r[3] for r in everything)
        budget = max_training + sampling.HELDOUT_BYTES
        merged = sampling.KeyHeap(budget)
        for part in parts:
            heap = sampling.KeyHeap(budget)
            for row in part:
                heap.push(row)
            merged.merge(heap.rows(), heap.max_size)
        assert select(merged.rows(), total, max_training) == \
            select(everything, total, max_training), trial
    many = sampling.KeyHeap(10_000)
    for line in range(200_000):
        many.push((rng.getrandbits(64), 0, line, 100))
    assert len(many) <= 10_000 // 100 + 2


def test_hf_export_tokenizer_gives_our_ids(tmp_path, special_artifact):
    """The exported fast tokenizer (AutoTokenizer) gives our ids, special tokens included,
    for BPE and unigram. Unigram: runs of one repeated character can tie exactly between
    orders of the same pieces (SentencePiece breaks the tie in float32 sums); there the
    pieces are the same, in an order that may differ."""
    from transformers import AutoTokenizer

    from recipe_engine_plugins.export.hf import hf_tokenizer

    tok = Tokenizer.load(special_artifact.path)
    hf_tokenizer(special_artifact.path, 64).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
    for text in TRICKY + CHAT:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf(text)["input_ids"] == [tok.bos_id, *ids]
        assert hf.decode(ids) == text
    for token, i in tok.special_tokens.items():
        assert hf.convert_tokens_to_ids(token) == i
    run = " " * 33 + "x" + "\t" * 21
    ids = hf.encode(run, add_special_tokens=False)
    if special_artifact.meta["model_type"] == "bpe":
        assert ids == tok.encode(run)
    assert sorted(ids) == sorted(tok.encode(run)) and hf.decode(ids) == run


# -- held-out documents and several inputs ----------------------------------------------------

def test_marked_heldout_documents_are_never_trained_on(tmp_path, corpus):
    """A marked evaluation document holding a word found nowhere else: the tokenizer learns
    no piece of it, reports on the marked documents, and counts them as excluded."""
    rare = "zqxjvkwzqxjvkw"
    marked = [{"id": f"eval-{i}", "text": (f"{rare} " * 200 + "\n") * 5, "source": "eval",
               "path": None, "split": "heldout"} for i in range(3)]
    docs = _documents(tmp_path / "docs", corpus + marked)
    art = run_stage(SentencePieceBPE(vocab_size=400, num_threads=1), tmp_path / "tok",
                    inputs={"documents": docs})
    tok = Tokenizer.load(art.path)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert not any("zqx" in p or "jvk" in p or "kwz" in p for p in pieces)
    counts = art.manifest["counts"]
    assert counts["excluded_heldout"] == 3
    assert counts["heldout_documents"] == 3  # the report's documents are the marked ones
    assert counts["training_documents"] == len([d for d in corpus if d["text"]])
    report = art.manifest["meta"]["report"]
    assert report["measured_on"] == "evaluation" and list(report["by_source"]) == ["eval"]
    # the unmarked corpus alone trains the same model: marked documents change nothing
    alone = run_stage(SentencePieceBPE(vocab_size=400, num_threads=1), tmp_path / "tok2",
                      inputs={"documents": _documents(tmp_path / "docs2", corpus + [
                          {**marked[0], "id": "x", "text": "def f(): pass\n" * 3}])})
    assert (alone.path / "tokenizer.model").read_bytes() == (art.path / "tokenizer.model").read_bytes()


def test_several_documents_inputs_are_one_corpus(tmp_path, corpus, tokenizer_artifact):
    """Split across two artifacts (two data streams), the corpus trains the same tokenizer."""
    first = _documents(tmp_path / "a", corpus[:40], num_parts=2)
    second = _documents(tmp_path / "b", corpus[40:], num_parts=2)
    art = run_stage(SentencePieceBPE(vocab_size=400, num_threads=1), tmp_path / "tok",
                    inputs={"documents": [first, second]})
    assert (art.path / "tokenizer.model").read_bytes() == \
        (tokenizer_artifact.path / "tokenizer.model").read_bytes()
    assert art.manifest["counts"]["documents"] == len(corpus)
