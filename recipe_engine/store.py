"""Content-addressed store of stage artifacts.

Layout under the store root (``--store``, else ``$RECIPE_STORE``, else ``./recipe_store``)::

    artifacts/<fingerprint>/          committed outputs; manifest.json inside, written last
    work/<fingerprint>/out/           the output being written (cleared at each attempt)
    work/<fingerprint>/scratch/       resume state (checkpoints, finished parts); kept across
                                      crashed attempts, removed on commit
    work/<fingerprint>/scratch.json   the stamp of scratch/: its inputs' content digests
    locks/<fingerprint>.lock          flock: one writer per fingerprint (concurrent runs, gc)
    index/<recipe>.json               stage name -> last committed fingerprint (for `plan`)
    runs/<time>-<recipe>.json         run summaries; ``invocation`` is shared by the jobs of
                                      one command (a multirun's jobs)
    live/<host>-<pid>-<n>.json        a run in progress: every fingerprint it may use; replaced
                                      by its run summary when it ends
    trash/                            directories on their way out (replaced artifacts, gc)
    nodes/<recipe>-<job>.json         a multi-node job's node-0 record (see below)

**Committed.** The output directory is renamed into place in one ``rename``, after its data
files, directories and manifest were written and synced, so a crash or power loss never leaves
something that looks complete. The manifest lists every file with its size and sha256
(``files``). A commit over an existing ``artifacts/<fp>`` (``--force``, a damaged artifact)
first renames the old directory into ``trash/``.

**Reused.** A lookup reuses ``artifacts/<fp>`` only when its manifest is a JSON object with a
``files`` map and every listed file exists with its listed size (one ``stat`` per file, at
every lookup). Otherwise it logs why (a corrupt manifest, a damaged artifact) and answers
"absent": the stage runs again and its commit replaces the directory. :meth:`Store.verify`
re-hashes every file on demand (``recipe verify``) and also reports files the manifest does
not list.

**Scratch.** ``work/<fp>/scratch/`` survives a crashed attempt so the next one resumes. It is
stamped (``scratch.json``) with the content digests of the input artifacts it was made from
and discarded, with a warning, when the stamp differs from the current inputs' (an upstream
stage recomputed with other bytes under the same fingerprint) or when the run asks for a fresh
start (``--force`` and ``--fresh`` stages).

**Locks.** ``locks/<fp>.lock`` is taken exclusively by a run that computes and commits ``fp``
(after waiting, it looks again: a concurrent run may have committed it meanwhile, so no stage
is computed twice) and by ``gc`` removing ``fp`` (without waiting: busy ones are skipped). A
run's first lookup (:meth:`Store.find`) takes it shared, without waiting. Lock files are never
deleted (deleting one another process waits on would split the lock).

**Garbage collection** (``recipe gc``) keeps every artifact and ``work/`` directory that a
root references and removes the rest, each under its lock, by a rename into ``trash/``. The
roots: every fingerprint in ``index/*.json``; every fingerprint in the run summaries of each
recipe's most recent invocation (``keep_runs`` invocations; all jobs of a multirun are one);
every fingerprint of a live run (a ``live/`` marker whose process is alive, or on another
host); a crashed run's marker (its process is gone) counts as a run of its recipe, dated by
its last sign of life (its start or the last change in its scratch directories), so it
protects its resume state until a newer run of that recipe supersedes it (gc then deletes the
marker). ``trash/`` is emptied. A run writes its marker before its first lookup, that lookup
holds the lock shared, and gc, holding the lock, re-reads the markers, summaries and indexes
written since it read the roots: a run never loses an artifact it found. gc removes nothing
while an index, summary or marker is unreadable.

**Nodes.** In a multi-node job (one ``recipe run`` per node, ``NNODES`` > 1) node 0 runs
and commits every stage; the other nodes (followers) wait for its commits and join the
``distributed`` stages. Node 0 keeps ``nodes/<recipe>-<job>.json`` (``<job>``: a digest of
the recipe name, ``NNODES``, ``MASTER_ADDR`` and ``MASTER_PORT``, which every node of the job
shares): its run's fingerprints, ``state`` (running, finished, failed), each stage's status
as it goes (running, ran, cached, failed), the failed stage and its error, and ``beat``, a
counter rewritten every few seconds while it runs. Followers only read it: a record counts
as node 0's current one once they have seen it change (a stale record of an earlier job
never does), and its silence for ``RECIPE_NODE_TIMEOUT`` seconds means node 0 is gone. The
records are small and are not collected by ``gc``.

Not covered: ``--force`` of a stage while another run reads that same artifact (the old
directory goes to ``trash/`` under the reader).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .component import Artifact

MANIFEST = "manifest.json"
STAMP = "scratch.json"
log = logging.getLogger("recipe_engine.store")


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


def _digest_and_sync(path: Path) -> str:
    """sha256 of a file, which is flushed to disk on the way (one open, one read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: leave no half-written temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def content_digest(manifest: dict[str, Any]) -> str:
    """A digest of an artifact's content: sha256 over its manifest's ``files`` map."""
    return fingerprint({"files": manifest.get("files") or {}})


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symbolic links not followed)."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, n))
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _valid_files(files: Any) -> bool:
    return isinstance(files, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("bytes"), int)
        and isinstance(v.get("sha256"), str) for k, v in files.items())


