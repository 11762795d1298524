"""The artifact contract: the public readers and writers of ``recipe_engine.artifacts`` on
real (tiny) artifacts from the built-in producers, compared with the libraries they stand in
for; the docs' snippets; and the rule that plugins exchange artifacts through the core only."""
import ast
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

from recipe_engine import Artifact
from recipe_engine.artifacts import (ARTIFACT_KINDS, Tokenizer, checkpoint_weights_path,
                                     iter_documents, iter_mds_samples, iter_token_sequences,
                                     list_parts, load_tokenizer, part_name, read_documents,
                                     read_eval_report, read_manifest, read_model_spec,
                                     read_shards_info, write_documents, write_model_spec)
from recipe_engine.fsutil import atomic_write_bytes, atomic_write_json, atomic_writer
from recipe_engine.testing import run_stage

TRICKY = [
    "def f(x):\n\tif x:\n\t\treturn  x   \n\n\n    pass\n",
    "windows\r\nline\rends\r\n",
    "日本語 😀🐍 café ünïcode",
    "visible space ▁ and ▁▁ and private \ue000 use \ue000_ \ue000",
    "",
    " ",
]


def _corpus(n: int = 40) -> list[dict]:
    rng = random.Random(0)
    names = ["value", "items", "result", "count", "node", "path"]
    docs = []
    for i in range(n):
        lines = [f"def func_{i}({rng.choice(names)}):"]
        for _ in range(rng.randint(3, 12)):
            lines.append("    " * rng.randint(1, 3) + rng.choice([
                f"{rng.choice(names)} = {rng.randint(0, 999)}", "return None",
                f"print('héllo', {rng.choice(names)})  # ✓", "pass"]))
        docs.append({"id": f"doc-{i:03d}", "text": "\n".join(lines) + "\n",
                     "source": "synthetic", "path": None})
    return docs


# -- fixtures: tiny real artifacts from the built-in producers ------------------------------


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    directory = tmp_path_factory.mktemp("docs")
    docs = _corpus()
    write_documents(directory / part_name(0), docs[:25])
    write_documents(directory / part_name(1), docs[25:])
    return Artifact(kind="documents", path=directory, manifest={"meta": {}})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, documents):
    pytest.importorskip("sentencepiece")
    from recipe_engine_plugins.tokenizers.train import SentencePieceBPE

    return run_stage(SentencePieceBPE(vocab_size=300, num_threads=1),
                     tmp_path_factory.mktemp("tok"), inputs={"documents": documents})


@pytest.fixture(scope="module")
def shards(tmp_path_factory, documents, tokenizer):
    pytest.importorskip("streaming")
    from recipe_engine_plugins.tokenizers.shards import MDSShards

    return run_stage(MDSShards(seq_len=32, val_fraction=0.2, size_limit="4kb"),
                     tmp_path_factory.mktemp("shards"),
                     inputs={"documents": documents, "tokenizer": tokenizer})


