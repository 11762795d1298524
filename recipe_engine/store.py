"""Content-addressed store of stage artifacts.

Layout under the store root (``--store``, else ``$RECIPE_STORE``, else ``./recipe_store``)::

    artifacts/<fingerprint>/          committed outputs; manifest.json inside, written last
    work/<fingerprint>/out/           the output being written (cleared at each attempt)
    work/<fingerprint>/scratch/       resume state (checkpoints, finished parts); kept across
                                      crashed attempts, removed on commit
    locks/<fingerprint>.lock          one writer per fingerprint (concurrent sweep jobs)
    index/<recipe>.json               stage name -> last committed fingerprint (for `plan`)
    runs/<time>-<recipe>.json         run summaries

A stage is reused only when ``artifacts/<fp>/manifest.json`` exists. The output directory is
renamed into place in one ``rename``, after its manifest was written and synced, so a crash
never leaves something that looks complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from .component import Artifact

MANIFEST = "manifest.json"


def default_root() -> Path:
    return Path(os.environ.get("RECIPE_STORE") or "recipe_store").resolve()


def fingerprint(material: dict[str, Any]) -> str:
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root else default_root()

    def artifact_dir(self, fp: str) -> Path:
        return self.root / "artifacts" / fp

    def lookup(self, fp: str) -> Artifact | None:
        d = self.artifact_dir(fp)
        m = d / MANIFEST
        if not m.is_file():
            return None
        manifest = json.loads(m.read_text())
        return Artifact(kind=manifest.get("kind", ""), path=d, manifest=manifest)

    @contextlib.contextmanager
    def lock(self, fp: str) -> Iterator[None]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{fp}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def begin(self, fp: str) -> tuple[Path, Path]:
        """Fresh output dir and the (possibly resumed) scratch dir for a stage attempt."""
        base = self.root / "work" / fp
        out, scratch = base / "out", base / "scratch"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        scratch.mkdir(parents=True, exist_ok=True)
        return out, scratch

    def scratch_exists(self, fp: str) -> bool:
        d = self.root / "work" / fp / "scratch"
        return d.is_dir() and any(d.iterdir())

    def commit(self, fp: str, out: Path, manifest: dict[str, Any]) -> Artifact:
        files = {}
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files[str(p.relative_to(out))] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        manifest = {**manifest, "files": files}
        _write_json_atomic(out / MANIFEST, manifest)  # manifest last
        final = self.artifact_dir(fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # --force, or a leftover without manifest: move the old one aside
            trash = self.root / "trash" / f"{fp}-{time.time_ns()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(out, final)
        _fsync_dir(final.parent)
        shutil.rmtree(self.root / "work" / fp, ignore_errors=True)
        return Artifact(kind=manifest.get("kind", ""), path=final, manifest=manifest)

    # -- index for `plan`: which fingerprint did a recipe's stage have last time --------------

    def _index_path(self, recipe: str) -> Path:
        return self.root / "index" / f"{recipe}.json"

    def index(self, recipe: str) -> dict[str, str]:
        p = self._index_path(recipe)
        return json.loads(p.read_text()) if p.is_file() else {}

    def record(self, recipe: str, stage: str, fp: str) -> None:
        p = self._index_path(recipe)
        p.parent.mkdir(parents=True, exist_ok=True)
        with self.lock(f"index-{recipe}"):
            idx = self.index(recipe)
            idx[stage] = fp
            _write_json_atomic(p, idx)

    def save_run(self, summary: dict[str, Any]) -> Path:
        runs = self.root / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        p = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}-{summary.get('recipe')}.json"
        _write_json_atomic(p, summary)
        return p