def _problem(file: str | None, problem: str, detail: str) -> dict[str, Any]:
    return {"file": file, "problem": problem, "detail": detail}


def describe_problems(problems: list[dict[str, Any]], limit: int = 3) -> str:
    """``a.bin: 2 bytes, 3 in the manifest; b.bin: missing`` for a log line."""
    text = "; ".join(f"{p['file']}: {p['detail']}" if p["file"] else p["detail"]
                     for p in problems[:limit])
    return text + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def check_files(root: Path, files: dict[str, Any], hashes: bool = True,
                extras: bool = True) -> list[dict[str, Any]]:
    """Differences between the directory ``root`` and its manifest's ``files`` map: each
    listed file must be a regular file of the listed size (and sha256, with ``hashes``);
    with ``extras``, files the manifest does not list (other than the manifest) count too."""
    problems = []
    for rel, entry in sorted(files.items()):
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            problems.append(_problem(rel, "manifest", "a path outside the artifact"))
            continue
        p = root / rel
        try:
            st = p.stat()  # a link is followed, as the commit that listed it did
        except OSError:
            problems.append(_problem(rel, "missing", "missing"))
            continue
        if not p.is_file():
            problems.append(_problem(rel, "missing", "not a file"))
        elif st.st_size != entry["bytes"]:
            problems.append(_problem(rel, "size", f"{st.st_size} bytes, {entry['bytes']} in the "
                                                  "manifest"))
        elif hashes:
            try:
                digest = file_digest(p)
            except OSError as e:
                problems.append(_problem(rel, "unreadable", f"unreadable ({e})"))
                continue
            if digest != entry["sha256"]:
                problems.append(_problem(rel, "sha256", f"sha256 {digest[:12]}, "
                                                        f"{entry['sha256'][:12]} in the manifest"))
    if extras:
        for dirpath, dirnames, names in os.walk(root):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for n in sorted(names + links):
                rel = os.path.relpath(os.path.join(dirpath, n), root)
                if rel != MANIFEST and rel not in files:
                    problems.append(_problem(rel, "extra", "not in the manifest"))
    return problems


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Roots:
    """What ``gc`` must keep: fingerprint -> why (``index toy/upper``, ``run toy ...``)."""

    refs: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # unreadable index, summary or marker
    superseded: list[Path] = field(default_factory=list)  # crashed runs' markers, now moot
    seen: dict[Path, int] = field(default_factory=dict)  # the files read, with their mtime_ns

    def add(self, fp: Any, why: str) -> None:
        if isinstance(fp, str):
            self.refs.setdefault(fp, []).append(why)


@dataclass
class _RunRecord:
    time: float
    invocation: str
    fingerprints: list[str]
    label: str
    marker: Path | None = None


