"""hf_byte_bpe (byte-level BPE with Hugging Face tokenizers): the artifact, its runtime found
by load_tokenizer in a fresh process, and the stages downstream (mds_shards, composer_train,
heldout_eval, lm_eval, hf_export) reading vocabulary size and special ids from it."""
import json
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import iter_documents, load_tokenizer, part_name, write_documents
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.tokenizers.hf_bpe import HFByteBPE, HFByteBPETokenizer

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>",
           "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
TRICKY = [
    "def f(x):\n\tif x:\n\t\treturn  x   \n\n\n    pass\n",
    "class A:\n    def g(self):  \n        return '日本語 😀🐍 café'\t# ünïcode\n",
    "windows\r\nline\rends\r\n", "  leading spaces", "trailing spaces   ", "\n\n\n", "\t\t\t",
    " ", "", " " * 33 + "x" + "\t" * 21, "x\x00\x0b\x0c\x1f\x7fz",
    "nbsp\u00a0ideo\u3000ls\u2028ps\u2029bom\ufeff", "visible space ▁ and \ue000 private",
    "ε = λ ω: ω ** 2  # 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧", "x = 1234567 + 0.5e10",
    "<|im_start|>user\nfix\tthis<|im_end|>\n<|im_start|>assistant\n    return x<|im_end|>",
    "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>y = x * 2",
    "<|im_start|><|im_start|>", "<|im_start", "<s> </s> <pad> <unk> are text",
]


def _corpus() -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [{"id": f"stdlib/{p.name}", "text": p.read_text(encoding="utf-8"), "source": "stdlib",
             "path": str(p)} for p in sorted((stdlib / "json").glob("*.py"))]
    rng = random.Random(0)
    words = ["value", "items", "result", "count", "node", "path", "data", "key", "café", "数据"]
    for i in range(80):
        lines = [f"def f{i}_{j}({rng.choice(words)}):\n    return {rng.randint(0, 99999)}\n"
                 for j in range(rng.randint(3, 12))]
        docs.append({"id": f"gen/{i}", "text": "".join(lines), "path": None,
                     "language": rng.choice(["en", "fr"])})
    docs.append({"id": "empty", "text": "", "source": "gen", "path": None})
    return docs


def _documents(directory: Path, docs: list[dict], num_parts: int = 3) -> Artifact:
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(docs) // num_parts)
    for k in range(num_parts):
        write_documents(directory / part_name(k), docs[k * size : (k + 1) * size])
    return Artifact(kind="documents", path=directory, manifest={"meta": {}})


@pytest.fixture(scope="module")
def docs_artifact(tmp_path_factory):
    return _documents(tmp_path_factory.mktemp("docs"), _corpus())


@pytest.fixture(scope="module")
def tokenizer_artifact(tmp_path_factory, docs_artifact):
    return run_stage(HFByteBPE(vocab_size=600, special_tokens=SPECIAL),
                     tmp_path_factory.mktemp("tok"), inputs={"documents": docs_artifact})


