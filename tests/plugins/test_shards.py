"""mds_shards: held-out documents, document boundaries, shard hashes and the data digest,
byte-identical output whatever the workers, remote output (a local directory and a local S3
stand-in, moto's server). Real SentencePiece and Streaming on a tiny code corpus."""
import hashlib
import json
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from recipe_engine import Artifact, RecipeError, StageError
from recipe_engine.artifacts import (Tokenizer, data_digest, document_starts, iter_documents,
                                     iter_token_sequences, load_tokenizer, part_name,
                                     read_shards_info, write_documents)
from recipe_engine.testing import run_stage
from recipe_engine_plugins.executors import LocalExecutor, SerialExecutor
from recipe_engine_plugins.tokenizers.shards import SHARD_HASHES, MDSShards, split_value
from recipe_engine_plugins.tokenizers.train import SentencePieceBPE

SEQ_LEN = 64


def _code_doc(rng: random.Random, i: int) -> str:
    names = ["value", "items", "node", "path", "data", "key", "buf", "count"]
    lines = [f'"""Module {i}."""', "import os", ""]
    for f in range(rng.randint(2, 4)):
        a, b = rng.sample(names, 2)
        lines += [f"def func_{i}_{f}({a}, {b}=None):", f"    {a} = {b} or {rng.randint(0, 99)}",
                  f"    return {a}  # ünïcode ✓", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(1)
    docs = [{"id": f"syn-{i:03d}", "text": _code_doc(rng, i), "source": "synthetic",
             "path": None} for i in range(80)]
    docs += [{"id": f"short-{i:02d}", "text": f"x{i} = {i}\n", "source": "synthetic",
              "path": None} for i in range(30)]  # several documents in one sequence
    rng.shuffle(docs)
    for p in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        docs.append({"id": f"stdlib/json/{p.name}", "text": p.read_text(encoding="utf-8"),
                     "source": "stdlib", "path": str(p)})
    return docs


def _documents(directory: Path, docs: list[dict], num_parts: int = 3) -> Artifact:
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(docs) // num_parts)
    for k in range(num_parts):
        write_documents(directory / part_name(k), docs[k * size:(k + 1) * size])
    return Artifact(kind="documents", path=directory, manifest={"meta": {}})


@pytest.fixture(scope="module")
def docs_artifact(tmp_path_factory, corpus):
    return _documents(tmp_path_factory.mktemp("docs"), corpus)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, docs_artifact):
    return run_stage(SentencePieceBPE(vocab_size=400, num_threads=1),
                     tmp_path_factory.mktemp("tok"), inputs={"documents": docs_artifact})


@pytest.fixture(scope="module")
def shards(tmp_path_factory, docs_artifact, tokenizer):
    return run_stage(MDSShards(seq_len=SEQ_LEN, val_fraction=0.1, size_limit="8kb"),
                     tmp_path_factory.mktemp("shards"),
                     inputs={"documents": docs_artifact, "tokenizer": tokenizer})


def _shards(root: Path, docs: Artifact, tokenizer: Artifact, executor=None, **params):
    params = {"seq_len": SEQ_LEN, "size_limit": "8kb", **params}
    return run_stage(MDSShards(**params), root, executor=executor,
                     inputs={"documents": docs, "tokenizer": tokenizer})


def _packed(tok, texts: list[str]) -> list[int]:
    return [t for text in texts for t in [tok.bos_id, *tok.encode(text), tok.eos_id]]


def _sequences(art: Artifact, split: str) -> np.ndarray:
    seqs = list(iter_token_sequences(art.path, split))
    return np.stack(seqs) if seqs else np.empty((0, SEQ_LEN), dtype=np.uint16)


def _val_ids(art: Artifact) -> list[str]:
    return [d["id"] for d in iter_documents(art.path / "val_documents")]