class Store:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root else default_root()

    def artifact_dir(self, fp: str) -> Path:
        return self.root / "artifacts" / fp

    # -- lookups --------------------------------------------------------------------------------

    def _read_manifest(self, fp: str) -> tuple[dict[str, Any] | None, str]:
        """The manifest, or None and why not."""
        m = self.artifact_dir(fp) / MANIFEST
        if not m.is_file():
            return None, "no manifest.json"
        try:
            manifest = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            return None, f"corrupt manifest: {type(e).__name__}: {e}"
        if not isinstance(manifest, dict):
            return None, f"corrupt manifest: a JSON {type(manifest).__name__}, not an object"
        if not _valid_files(manifest.get("files")):
            return None, "corrupt manifest: no valid `files` map"
        return manifest, ""

    def lookup(self, fp: str, report: bool = True) -> Artifact | None:
        """The committed artifact ``fp``, if it is whole: a valid manifest and every listed
        file present with its listed size. Otherwise None, and (``report``) a warning why."""
        d = self.artifact_dir(fp)
        m = d / MANIFEST
        if not m.is_file():
            return None
        manifest, why = self._read_manifest(fp)
        if manifest is None:
            if report:
                log.warning("ignoring the corrupt manifest %s (%s); the stage will run again",
                            m, why.removeprefix("corrupt manifest: "))
            return None
        problems = check_files(d, manifest["files"], hashes=False, extras=False)
        if problems:
            if report and m.is_file():  # (not: replaced by a concurrent commit meanwhile)
                log.warning("ignoring the damaged artifact %s (%s); the stage will run again",
                            d, describe_problems(problems))
            return None
        return Artifact(kind=manifest.get("kind", ""), path=d, manifest=manifest)

    def find(self, fp: str) -> Artifact | None:
        """A run's first lookup: :meth:`lookup` under ``fp``'s lock taken shared, without
        waiting. None, silently, when it is not whole or a writer holds the lock; the run then
        takes the lock (and waits) and looks again, which reports."""
        with self.lock(fp, shared=True, wait=False) as got:
            return self.lookup(fp, report=False) if got else None

    def verify(self, fp: str, hashes: bool = True) -> dict[str, Any]:
        """Check ``artifacts/<fp>`` against its manifest: ``status`` ok, damaged or absent,
        and ``problems`` (each ``file``, ``problem`` and ``detail``)."""
        d = self.artifact_dir(fp)
        result: dict[str, Any] = {"fingerprint": fp, "path": str(d), "status": "absent",
                                  "recipe": None, "stage": None, "component": None,
                                  "kind": None, "files": 0, "bytes": 0, "problems": []}
        if not d.is_dir():
            return result
        manifest, why = self._read_manifest(fp)
        if manifest is None:
            problems = [_problem(MANIFEST, "manifest", why)]
        else:
            files = manifest["files"]
            result.update({k: manifest.get(k) for k in ("recipe", "stage", "component", "kind")})
            result.update(files=len(files), bytes=sum(f["bytes"] for f in files.values()))
            problems = check_files(d, files, hashes=hashes, extras=True)
        result.update(status="damaged" if problems else "ok", problems=problems)
        return result

    def fingerprints(self) -> list[str]:
        """Every directory under ``artifacts/``, committed or damaged."""
        d = self.root / "artifacts"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    # -- locks ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, fp: str, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
        """Hold ``locks/<fp>.lock`` (exclusive, or ``shared``) for the block; yields True.
        Without ``wait``, yields False at once when another process holds it."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"{fp}.lock"
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with open(path, "a") as f:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                log.warning("waiting for another run holding the lock on %s (%s)", fp[:12], path)
                fcntl.flock(f, mode)
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- writing a stage ------------------------------------------------------------------------

    def work_paths(self, fp: str) -> tuple[Path, Path]:
        """``(out, scratch)`` of ``fp``'s work directory, as :meth:`begin` makes them; nothing
        is created or removed (a follower node reads the scratch node 0 began)."""
        base = self.root / "work" / fp
        return base / "out", base / "scratch"

    def begin(self, fp: str, stamp: dict[str, Any] | None = None, fresh: bool = False,
              name: str | None = None) -> tuple[Path, Path]:
        """Fresh output dir and the (possibly resumed) scratch dir for a stage attempt.

        With a ``stamp`` (the inputs' content digests), scratch left by an attempt with
        another stamp (or none) is discarded; ``fresh`` discards it unconditionally. Either
        is logged when the scratch held anything. The stamp is then written beside it."""
        base = self.root / "work" / fp
        out, scratch = base / "out", base / "scratch"
        stamp_path = base / STAMP
        if scratch.exists():
            why = ""
            if fresh:
                why = "a fresh start was asked for (--force or --fresh)"
            elif stamp is not None:
                why = _stamp_difference(stamp_path, stamp)
            if why:
                if any(scratch.iterdir()):
                    log.warning("discarding the scratch state of %s (%s): %s", name or fp[:12],
                                scratch, why)
                self._discard(scratch)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        scratch.mkdir(parents=True, exist_ok=True)
        if stamp is not None:
            _write_json_atomic(stamp_path, stamp)
        return out, scratch

    def scratch_exists(self, fp: str) -> bool:
        d = self.root / "work" / fp / "scratch"
        return d.is_dir() and any(d.iterdir())

    def commit(self, fp: str, out: Path, manifest: dict[str, Any]) -> Artifact:
        files = {}
        dirs = [out]
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.name != MANIFEST:  # synced before the rename makes it count
                files[str(p.relative_to(out))] = {"bytes": p.stat().st_size,
                                                  "sha256": _digest_and_sync(p)}
            elif p.is_dir():
                dirs.append(p)
        for d in reversed(dirs):  # the entries of every directory, deepest first
            _fsync_dir(d)
        manifest = {**manifest, "files": files}
        _write_json_atomic(out / MANIFEST, manifest)  # manifest last
        _fsync_dir(out)
        final = self.artifact_dir(fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # --force, a damaged artifact, a leftover: move the old one aside
            self._discard(final)
        os.rename(out, final)
        _fsync_dir(final.parent)
        shutil.rmtree(self.root / "work" / fp, ignore_errors=True)
        return Artifact(kind=manifest.get("kind", ""), path=final, manifest=manifest)

    def tidy(self, fp: str) -> None:
        """Remove ``work/<fp>`` that a run killed between its commit's rename and the removal
        of its work directory left beside the committed ``fp`` (its scratch can be large:
        checkpoints). Only under ``fp``'s lock, taken without waiting: a ``--force`` run may
        be writing there."""
        work = self.root / "work" / fp
        if not work.exists():
            return
        with self.lock(fp, wait=False) as got:
            if got and work.exists() and (self.artifact_dir(fp) / MANIFEST).is_file():
                with contextlib.suppress(OSError):
                    self._discard(work)

    def _discard(self, path: Path) -> None:
        """Remove a directory: one rename into ``trash/`` (it is gone from its place at
        once), then delete it there."""
        trash = self.root / "trash" / f"{path.name}-{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

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

    # -- runs: live markers and summaries ---------------------------------------------------

    def begin_run(self, recipe: str, fingerprints: Iterable[str], invocation: str) -> Path:
        """Mark a run as live: the fingerprints it may use stay out of ``gc``'s reach until
        :meth:`save_run` replaces the marker by the run's summary. Call before any lookup."""
        live = self.root / "live"
        live.mkdir(parents=True, exist_ok=True)
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
        p = live / f"{host}-{os.getpid()}-{time.time_ns()}.json"
        _write_json_atomic(p, {"recipe": recipe, "invocation": invocation,
                               "host": socket.gethostname(), "pid": os.getpid(),
                               "started": time.time(), "fingerprints": sorted(set(fingerprints))})
        return p

    def save_run(self, summary: dict[str, Any], live: Path | None = None) -> Path:
        runs = self.root / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        p = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}-{summary.get('recipe')}.json"
        _write_json_atomic(p, summary)
        if live is not None:
            with contextlib.suppress(FileNotFoundError):
                live.unlink()
        return p

    def end_run(self, live: Path) -> None:
        """End a run that leaves no summary (a follower node's): remove its live marker."""
        with contextlib.suppress(FileNotFoundError):
            live.unlink()

    # -- multi-node jobs: node 0's record ---------------------------------------------------

    def node_record_path(self, recipe: str, job: str) -> Path:
        return self.root / "nodes" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', recipe)}-{job}.json"

    def write_node_record(self, path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, record)

    def read_node_record(self, path: Path) -> dict[str, Any] | None:
        """The record, or None when it is absent or unreadable (being replaced)."""
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    # -- what the store holds, and garbage collection ------------------------------------------

    def roots(self, keep_runs: int = 1) -> Roots:
        """The references ``gc`` keeps (see the module docstring for the rule)."""
        roots = Roots()
        for p in sorted((self.root / "index").glob("*.json")):
            idx = _read_json(p, dict, roots.errors, roots.seen)
            for stage, fp in (idx or {}).items():
                roots.add(fp, f"index {p.stem}/{stage}")
        records: dict[str, list[_RunRecord]] = {}
        for p in sorted((self.root / "runs").glob("*.json")):
            s = _read_json(p, dict, roots.errors, roots.seen)
            if s is None:
                continue
            fps = [st.get("fingerprint") for st in s.get("stages") or [] if isinstance(st, dict)]
            with contextlib.suppress(OSError):
                records.setdefault(str(s.get("recipe")), []).append(_RunRecord(
                    p.stat().st_mtime, str(s.get("invocation") or p.name), fps, f"run {p.name}"))
        this_host = socket.gethostname()
        for p in sorted((self.root / "live").glob("*.json")):
            m = _read_json(p, dict, roots.errors, roots.seen)
            if m is None:
                continue
            fps = m.get("fingerprints") or []
            pid, host = m.get("pid"), m.get("host")
            if host != this_host or not isinstance(pid, int) or _pid_alive(pid):
                for fp in fps:
                    roots.add(fp, f"live run (pid {pid} on {host})")
            else:  # its process is gone: a crashed run, which counts as a run of its recipe,
                # dated by its last sign of life (its start, or the last change in its scratch)
                last = max([float(m.get("started") or 0)] + [
                    d.stat().st_mtime for fp in fps if isinstance(fp, str)
                    for d in [self.root / "work" / fp / "scratch"] if d.is_dir()])
                records.setdefault(str(m.get("recipe")), []).append(_RunRecord(
                    last, str(m.get("invocation") or p.name), fps, f"crashed run {p.name}", p))
        for recipe, recs in records.items():
            by_invocation: dict[str, list[_RunRecord]] = {}
            for r in recs:
                by_invocation.setdefault(r.invocation, []).append(r)
            newest_first = sorted(by_invocation.values(), key=lambda rs: max(r.time for r in rs),
                                  reverse=True)
            for i, group in enumerate(newest_first):
                for r in group:
                    if i < keep_runs:
                        for fp in r.fingerprints:
                            roots.add(fp, f"{'last ' if i == 0 else ''}{r.label} of {recipe}")
                    elif r.marker is not None:
                        roots.superseded.append(r.marker)
        return roots

    def _referenced_anew(self, roots: Roots) -> set[str]:
        """Fingerprints referenced by the markers, summaries and indexes written since
        ``roots`` was computed (runs that started or ended meanwhile). Markers first: a run
        writes its summary before it removes its marker, so one of the two is seen."""
        out: set[str] = set()
        for sub in ("live", "runs", "index"):
            for p in (self.root / sub).glob("*.json"):
                with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                    if roots.seen.get(p) == p.stat().st_mtime_ns:
                        continue
                    obj = json.loads(p.read_text(encoding="utf-8"))
                    if sub == "live":
                        out.update(obj.get("fingerprints") or [])
                    elif sub == "runs":
                        out.update(st.get("fingerprint") for st in obj.get("stages") or []
                                   if isinstance(st, dict))
                    else:
                        out.update(v for v in obj.values() if isinstance(v, str))
        return out

    def describe(self, fp: str) -> dict[str, Any]:
        """``recipe``, ``stage``, ``component``, ``kind`` of an artifact (None where its
        manifest is unreadable), ``bytes`` on disk and ``age`` in seconds."""
        d = self.artifact_dir(fp)
        manifest, why = self._read_manifest(fp)
        info: dict[str, Any] = {k: (manifest or {}).get(k) for k in
                                ("recipe", "stage", "component", "kind")}
        try:
            mtime = (d / MANIFEST if manifest else d).stat().st_mtime
        except OSError:
            mtime = time.time()
        return {"fingerprint": fp, **info, "bytes": _tree_bytes(d),
                "age": round(max(0.0, time.time() - mtime), 1),
                "manifest": "ok" if manifest else why}

    def listing(self, keep_runs: int = 1) -> dict[str, Any]:
        """What the store holds (``recipe ls``): artifacts with what references them, work
        directories, trash."""
        roots = self.roots(keep_runs)
        artifacts = [{**self.describe(fp), "referenced_by": roots.refs.get(fp, [])}
                     for fp in self.fingerprints()]
        work = [{"fingerprint": d.name, "bytes": _tree_bytes(d),
                 "referenced_by": roots.refs.get(d.name, [])}
                for d in _subdirs(self.root / "work")]
        trash = sum(_tree_bytes(d) for d in _subdirs(self.root / "trash"))
        return {"store": str(self.root), "artifacts": artifacts, "work": work,
                "trash_bytes": trash, "errors": roots.errors,
                "bytes": sum(a["bytes"] for a in artifacts) + sum(w["bytes"] for w in work) + trash}

    def gc(self, keep: Iterable[str] = (), keep_runs: int = 1, dry_run: bool = False
           ) -> dict[str, Any]:
        """Remove what no root references (module docstring): artifacts, ``work/``
        directories, ``trash/``, superseded markers of crashed runs. Fingerprints starting
        with a ``keep`` prefix stay. Each removal holds the fingerprint's lock (busy ones are
        skipped and listed). Nothing is removed while ``errors`` is not empty."""
        keep = tuple(keep)
        roots = self.roots(keep_runs)
        result: dict[str, Any] = {"store": str(self.root), "dry_run": dry_run, "artifacts": [],
                                  "work": [], "trash_bytes": 0, "busy": [], "kept": 0,
                                  "errors": roots.errors, "freed_bytes": 0}
        if roots.errors:
            return result

        def wanted(fp: str) -> bool:
            return fp not in roots.refs and not fp.startswith(keep)

        for kind, fps in (("artifacts", self.fingerprints()),
                          ("work", [d.name for d in _subdirs(self.root / "work")])):
            for fp in fps:
                if not wanted(fp):
                    if kind == "artifacts":
                        result["kept"] += 1
                    continue
                path = self.root / kind / fp
                info = self.describe(fp) if kind == "artifacts" else {
                    "fingerprint": fp, "bytes": _tree_bytes(path)}
                if not dry_run:
                    with self.lock(fp, wait=False) as got:
                        if not got or fp in self._referenced_anew(roots):  # a run uses it now
                            result["busy"].append({**info, "in": kind})
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            self._discard(path)
                result[kind].append(info)
                result["freed_bytes"] += info["bytes"]
        for d in _subdirs(self.root / "trash"):
            size = _tree_bytes(d)
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            result["trash_bytes"] += size
            result["freed_bytes"] += size
        if not dry_run:
            for marker in roots.superseded:
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
        return result


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def _read_json(path: Path, expected: type, errors: list[str],
               seen: dict[Path, int] | None = None) -> Any:
    try:
        if seen is not None:
            seen[path] = path.stat().st_mtime_ns
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:  # removed meanwhile (a live marker whose run just ended)
        return None
    except (OSError, ValueError) as e:
        errors.append(f"{path}: unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(obj, expected):
        errors.append(f"{path}: a JSON {type(obj).__name__}, not an {expected.__name__}")
        return None
    return obj


def _stamp_difference(path: Path, stamp: dict[str, Any]) -> str:
    """Why the scratch stamped at ``path`` was not made from ``stamp``'s inputs ('' if it was)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no stamp of the inputs it was made from"
    except (OSError, ValueError) as e:
        return f"its stamp {path} is unreadable ({type(e).__name__})"
    if old == stamp:
        return ""
    old_inputs = old.get("inputs", {}) if isinstance(old, dict) else {}
    changed = sorted(slot for slot in set(old_inputs) | set(stamp.get("inputs", {}))
                     if old_inputs.get(slot) != stamp.get("inputs", {}).get(slot))
    if changed:
        return (f"it was made from other contents of input {', '.join(map(repr, changed))}")
    return "it was made from other inputs"