def test_registered_and_light():
    assert PluginManager().registry.get("stage", "hf_byte_bpe").cls is HFByteBPE
    code = ("import sys, recipe_engine_plugins.tokenizers; "
            "print([m for m in ('tokenizers', 'transformers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_params_rejected():
    with pytest.raises(RecipeError, match="vocab_size"):
        HFByteBPE(vocab_size=260)
    with pytest.raises(RecipeError, match="vocab_size"):
        HFByteBPE(vocab_size=265, special_tokens=SPECIAL)
    with pytest.raises(RecipeError, match="printable ASCII"):
        HFByteBPE(special_tokens=["<|é|>"])
    for bad in (["<s>"], ["<|a|>", "<|a|>"], ["a b"]):
        with pytest.raises(RecipeError, match="special_tokens"):
            HFByteBPE(special_tokens=bad)
    with pytest.raises(RecipeError, match="min_frequency"):
        HFByteBPE(min_frequency=0)


def test_artifact(tokenizer_artifact):
    out = tokenizer_artifact.path
    info = json.loads((out / "tokenizer.json").read_text())
    assert info["format"] == "hf_tokenizers" and (out / info["tokenizer_file"]).is_file()
    tok = load_tokenizer(out)
    assert isinstance(tok, HFByteBPETokenizer)
    meta = tokenizer_artifact.meta
    assert meta["vocab_size"] == info["vocab_size"] == tok.vocab_size == 600
    ids = (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id)
    assert ids == (0, 1, 2, 3) == tuple(meta[k] for k in ("unk_id", "bos_id", "eos_id", "pad_id"))
    assert info["special_tokens"] == meta["special_tokens"] == tok.special_tokens == \
        {t: 4 + i for i, t in enumerate(SPECIAL)}
    counts = tokenizer_artifact.manifest["counts"]
    assert counts["skipped.empty_text"] == 1 and counts["heldout_documents"] >= 1
    report = meta["report"]
    assert report["measured_on"] == "heldout" and report["bytes_per_token"] > 1.5
    assert set(report["by_source"]) <= {"stdlib", "gen"} and report["by_source"]
    assert set(report["by_language"]) <= {"en", "fr"}
    assert 0 <= report["byte_fallback_rate"] < 1 and 0 < report["vocab_used_fraction"] <= 1
    assert tokenizer_artifact.manifest["metrics"]["bytes_per_token"] == report["bytes_per_token"]


def test_round_trip_and_special_tokens(tokenizer_artifact):
    tok = load_tokenizer(tokenizer_artifact.path)
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)
        assert not {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id} & set(ids), repr(text)
    for token, i in tok.special_tokens.items():
        assert tok.encode(token) == [i] and tok.decode([i]) == token
    assert not set(tok.encode("<|im_start")) & set(tok.special_tokens.values())
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    assert tok.encode_batch(TRICKY, num_threads=1) == [tok.encode(t) for t in TRICKY]
    ids = tok.encode(TRICKY[0])
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == TRICKY[0]
    # byte pieces: a character the corpus lacks is encoded as its bytes
    assert set(tok.encode("\U0001F9EC")) <= tok.byte_ids() and len(tok.byte_ids()) == 128
    assert len(tok.encode(" " * 16)) < 4  # runs of spaces merge


def test_sample_independent_of_parts_and_deterministic(tmp_path, tokenizer_artifact):
    shuffled = _corpus()
    random.Random(1).shuffle(shuffled)
    art = run_stage(HFByteBPE(vocab_size=600, special_tokens=SPECIAL), tmp_path / "tok",
                    inputs={"documents": _documents(tmp_path / "docs", shuffled, 5)})
    for name in ("hf_tokenizer.json", "tokenizer.json"):
        assert (art.path / name).read_bytes() == (tokenizer_artifact.path / name).read_bytes()


def test_byte_cap_and_digits(tmp_path, docs_artifact):
    art = run_stage(HFByteBPE(vocab_size=600, max_training_bytes=20_000, split_digits=True),
                    tmp_path, inputs={"documents": docs_artifact})
    assert art.manifest["metrics"]["training_bytes"] <= 20_000
    tok = load_tokenizer(art.path)
    assert len(tok.encode("1234567")) == 7
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text


def test_load_tokenizer_in_a_fresh_process(tokenizer_artifact):
    """Only the core is imported; load_tokenizer finds the plugin's format by itself."""
    code = (
        "import json, sys\n"
        "from recipe_engine.artifacts import load_tokenizer\n"
        "assert not any(m.startswith('recipe_engine_plugins') for m in sys.modules)\n"
        f"tok = load_tokenizer({str(tokenizer_artifact.path)!r})\n"
        "print(json.dumps([type(tok).__name__, tok.vocab_size, tok.encode(sys.argv[1])]))\n")
    out = subprocess.run([sys.executable, "-c", code, TRICKY[1]], capture_output=True, text=True,
                         check=True)
    name, vocab, ids = json.loads(out.stdout)
    tok = load_tokenizer(tokenizer_artifact.path)
    assert (name, vocab, ids) == ("HFByteBPETokenizer", tok.vocab_size, tok.encode(TRICKY[1]))


