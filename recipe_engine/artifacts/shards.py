"""The ``shards`` kind, read without mosaicml-streaming or torch (stdlib, zstandard, numpy).

A shards artifact holds one mosaicml-streaming MDS dataset per split directory (``train/``,
``val/``). This module reads that format directly, so a consumer needs neither
``streaming`` nor ``torch``. The format, as streaming 0.13 writes it (``MDSWriter``):

``<split>/index.json``::

    {"version": 2, "shards": [{"format": "mds", "version": 2, "samples": N,
       "column_names": [...], "column_encodings": [...], "column_sizes": [int|null, ...],
       "compression": "zstd" | "zstd:<level>" | null, "hashes": [], "size_limit": ...,
       "raw_data": {"basename": "shard.00000.mds", "bytes": ..., "hashes": {}},
       "zip_data": {"basename": "shard.00000.mds.zstd", ...} | null}, ...]}

Columns are sorted by name. A compressed shard is stored as ``zip_data`` only (one zstd frame
of the whole raw shard); the raw file appears when streaming's own reader decompresses it.
A raw shard is, all integers little-endian ``uint32``::

    num_samples | offsets[num_samples + 1] | writer config (JSON) | sample 0 | sample 1 | ...

``offsets[i]`` is where sample ``i`` begins in the file and ``offsets[i + 1]`` where it ends.
A sample is one ``uint32`` size for each column of variable size (``column_sizes[i]`` null),
in column order, then the columns' bytes in column order. ``ndarray[:dtype[:shape]]`` is
``[dtype code: 1 byte, when the encoding names no dtype] [ndim << 2 | shape dtype code: 1
byte, then the shape, when it names no shape] [values]``; ``mds_shards`` writes
``ndarray:uint16`` (or ``int32``), so a sample is ``[4-byte size][1 byte ndim/width][shape]
[seq_len values]``.

Integrity: ``mds_shards`` has the writer record ``sha1`` and ``xxh64`` digests of every shard
file in ``index.json`` (``raw_data.hashes``, ``zip_data.hashes``); this reader checks the
``sha1`` of each file it reads when the index has one. ``data_digest(dir)`` is one sha256
over the ``train/`` and ``val/`` index files, so it changes when any shard's bytes do.

Document boundaries are not stored in a column: ``mds_shards`` guarantees that ``bos_id``
occurs exactly at the first token of every document and nowhere else (meta
``document_boundaries: "bos"``), so ``document_starts(tokens, bos_id)`` recovers them from a
sample, whether it came from this reader or from ``streaming.StreamingDataset``.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import struct
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

from .reports import read_manifest

INDEX_FILE = "index.json"
SPLITS = ("train", "val")
TOKENS_COLUMN = "tokens"
BOUNDARIES_BOS = "bos"  # meta["document_boundaries"]: every document starts with bos_id
VERIFIED_HASH = "sha1"  # the shard digest this reader checks (hashlib; xxh64 is not stdlib)

# streaming.base.format.mds.encodings.NDArray's codes
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16",
                 32: "uint32", 33: "int32", 34: "float32", 64: "uint64", 65: "int64",
                 66: "float64"}
_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}
_SCALARS = set(_VALUE_DTYPES.values())


def read_mds_index(split_dir: str | Path) -> dict[str, Any]:
    """The parsed ``index.json`` of one MDS split directory, checked to be MDS version 2."""
    path = Path(split_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no MDS index (is this a split of a shards "
                                "artifact, such as <artifact>/train?)") from None
    if index.get("version") != 2:
        raise ValueError(f"{path}: MDS index version {index.get('version')!r}, expected 2")
    for shard in index.get("shards", []):
        if shard.get("format") != "mds" or shard.get("version") != 2:
            raise ValueError(f"{path}: a shard is {shard.get('format')!r} version "
                             f"{shard.get('version')!r}; only MDS version 2 is read here")
    return index


def _decompress(algo: str, data: bytes) -> bytes:
    name = algo.split(":", 1)[0]
    if name == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if name == "gz":
        return gzip.decompress(data)
    if name == "bz2":
        return bz2.decompress(data)
    raise ValueError(f"MDS compression {algo!r} is not supported by this reader "
                     "(zstd, gz and bz2 are)")


def _check_hash(path: Path, data: bytes, info: dict[str, Any]) -> None:
    want = (info.get("hashes") or {}).get(VERIFIED_HASH)
    if want and hashlib.new(VERIFIED_HASH, data).hexdigest() != want:
        raise ValueError(f"{path}: {VERIFIED_HASH} differs from the one in index.json "
                         "(the file is damaged or was replaced)")


def _shard_bytes(split_dir: Path, shard: dict[str, Any]) -> bytes:
    raw = shard.get("raw_data") or {}
    raw_path = split_dir / raw.get("basename", "")
    if raw and raw_path.is_file() and raw_path.stat().st_size == raw.get("bytes"):
        data = raw_path.read_bytes()
        _check_hash(raw_path, data, raw)
        return data
    zipped = shard.get("zip_data")
    if not zipped or not shard.get("compression"):
        raise FileNotFoundError(f"{raw_path}: MDS shard file missing")
    zip_path = split_dir / zipped["basename"]
    packed = zip_path.read_bytes()
    _check_hash(zip_path, packed, zipped)
    data = _decompress(shard["compression"], packed)
    if raw and len(data) != raw.get("bytes"):
        raise ValueError(f"{split_dir / zipped['basename']}: decompressed to {len(data)} "
                         f"bytes, the index says {raw.get('bytes')} (the file is damaged)")
    return data


def _decoder(encoding: str) -> Any:
    """A function ``bytes -> value`` for one MDS column encoding."""
    name, _, config = encoding.partition(":")
    if name == "ndarray":
        import numpy as np

        args = config.split(":") if config else []
        dtype = args[0] if args else None
        shape = tuple(int(d) for d in args[1].split(",")) if len(args) > 1 else None

        def ndarray(data: bytes) -> Any:
            i = 0
            value_dtype = dtype
            if value_dtype is None:
                value_dtype, i = _VALUE_DTYPES[data[0]], 1
            dims = shape
            if dims is None:
                ndim, width = data[i] >> 2, data[i] & 3
                i += 1
                size = ndim * 2**width
                shape_dtype = np.dtype(_SHAPE_DTYPES[width]).newbyteorder("<")
                dims = tuple(int(d) for d in np.frombuffer(data[i:i + size], shape_dtype))
                i += size
            return np.frombuffer(data[i:], np.dtype(value_dtype).newbyteorder("<")).reshape(dims)

        return ndarray
    if config:
        raise ValueError(f"MDS column encoding {encoding!r} is not supported by this reader")
    if name == "bytes":
        return bytes
    if name == "str":
        return lambda data: data.decode("utf-8")
    if name == "int":
        return lambda data: struct.unpack("<q", data)[0]
    if name == "json":
        return lambda data: json.loads(data.decode("utf-8"))
    if name == "str_int":
        return lambda data: int(data.decode("utf-8"))
    if name == "str_float":
        return lambda data: float(data.decode("utf-8"))
    if name == "str_decimal":
        return lambda data: Decimal(data.decode("utf-8"))
    if name in _SCALARS:
        import numpy as np

        return lambda data: np.frombuffer(data, np.dtype(name).newbyteorder("<"))[0]
    raise ValueError(f"MDS column encoding {encoding!r} is not supported by this reader "
                     "(images and pickles are not read here)")


def iter_mds_samples(split_dir: str | Path, columns: list[str] | None = None
                     ) -> Iterator[dict[str, Any]]:
    """Yield every sample of one MDS split directory as a dict, shard by shard, in order
    (the order of ``StreamingDataset(local=split_dir, shuffle=False)``). ``columns``: decode
    only these. Numpy arrays are read-only views of the shard's bytes, as streaming's are."""
    split_dir = Path(split_dir)
    for shard in read_mds_index(split_dir).get("shards", []):
        names, sizes = shard["column_names"], shard["column_sizes"]
        decoders = [_decoder(enc) if columns is None or name in columns else None
                    for name, enc in zip(names, shard["column_encodings"])]
        num_variable = sum(1 for s in sizes if not s)
        data = _shard_bytes(split_dir, shard)
        (num_samples,) = struct.unpack_from("<I", data, 0)
        if num_samples != shard["samples"]:
            raise ValueError(f"{split_dir}: a shard holds {num_samples} samples, the index "
                             f"says {shard['samples']}")
        offsets = struct.unpack_from(f"<{num_samples + 1}I", data, 4)
        view = memoryview(data)
        for begin, end in zip(offsets, offsets[1:]):
            header = struct.unpack_from(f"<{num_variable}I", data, begin)
            pos = begin + 4 * num_variable
            variable = iter(header)
            sample = {}
            for name, size, decode in zip(names, sizes, decoders):
                size = size or next(variable)
                if decode is not None:
                    sample[name] = decode(bytes(view[pos:pos + size]))
                pos += size
            if pos != end:
                raise ValueError(f"{split_dir}: a sample's columns take {pos - begin} bytes, "
                                 f"its offsets {end - begin} (damaged shard?)")
            yield sample


def iter_token_sequences(directory: str | Path, split: str = "train",
                         column: str = TOKENS_COLUMN) -> Iterator[Any]:
    """Yield the packed token sequences of a shards artifact's ``split``, in order: each a
    read-only 1-D numpy array of ``seq_len`` ids (``uint16`` or ``int32``, ``meta["dtype"]``)."""
    for sample in iter_mds_samples(Path(directory) / split, columns=[column]):
        yield sample[column]


def document_starts(tokens: Any, bos_id: int) -> Any:
    """Where documents begin inside one packed sequence: the positions of ``bos_id``, as a
    sorted ``int32`` numpy array (empty when the whole sequence continues one document).
    Valid for shards whose meta says ``document_boundaries: "bos"``. Tokens before the first
    start belong to a document begun in an earlier sequence. For a per-document attention
    mask, ``segment = numpy.cumsum(tokens == bos_id)`` numbers the documents of a sequence
    (0: the one carried over) and token ``i`` may attend to ``j <= i`` iff their segments
    match; positions restart at each start."""
    import numpy as np

    return np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int32)


def data_digest(directory: str | Path) -> str:
    """sha256 (hex) over the ``index.json`` of ``train/`` and ``val/`` of a shards artifact:
    it names the exact token data, since each index lists every shard's size and sha1.
    ``mds_shards`` stores it as ``meta["data_digest"]``; a trainer keeps it in its
    checkpoints and refuses to resume on shards whose digest differs."""
    h = hashlib.sha256()
    for split in SPLITS:
        data = (Path(directory) / split / INDEX_FILE).read_bytes()
        h.update(f"{split}/{INDEX_FILE} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def read_shards_info(directory: str | Path) -> dict[str, Any]:
    """What a shards artifact says about itself: the producer's ``meta`` (``seq_len``,
    ``vocab_size``, ``bos_id``, ``dtype``, ``num_train_samples``, ...; empty without a
    manifest) plus ``splits``: ``{split: {num_samples, num_shards, columns, compression,
    hashes}}`` from each split's ``index.json`` (``hashes``: the digest algorithms recorded
    per shard file)."""
    directory = Path(directory)
    info = dict(read_manifest(directory).get("meta", {}))
    splits = {}
    for sub in sorted(p for p in directory.iterdir() if (p / INDEX_FILE).is_file()):
        shards = read_mds_index(sub).get("shards", [])
        columns = dict(zip(shards[0]["column_names"], shards[0]["column_encodings"])) \
            if shards else {}
        splits[sub.name] = {"num_samples": sum(s["samples"] for s in shards),
                            "num_shards": len(shards), "columns": columns,
                            "compression": shards[0].get("compression") if shards else None,
                            "hashes": list(shards[0].get("hashes") or []) if shards else []}
    info["splits"] = splits
    return info