def _file_digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _streaming_samples(split_dir: Path, cache: Path, **kwargs) -> list[np.ndarray]:
    """What a trainer reads: StreamingDataset over the split as a remote, into a cache."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(cache), remote=str(split_dir), shuffle=False, batch_size=1,
                          **kwargs)
    try:
        return [np.asarray(ds[i]["tokens"]) for i in range(ds.num_samples)]
    finally:
        del ds
        clean_stale_shared_memory()


# -- parameters ---------------------------------------------------------------------------


def test_remote_checked():
    MDSShards(remote="s3://bucket/prefix")
    MDSShards(remote="/abs/path/shards")
    with pytest.raises(RecipeError, match="remote"):
        MDSShards(remote="file:///tmp/shards")  # streaming has no file:// uploader
    with pytest.raises(RecipeError, match="absolute"):
        MDSShards(remote="relative/shards")
    with pytest.raises(RecipeError, match="ftp"):
        MDSShards(remote="ftp://host/x")


# -- held-out documents ---------------------------------------------------------------------


def test_heldout_documents_always_validation(tmp_path, corpus, tokenizer):
    tok = load_tokenizer(tokenizer.path)
    # some marked documents would be fraction candidates, some would not
    by_value = sorted(corpus, key=lambda d: split_value(0, d["id"]))
    marked = {by_value[0]["id"], by_value[3]["id"], by_value[-1]["id"], by_value[-5]["id"],
              by_value[len(by_value) // 2]["id"]}
    docs = [{**d, "split": "heldout"} if d["id"] in marked else d for d in corpus]
    other = next(i for i, d in enumerate(docs) if d["id"] == by_value[1]["id"])
    docs[other] = {**docs[other], "split": "train"}  # any other value is unmarked
    art = _documents(tmp_path / "docs", docs)

    # no fraction: exactly the marked documents are validation, in document order
    only = _shards(tmp_path / "a", art, tokenizer, val_fraction=0.0)
    assert _val_ids(only) == [d["id"] for d in docs if d["id"] in marked]
    assert only.meta["num_val_documents"] == only.meta["num_heldout_documents"] == 5
    assert only.manifest["counts"]["val_documents.marked_heldout"] == 5
    train = [d["text"] for d in docs if d["id"] not in marked]
    flat = _packed(tok, train)
    np.testing.assert_array_equal(_sequences(only, "train"),
                                  np.asarray(flat[:len(flat) // SEQ_LEN * SEQ_LEN]).reshape(-1, SEQ_LEN))
    flat_val = _packed(tok, [d["text"] for d in docs if d["id"] in marked])
    np.testing.assert_array_equal(
        _sequences(only, "val"),
        np.asarray(flat_val[:len(flat_val) // SEQ_LEN * SEQ_LEN]).reshape(-1, SEQ_LEN))
    assert only.meta["train_bytes"] == sum(len(t.encode()) for t in train)
    # the records keep their fields, the mark included
    assert all(d["split"] == "heldout" for d in iter_documents(only.path / "val_documents"))

    # with a fraction: marked ones plus the max_val_documents smallest values among the rest
    both = _shards(tmp_path / "b", art, tokenizer, val_fraction=0.3, max_val_documents=4)
    unmarked = sorted((split_value(0, d["id"]), d["id"]) for d in docs if d["id"] not in marked)
    assert unmarked[0][1] == by_value[1]["id"]
    expected = marked | {i for u, i in unmarked[:4] if u < 0.3}
    assert set(_val_ids(both)) == expected and len(expected) == 9
    assert both.meta["num_val_documents"] == 9 and both.meta["num_heldout_documents"] == 5
    assert both.meta["num_train_documents"] == len(docs) - 9

    # without marks the fraction rule alone decides (the recipes without heldout_split)
    plain = _shards(tmp_path / "c", _documents(tmp_path / "plain", corpus), tokenizer,
                    val_fraction=0.3, max_val_documents=4)
    assert set(_val_ids(plain)) == {i for _, i in sorted(
        (split_value(0, d["id"]), d["id"]) for d in corpus)[:4]}
    assert plain.meta["num_heldout_documents"] == 0


# -- document boundaries --------------------------------------------------------------------


def test_document_boundaries(shards, corpus, tokenizer, tmp_path):
    tok = load_tokenizer(tokenizer.path)
    assert shards.meta["document_boundaries"] == "bos"
    val = set(_val_ids(shards))
    train = [d["text"] for d in corpus if d["id"] not in val]
    # the packing model: document k starts at the sum of the lengths before it
    lengths = [len(tok.encode(t)) + 2 for t in train]
    starts = np.cumsum([0, *lengths[:-1]])
    n = shards.meta["num_train_samples"]
    expected = [starts[(starts >= k * SEQ_LEN) & (starts < (k + 1) * SEQ_LEN)] - k * SEQ_LEN
                for k in range(n)]
    assert sum(len(e) == 0 for e in expected) > 0  # some sequences continue one document
    assert sum(len(e) > 1 for e in expected) > 0  # some hold several documents

    ours = [document_starts(s, tok.bos_id) for s in iter_token_sequences(shards.path)]
    theirs = [document_starts(s, shards.meta["bos_id"])
              for s in _streaming_samples(shards.path / "train", tmp_path / "cache",
                                          validate_hash="sha1")]
    assert len(ours) == len(theirs) == n
    for e, a, b in zip(expected, ours, theirs):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, e)
        np.testing.assert_array_equal(b, e)
    # every segment from one start to the next decodes to a whole document
    seq = next(s for s, e in zip(iter_token_sequences(shards.path), expected) if len(e) > 1)
    cut = document_starts(seq, tok.bos_id)
    assert tok.decode(seq[cut[0]:cut[1]]) in train


class _ByteTokenizer(Tokenizer):
    """Each UTF-8 byte is its own id, so bytes 1 and 2 collide with bos and eos."""

    format = "test_leaky_bytes"

    @classmethod
    def from_directory(cls, path, info):
        tok = cls()
        tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id = 256, 0, 1, 2, 3
        tok.info = info
        return tok

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids if int(i) > 3).decode("utf-8", "replace")


def test_special_token_in_text_is_skipped(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text(json.dumps({"format": _ByteTokenizer.format}))
    tok_art = Artifact(kind="tokenizer", path=tok_dir, manifest={"meta": {
        "vocab_size": 256, "bos_id": 1, "eos_id": 2, "pad_id": 3}})
    docs = [{"id": f"d{i}", "text": f"print({i}) # some text to fill a sequence\n" * 3}
            for i in range(60)]
    docs[7]["text"] += "\x01"  # encodes to the bos id
    docs[20]["text"] = "\x02" + docs[20]["text"]  # to the eos id
    art = _shards(tmp_path / "s", _documents(tmp_path / "docs", docs, 2), tok_art,
                  val_fraction=0.0)
    assert art.manifest["counts"]["skipped.special_token_in_text"] == 2
    assert art.meta["num_train_documents"] == 58
    kept = [d["text"] for i, d in enumerate(docs) if i not in (7, 20)]
    expected = [t for text in kept for t in [1, *text.encode(), 2]]
    flat = np.concatenate(list(iter_token_sequences(art.path)))
    np.testing.assert_array_equal(flat, expected[:flat.size])
    assert len(expected) - flat.size < SEQ_LEN


def test_tokenizer_without_bos_fails_clearly(tmp_path, docs_artifact, tokenizer):
    no_bos = Artifact(kind="tokenizer", path=tokenizer.path,
                      manifest={"meta": {**tokenizer.meta, "bos_id": -1}})
    with pytest.raises(StageError, match="no bos or eos"):
        _shards(tmp_path, docs_artifact, no_bos)


# -- hashes and the data digest -------------------------------------------------------------


def test_shard_hashes_and_data_digest(shards, tmp_path, docs_artifact, tokenizer):
    import xxhash

    for split in ("train", "val"):
        index = json.loads((shards.path / split / "index.json").read_text())
        assert index["shards"]
        for shard in index["shards"]:
            assert shard["hashes"] == SHARD_HASHES == ["sha1", "xxh64"]
            data = (shards.path / split / shard["zip_data"]["basename"]).read_bytes()
            assert shard["zip_data"]["hashes"] == {
                "sha1": hashlib.sha1(data).hexdigest(), "xxh64": xxhash.xxh64(data).hexdigest()}
            assert set(shard["raw_data"]["hashes"]) == {"sha1", "xxh64"}
    info = read_shards_info(shards.path)
    assert info["splits"]["train"]["hashes"] == ["sha1", "xxh64"]
    assert shards.meta["data_digest"] == data_digest(shards.path)
    assert len(shards.meta["data_digest"]) == 64

    # a damaged shard is refused by the reader, by its sha1
    copy = tmp_path / "copy"
    shutil.copytree(shards.path, copy)
    first = sorted((copy / "train").glob("shard.*.mds.zstd"))[0]
    data = bytearray(first.read_bytes())
    data[-8] ^= 0xFF
    first.write_bytes(bytes(data))
    assert data_digest(copy) == shards.meta["data_digest"]  # the index did not change...
    with pytest.raises(ValueError, match="sha1"):
        list(iter_token_sequences(copy))  # ...but the bytes do not match it

    # other shards, another digest
    other = _shards(tmp_path / "other", docs_artifact, tokenizer, val_fraction=0.1,
                    seq_len=SEQ_LEN // 2)
    assert other.meta["data_digest"] != shards.meta["data_digest"]


# -- the same bytes whatever the workers ----------------------------------------------------


def test_same_bytes_serial_and_one_worker(tmp_path, corpus, tokenizer):
    docs = _documents(tmp_path / "docs", corpus, num_parts=4)
    serial = _shards(tmp_path / "serial", docs, tokenizer, SerialExecutor(), val_fraction=0.1)
    one = _shards(tmp_path / "one", docs, tokenizer, LocalExecutor(num_workers=1),
                  val_fraction=0.1)
    digests = _file_digests(serial.path)
    assert "train/index.json" in digests and "val/index.json" in digests
    assert sum(k.startswith("train/shard.") for k in digests) > 1
    assert _file_digests(one.path) == digests
    assert one.meta == serial.meta


@pytest.mark.slow
def test_same_bytes_whatever_the_worker_count(tmp_path, corpus, tokenizer):
    docs = _documents(tmp_path / "docs", corpus, num_parts=4)
    runs = {name: _shards(tmp_path / name, docs, tokenizer, executor, val_fraction=0.1)
            for name, executor in [("serial", SerialExecutor()),
                                   ("local1", LocalExecutor(num_workers=1)),
                                   ("local2", LocalExecutor(num_workers=2))]}
    digests = {name: _file_digests(art.path) for name, art in runs.items()}
    assert len(digests["serial"]) > 5
    assert digests["local1"] == digests["serial"]
    assert digests["local2"] == digests["serial"]
    assert runs["local2"].meta == runs["serial"].meta


# -- remote output --------------------------------------------------------------------------


def _split_files(art: Artifact) -> dict[str, bytes]:
    return {f"{split}/{p.name}": p.read_bytes() for split in ("train", "val")
            for p in sorted((art.path / split).iterdir())}


def test_remote_local_directory(tmp_path, docs_artifact, tokenizer, shards):
    remote = tmp_path / "bucket" / "run1"
    art = _shards(tmp_path / "s", docs_artifact, tokenizer, val_fraction=0.1,
                  remote=str(remote))
    local = _split_files(art)
    assert local == _split_files(shards)  # the local output does not depend on the remote
    uploaded = {f"{p.parent.name}/{p.name}": p.read_bytes()
                for p in sorted(remote.glob("*/*"))}
    assert uploaded == local
    assert art.meta["remote"] == str(remote)
    assert art.meta["data_digest"] == shards.meta["data_digest"]


def test_remote_s3(tmp_path, docs_artifact, tokenizer, shards, moto_s3):
    moto_s3.create_bucket(Bucket="shards-bucket")
    art = _shards(tmp_path / "s", docs_artifact, tokenizer, val_fraction=0.1,
                  remote="s3://shards-bucket/runs/micro")
    local = _split_files(art)
    listed = moto_s3.list_objects_v2(Bucket="shards-bucket", Prefix="runs/micro/")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert keys == sorted(f"runs/micro/{name}" for name in local)
    for name, data in local.items():
        body = moto_s3.get_object(Bucket="shards-bucket", Key=f"runs/micro/{name}")["Body"]
        assert body.read() == data, name
    assert local == _split_files(shards)
    assert art.meta["remote"] == "s3://shards-bucket/runs/micro"


def test_remote_s3_missing_bucket_fails_clearly(tmp_path, docs_artifact, tokenizer, moto_s3):
    with pytest.raises(StageError, match="s3://no-such-bucket/x"):
        _shards(tmp_path / "s", docs_artifact, tokenizer, remote="s3://no-such-bucket/x")


def test_fast_sample_encoding_is_streamings_own(tmp_path):
    from streaming import MDSWriter

    from recipe_engine_plugins.tokenizers.shards import _tokens_writer_class

    rng = np.random.default_rng(0)
    for dtype, seq_len in [("uint16", 64), ("uint16", 300), ("int32", 70000)]:
        samples = rng.integers(0, 60000, size=(5, seq_len)).astype(dtype)
        writers = {"plain": MDSWriter, "fast": _tokens_writer_class()}
        for name, cls in writers.items():
            with cls(out=str(tmp_path / f"{name}-{dtype}-{seq_len}"),
                     columns={"tokens": f"ndarray:{dtype}"}, compression="zstd",
                     size_limit=1 << 20, hashes=list(SHARD_HASHES)) as w:
                for row in samples:
                    w.write({"tokens": row})
            if name == "fast":
                assert w._fast is True
        assert _file_digests(tmp_path / f"plain-{dtype}-{seq_len}") == \
            _file_digests(tmp_path / f"fast-{dtype}-{seq_len}")
        got = list(iter_token_sequences(tmp_path, f"fast-{dtype}-{seq_len}"))
        np.testing.assert_array_equal(np.stack(got), samples)