def test_unknown_format_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"format": "nope"}')
    with pytest.raises(ValueError, match="'nope' is unknown.*hf_tokenizers.*install the plugin"):
        load_tokenizer(tmp_path)


def test_hf_export_tokenizer_gives_our_ids(tmp_path, tokenizer_artifact):
    from transformers import AutoTokenizer

    from recipe_engine_plugins.export.hf import hf_tokenizer

    tok = load_tokenizer(tokenizer_artifact.path)
    hf_tokenizer(tokenizer_artifact.path, 64).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id, len(hf)) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size)
    for text in TRICKY:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf(text)["input_ids"] == [tok.bos_id, *ids]
        assert hf.decode(ids) == text, repr(text)
        assert hf.decode([tok.bos_id, *ids, tok.eos_id], skip_special_tokens=True) == text
    for token, i in tok.special_tokens.items():
        assert hf.convert_tokens_to_ids(token) == i


@pytest.mark.slow
def test_pipeline_reads_vocab_and_ids_from_the_artifact(tmp_path, docs_artifact,
                                                         tokenizer_artifact):
    """mds_shards -> composer_train -> heldout_eval, lm_eval -> hf_export on an hf_byte_bpe
    tokenizer: nobody is told the vocabulary size or the special ids but the artifact."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from recipe_engine.component import instantiate
    from recipe_engine_plugins.evaluation import HeldoutEval, LmEval
    from recipe_engine_plugins.export import HFExport
    from recipe_engine_plugins.tokenizers.shards import MDSShards
    from recipe_engine_plugins.training import ComposerTrain

    tok = load_tokenizer(tokenizer_artifact.path)
    shards = run_stage(MDSShards(seq_len=32, val_fraction=0.1), tmp_path / "shards",
                       inputs={"documents": docs_artifact, "tokenizer": tokenizer_artifact})
    assert (shards.meta["vocab_size"], shards.meta["bos_id"], shards.meta["eos_id"],
            shards.meta["pad_id"]) == (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    first = next(iter_documents(shards.path / "val_documents"))
    assert first["text"]
    train = instantiate(ComposerTrain, {
        "model": {"name": "llama", "dim": 32, "n_layers": 1, "n_heads": 2, "multiple_of": 16},
        "optimizer": {"name": "adamw", "lr": 1e-2}, "global_batch_size": 4,
        "max_duration": "2ba", "device": "cpu", "log_interval": 1}, PluginManager().registry.build)
    ckpt = run_stage(train, tmp_path / "train", inputs={"shards": shards})
    assert ckpt.meta["vocab_size"] == tok.vocab_size
    inputs = {"checkpoint": ckpt, "tokenizer": tokenizer_artifact}
    heldout = run_stage(HeldoutEval(max_documents=3), tmp_path / "heldout",
                        inputs={**inputs, "shards": shards})
    assert heldout.manifest["metrics"]["bits_per_byte"] > 0
    lm = run_stage(LmEval(limit=4, bootstrap_iters=0), tmp_path / "lm_eval", inputs=inputs)
    assert "python_basics/acc" in lm.manifest["metrics"]
    export = run_stage(HFExport(), tmp_path / "export", inputs=inputs)
    out = export.path
    assert (out / "recipe_engine" / "hf_tokenizer.json").is_file()
    assert not (out / "tokenizer.model").exists()
    assert "byte-level BPE" in (out / "README.md").read_text()
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == \
        (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    hf = AutoTokenizer.from_pretrained(out)
    for text in TRICKY:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([hf(TRICKY[0])["input_ids"]])).logits
    assert logits.shape[-1] == tok.vocab_size
    assert load_tokenizer(out / "recipe_engine").encode(TRICKY[1]) == tok.encode(TRICKY[1])