def _streaming_samples(split_dir: Path, tmp_path: Path) -> list[dict]:
    """What mosaicml-streaming itself reads (on a copy: it decompresses shards in place)."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    copy = tmp_path / f"copy-{split_dir.name}"
    shutil.copytree(split_dir, copy)
    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(copy), remote=None, shuffle=False, batch_size=1)
    try:
        return [ds[i] for i in range(ds.num_samples)]
    finally:
        del ds
        clean_stale_shared_memory()


# -- the module itself ------------------------------------------------------------------------


def test_importing_artifacts_is_light():
    code = ("import recipe_engine.artifacts, sys; "
            "print([m for m in ('torch', 'streaming', 'numpy', 'sentencepiece') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_every_builtin_kind_is_documented():
    import recipe_engine.artifacts as artifacts

    doc = artifacts.__doc__
    text = (ROOT / "docs" / "artifacts.md").read_text()
    for kind in ARTIFACT_KINDS:
        assert f"``{kind}``:" in doc, kind
        assert f"\n## {kind}\n" in text, kind


# -- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})
    assert json.loads(target.read_text()) == {"step": 1}
    with pytest.raises(RuntimeError):
        with atomic_writer(target, "w") as f:
            f.write('{"step": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"step": 1}  # the old version, intact
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp files left


# -- documents --------------------------------------------------------------------------------


def test_documents_round_trip(tmp_path):
    docs = _corpus(5) + [{"id": "odd", "text": "lone \udc80 surrogate", "source": "s",
                          "path": "/x", "extra": [1, 2]}]
    assert write_documents(tmp_path / part_name(0), docs[:3]) == 3
    assert write_documents(tmp_path / part_name(1), docs[3:]) == 3
    assert [p.name for p in list_parts(tmp_path)] == [part_name(0), part_name(1)]
    assert list(iter_documents(tmp_path)) == docs
    assert list(read_documents(tmp_path / part_name(1))) == docs[3:]

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    data = (tmp_path / part_name(0)).read_bytes()
    (damaged / part_name(0)).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_documents(damaged))


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_round_trip(tokenizer):
    tok = load_tokenizer(tokenizer.path)
    assert isinstance(tok, Tokenizer) and tok.info["format"] == "sentencepiece"
    meta = tokenizer.meta
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (
        meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["unk_id"])
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids) and tok.bos_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    ids = tok.encode(TRICKY[0])
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == TRICKY[0]
    np = pytest.importorskip("numpy")
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == TRICKY[0]


def test_tokenizer_unknown_format_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"format": "no-such-format"}')
    with pytest.raises(ValueError, match="no-such-format.*import the plugin"):
        load_tokenizer(tmp_path)


# -- shards -----------------------------------------------------------------------------------


def test_shards_reader_equals_streaming(shards, tmp_path):
    np = pytest.importorskip("numpy")
    meta = shards.meta
    assert len(list((shards.path / "train").glob("shard.*.mds.zstd"))) > 1
    for split in ("train", "val"):
        ours = list(iter_token_sequences(shards.path, split=split))
        theirs = [s["tokens"] for s in _streaming_samples(shards.path / split, tmp_path)]
        assert len(ours) == len(theirs) == meta[f"num_{split}_samples"] > 0
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype == np.dtype(meta["dtype"]) and a.shape == (32,)
            np.testing.assert_array_equal(a, b)


def test_shards_info_and_decoding(shards, tokenizer):
    info = read_shards_info(shards.path)
    assert info["seq_len"] == 32 and info["vocab_size"] == tokenizer.meta["vocab_size"]
    train = info["splits"]["train"]
    assert train["num_samples"] == info["num_train_samples"] and train["num_shards"] > 1
    assert train["columns"] == {"tokens": "ndarray:uint16"}
    assert train["compression"].startswith("zstd")
    tok = load_tokenizer(tokenizer.path)
    first = next(iter_token_sequences(shards.path))
    assert int(first[0]) == tok.bos_id  # the first document starts the first sequence
    val_text = {d["text"] for d in iter_documents(shards.path / "val_documents")}
    stream = tok.decode([int(t) for s in iter_token_sequences(shards.path, "val") for t in s])
    assert any(text[:40] in stream for text in val_text)


@pytest.mark.parametrize("compression", [None, "zstd:7", "gz"])
def test_mds_reader_decodes_every_column_encoding(tmp_path, compression):
    np = pytest.importorskip("numpy")
    pytest.importorskip("streaming")
    from streaming import MDSWriter

    columns = {"tokens": "ndarray:int32", "any": "ndarray", "fixed": "ndarray:float32:2,3",
               "n": "int", "s": "str", "b": "bytes", "j": "json", "u": "uint16",
               "f": "float64", "si": "str_int"}
    rng = np.random.default_rng(0)
    written = []
    with MDSWriter(out=str(tmp_path / "ds"), columns=columns, compression=compression,
                   size_limit=2048) as writer:
        for i in range(40):
            sample = {"tokens": rng.integers(0, 70000, 5 + i, dtype=np.int32),
                      "any": rng.random((2, 1 + i % 4)).astype(np.float16),
                      "fixed": rng.random((2, 3)).astype(np.float32),
                      "n": -i * 10**12, "s": f"sample ▁ {i}", "b": bytes([i]) * i,
                      "j": {"i": i, "l": [i, "x"]}, "u": i * 1000, "f": i / 3, "si": i}
            writer.write(sample)
            written.append(sample)
    ours = list(iter_mds_samples(tmp_path / "ds"))
    theirs = _streaming_samples(tmp_path / "ds", tmp_path)
    assert len(ours) == len(theirs) == len(written)
    for a, b, w in zip(ours, theirs, written):
        assert a.keys() == set(columns)
        for key in columns:
            if isinstance(w[key], np.ndarray):
                assert a[key].dtype == b[key].dtype == w[key].dtype
                np.testing.assert_array_equal(a[key], b[key])
                np.testing.assert_array_equal(a[key], w[key])
            else:
                assert a[key] == b[key] == w[key], key


def test_mds_reader_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MDS index"):
        list(iter_token_sequences(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.json").write_text('{"version": 1, "shards": []}')
    with pytest.raises(ValueError, match="version 1"):
        list(iter_token_sequences(tmp_path))


# -- checkpoint, eval report ------------------------------------------------------------------


def test_model_spec_round_trip(tmp_path):
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "tie_embeddings": True}
    write_model_spec(tmp_path, "llama", params, vocab_size=300, max_seq_len=32)
    assert read_model_spec(tmp_path) == {"name": "llama", "params": params,
                                         "vocab_size": 300, "max_seq_len": 32}
    with pytest.raises(FileNotFoundError, match="no weights"):
        checkpoint_weights_path(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert checkpoint_weights_path(tmp_path) == tmp_path / "model.safetensors"
    (tmp_path / "model.json").write_text('{"name": "llama"}')
    with pytest.raises(ValueError, match="missing"):
        read_model_spec(tmp_path)


def test_eval_report(tmp_path):
    metrics = {"bits_per_byte": 1.5, "loss": 2.0}
    (tmp_path / "report.json").write_text(json.dumps({"metrics": metrics, "documents": []}))
    assert read_eval_report(tmp_path)["metrics"] == metrics  # no manifest: the file's metrics
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "eval_report",
                                                        "meta": {"bits_per_byte": 1.25}}))
    report = read_eval_report(tmp_path)
    assert report["metrics"] == {"bits_per_byte": 1.25} and report["report"]["documents"] == []
    assert read_manifest(tmp_path)["kind"] == "eval_report"
    assert read_manifest(tmp_path / "nowhere") == {}


# -- docs/artifacts.md runs -------------------------------------------------------------------


def test_docs_snippets_run(tmp_path, documents, tokenizer, shards):
    pytest.importorskip("torch")
    from recipe_engine.plugins import PluginManager
    from recipe_engine_plugins.models import Llama, save_model

    registry = PluginManager().registry
    config = Llama(dim=32, n_layers=1, n_heads=2, multiple_of=32)
    vocab, seq_len = tokenizer.meta["vocab_size"], shards.meta["seq_len"]
    checkpoint = tmp_path / "ckpt"
    save_model(config.build(vocab, seq_len), config, vocab, seq_len, checkpoint)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "report.json").write_text(json.dumps(
        {"metrics": {"bits_per_byte": 3.0}, "documents": [{"id": "a"}]}))
    export = tmp_path / "export"
    (export / "recipe_engine").mkdir(parents=True)
    shutil.copy2(checkpoint / "model.json", export / "recipe_engine")
    for f in tokenizer.path.glob("tokenizer.*"):
        shutil.copy2(f, export / "recipe_engine")
    (tmp_path / "out").mkdir()

    ns = {"documents_dir": documents.path, "tokenizer_dir": tokenizer.path,
          "shards_dir": shards.path, "checkpoint_dir": checkpoint, "eval_dir": evaluation,
          "export_dir": export, "out_dir": tmp_path / "out",
          "ctx": SimpleNamespace(build=registry.build)}
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "artifacts.md").read_text(),
                        re.S)
    assert len(blocks) >= 7
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/artifacts.md[python block {i}]", "exec"), ns)
    assert ns["module"].args.vocab_size == vocab


# -- plugins exchange artifacts through the core, not through each other ----------------------

# (importing package, imported module): documented exceptions; none today.
ALLOWED_CROSS_PLUGIN_IMPORTS: set[tuple[str, str]] = set()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Absolute module names ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(ROOT / "plugins").with_suffix("").parts
    module = ["recipe_engine_plugins", *parts]
    if module[-1] == "__init__":
        module.pop()
    else:
        module[-1:] = []  # the package the module is in
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module[: len(module) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name == "recipe_engine_plugins":  # from recipe_engine_plugins import models
                found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, name))
    return found


def test_plugins_import_no_other_plugin():
    problems = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        rel = path.relative_to(ROOT / "plugins")
        package = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, name in _imports(path):
            target = name.split(".")
            if target[0] != "recipe_engine_plugins" or len(target) < 2:
                continue
            if target[1] == package:
                continue
            if (package, name) in ALLOWED_CROSS_PLUGIN_IMPORTS:
                continue
            problems.append(f"plugins/{rel}:{line} imports {name}")
    assert not problems, ("built-in plugins exchange artifacts through recipe_engine.artifacts, "
                          "not through each other's modules:\n" + "\n".join(problems))


# the core's public surface for plugins: the package itself and these modules
PUBLIC_CORE = {"recipe_engine", "recipe_engine.artifacts", "recipe_engine.fsutil",
               "recipe_engine.testing", "recipe_engine.tokenizer"}


def test_plugins_import_only_the_public_core_api():
    problems = []
    for path in sorted([*(ROOT / "plugins").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.split(".")[0] == "recipe_engine" and name not in PUBLIC_CORE:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not problems, "plugins use the public core API only:\n" + "\n".join(problems)
