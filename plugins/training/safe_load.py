"""Checkpoint loading without an unrestricted unpickle.

Composer 0.32 reads a checkpoint with ``torch.load(..., weights_only=False)``, and torch reads
a sharded (``torch.distributed.checkpoint``) checkpoint's ``.metadata`` with plain
``pickle.load`` and its non-tensor items with ``torch.load(..., weights_only=False)``. A file
in a stage's work directory (autoresume loads whatever ``checkpoints/latest-rank{rank}.pt``
names) could therefore carry an object whose ``__reduce__`` runs any code the moment it is
loaded. ``guard_checkpoint_loads()`` makes every Composer checkpoint load in this process
go through ``torch.load(weights_only=True)`` with the explicit :func:`allowlist` below, or
through an unpickler as restricted, and turns a refusal into :class:`UnsafeCheckpointError`.

Patch points, in ``composer.utils.checkpoint`` unless named (read against Composer 0.32.1
and torch 2.7):

- ``_torch_load_with_validation``: the one place a whole-file (monolithic) checkpoint reaches
  ``torch.load``, through ``safe_torch_load``: autoresume, ``load_path``,
  ``load_weights_only``, ``load_monolith_rank0_only``, and Composer's HuggingFace and
  inference helpers. Replaced by a ``weights_only=True`` load under the allowlist.
- ``FileSystemReaderWithValidation.read_metadata``: a sharded checkpoint's ``.metadata``.
  Replaced by a read through :class:`_MetadataUnpickler`, which resolves only the classes a
  checkpoint's metadata is made of.
- ``FileSystemReaderWithValidation.read_data`` and ``load_checkpoint``: wrapped to run with
  torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set (and the allowlist active), which makes every
  ``torch.load`` beneath them ``weights_only`` even where ``weights_only=False`` is passed:
  the sharded checkpoint's non-tensor items (torch's ``DefaultLoadPlanner.load_bytes``, any
  planner), and any load a later Composer adds under ``load_checkpoint``. ``load_checkpoint``
  also names the file asked for in a refusal, and refuses tar archives (Composer extracts
  them with ``extractall`` and no path filter).
- ``composer.checkpoint.load.load_resumption_checkpoint`` (Composer's newer checkpoint API,
  which ``Trainer`` does not use; plain ``pickle.load``): refuses.

Every name a loaded ``composer`` module binds to a replaced function is rebound too
(``Trainer`` calls ``checkpoint.load_checkpoint``; ``LoadCheckpoint`` imported it by name).

Installing fails with ``RuntimeError`` rather than leaving a load unprotected in silence: a
target missing or of another signature (a Composer other than 0.32 changed it); a
``torch.load`` / ``pickle.load`` call in the load path's modules (their source, read with
``ast``) other than in the functions replaced here; or a torch that does not honour
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (a probe object must be refused). A second call does
nothing.

A refusal never runs the payload: the weights-only unpickler stops at the first global not
allowed, before calling anything. The message names the file, the disallowed globals (read
from the pickle without executing it, ``torch.serialization.get_unsafe_globals_in_checkpoint``)
and how to train the stage afresh.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import os
import pickle
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from recipe_engine import StageError

COMPOSER_CHECKED = "0.32"  # the Composer the patch points above were read against
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # both set: torch raises; unset in a scope
_MARK = "_recipe_engine_safe_load"  # set on composer.utils.checkpoint once installed

# Functions of the load path that may call an unpickler, because they are replaced here;
# any other call to one of UNPICKLERS in AUDITED_MODULES stops the installation.
REPLACED = {
    "composer.utils.checkpoint": {"_torch_load_with_validation"},
    "composer.checkpoint.load": {"load_resumption_checkpoint"},
}
AUDITED_MODULES = ("composer.utils.checkpoint", "composer.checkpoint.load",
                   "composer.trainer.trainer", "composer.core.state",
                   "composer.callbacks.load_checkpoint")
UNPICKLERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"),
              ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
              ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load")}


def allowlist() -> list[Any]:
    """The globals a Composer checkpoint of our training stages holds beyond those torch's
    weights-only unpickler allows by itself (tensors and their storages, dtypes, devices,
    ``torch.Size``, ``OrderedDict``, ``set``, ...). Found by saving real checkpoints of tiny
    runs; ``tests/plugins/test_safe_load.py`` checks that a fresh one needs nothing else.
    Python's ``random`` state, Composer's ``Timestamp`` counters, the optimizer, the
    LambdaLR-compiled schedulers, torchmetrics states, the dataset position and our
    callbacks' states are plain ints, floats, strings, tuples, lists, dicts and tensors."""
    import datetime

    import numpy as np
    import torch

    return [
        # State._get_state_metadata()["torch_version"] is torch.__version__, a str subclass
        torch.torch_version.TorchVersion,
        # Timestamp.state_dict(): total_wct, iteration_wct, epoch_wct, batch_wct
        datetime.timedelta,
        # reproducibility.get_rng_state()[rank]["numpy"] is np.random.get_state():
        # ("MT19937", key: uint32 array, pos, has_gauss, cached_gaussian). An array pickles
        # as this numpy's _reconstruct(ndarray, shape, dtype) and a BUILD of its state...
        np.ndarray((0,)).__reduce__()[0],
        np.ndarray,
        # ...its dtype as numpy.dtype("u4", ...), then a BUILD of the dtype's own class
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


class UnsafeCheckpointError(StageError):
    """A checkpoint holds something a checkpoint of ours never does; nothing in it ran."""

    def __init__(self, file: str, disallowed: list[str], reason: str):
        self.file, self.disallowed, self.reason = str(file), list(disallowed), reason
        what = (f"the pickled global{'s' if len(disallowed) > 1 else ''} "
                f"{', '.join(disallowed)}" if disallowed else "a pickled object")
        shown = self.file
        if os.path.islink(self.file):  # latest-rank0.pt: name the checkpoint it points at
            shown += f" (-> {os.path.realpath(self.file)})"
        super().__init__(
            f"refused to load the checkpoint {shown}: it holds {what}, which no checkpoint "
            f"of a training stage contains ({reason}). Loading it could run code, so it was "
            f"not loaded and nothing in it ran. If you did not put it there, the stage's work "
            f"directory was altered or copied from elsewhere; to train the stage afresh, "
            f"discard its scratch (recipe run <recipe> --fresh <stage>) or delete "
            f"{Path(self.file).parent}")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (gathered by rank)
        return type(self), (self.file, self.disallowed, self.reason)


# -- the weights-only scope ------------------------------------------------------------------

_scope_lock = threading.Lock()
_scope: dict[str, Any] = {"depth": 0}


@contextlib.contextmanager
def weights_only_scope() -> Iterator[None]:
    """While any thread is inside: every ``torch.load`` in the process is weights-only
    (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which overrides an explicit ``weights_only=False``),
    and :func:`allowlist` is among torch's safe globals. Re-entrant; on leaving the last
    one the environment and the safe globals are as they were."""
    with _scope_lock:
        if _scope["depth"] == 0:
            import torch

            _scope["env"] = {k: os.environ.get(k) for k in (FORCE_ENV, FORCE_NO_ENV)}
            os.environ[FORCE_ENV] = "1"
            os.environ.pop(FORCE_NO_ENV, None)
            present = torch.serialization.get_safe_globals()
            ctx = torch.serialization.safe_globals([g for g in allowlist() if g not in present])
            ctx.__enter__()
            _scope["globals"] = ctx
        _scope["depth"] += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope["depth"] -= 1
            if _scope["depth"] == 0:
                _scope.pop("globals").__exit__(None, None, None)
                for key, value in _scope.pop("env").items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


# -- refusals --------------------------------------------------------------------------------


def _reason(message: str) -> str:
    """The line of torch's weights-only message that says what was refused (the rest is
    advice about ``weights_only=False``, which is not ours to give)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    for line in lines:
        if any(word in line for word in ("GLOBAL", "Unsupported", "Can only")):
            return line
    return lines[0] if lines else "refused"


def _unsafe_globals(source: Any, message: str) -> list[str]:
    """The globals in a torch.save file that the allowlist does not allow, read without
    unpickling (falling back on the one torch's message names)."""
    import torch

    found: list[str] = []
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        with weights_only_scope():
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    except Exception:  # noqa: BLE001 (not a zip file, a damaged one: use the message)
        found = []
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)", message)[:1]
    return sorted(set(found))


def _refusal(file: Any, error: BaseException, source: Any = None) -> UnsafeCheckpointError:
    message = str(error)
    return UnsafeCheckpointError(str(file), _unsafe_globals(source if source is not None
                                                            else file, message),
                                 _reason(message))


def _find_refusal(error: BaseException) -> tuple[list[str], str] | None:
    """(disallowed globals, reason) when ``error`` is, wraps or was caused by a refusal
    (an :class:`UnsafeCheckpointError`, torch's ``UnpicklingError``, or one inside torch's
    ``CheckpointException``, which gathers each rank's exception), else None."""
    stack: list[Any] = [error]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UnsafeCheckpointError):
            return e.disallowed, e.reason
        if isinstance(e, pickle.UnpicklingError):
            return re.findall(r"GLOBAL ([\w.]+)", str(e))[:1], _reason(str(e))
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
    return None


# -- the replacements ------------------------------------------------------------------------


def _weights_only_torch_load(checkpoint_filepath: Any, map_location: str) -> Any:
    """Composer's ``_torch_load_with_validation``, weights-only under the allowlist."""
    import torch

    from composer.utils import checkpoint as ckpt

    path = ckpt._ensure_valid_checkpoint(checkpoint_filepath)
    with weights_only_scope():
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refusal(checkpoint_filepath, e, path) from None


def _refuse_resumption_checkpoint(state: Any, load_path: str) -> None:
    """Replaces ``composer.checkpoint.load.load_resumption_checkpoint`` (plain pickle)."""
    raise StageError(f"refused to load the resumption state {load_path}: Composer reads it with "
                     "an unrestricted pickle.load, which could run code; the training stages "
                     "never write one (plugins/training/safe_load.py)")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.distributed.checkpoint`` ``.metadata`` file, resolving only the
    globals checkpoint metadata is made of (dataclasses describing the stored items,
    ``torch.Size``, dtypes, the layout and memory-format tags, the checkpoint id's path);
    any other global is refused before anything is called."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "collections": {"OrderedDict"},
        "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id
    }

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not part "
                                     "of a checkpoint's metadata")


def _read_metadata(self: Any) -> Any:
    """``FileSystemReaderWithValidation.read_metadata`` through :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    from composer.utils import checkpoint as ckpt

    path = os.path.join(str(self.path), ".metadata")
    ckpt._ensure_valid_checkpoint(path)
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(path, re.findall(r"GLOBAL ([\w.]+)", str(e))[:1],
                                        f"in its .metadata: {e}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(path, [], f"it holds a {type(metadata).__name__}, "
                                              "not checkpoint metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = getattr(self, "load_id", None)
    return metadata


def _scoped_read_data(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def read_data(self: Any, plan: Any, planner: Any) -> Any:
        with weights_only_scope():
            return original(self, plan, planner)

    read_data.__recipe_engine_guarded__ = True  # type: ignore[attr-defined]
    return read_data


def _guarded_load_checkpoint(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        from composer.utils.file_helpers import is_tar

        path = str(signature.bind(*args, **kwargs).arguments["path"])
        if is_tar(path):
            raise StageError(f"refused to load the checkpoint {path}: Composer extracts tar "
                             "archives without a path filter; load a .pt checkpoint")
        with weights_only_scope():
            try:
                return original(*args, **kwargs)
            except BaseException as e:  # torch's CheckpointException is a BaseException
                found = _find_refusal(e)
                if found is None:
                    raise
                raise UnsafeCheckpointError(path, *found) from None

    load_checkpoint.__recipe_engine_guarded__ = True  # type: ignore[attr-defined]
    return load_checkpoint


# -- installation ----------------------------------------------------------------------------

_install_lock = threading.Lock()


class _Probe:
    """Not in any allowlist: a weights-only load must refuse it."""


def _composer_problem(what: str) -> RuntimeError:
    import composer

    return RuntimeError(
        f"plugins/training/safe_load.py cannot guard Composer {composer.__version__}'s "
        f"checkpoint loading (written against Composer {COMPOSER_CHECKED}): {what}. Checkpoints "
        "are not loaded unguarded; update the patch points in safe_load.py for this version")


def unpickler_calls(source: str) -> list[tuple[str, str]]:
    """``(enclosing function, call)`` for each call to one of :data:`UNPICKLERS` in
    ``source`` (also through ``from torch import load`` and the like)."""
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if (node.module.split(".")[0], a.name) in UNPICKLERS:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = child.name if where == "<module>" else f"{where}.{child.name}"
            if isinstance(child, ast.Call):
                f = child.func
                if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                        and (f.value.id, f.attr) in UNPICKLERS):
                    found.append((inner, f"{f.value.id}.{f.attr}"))
                elif isinstance(f, ast.Name) and f.id in aliases:
                    found.append((inner, aliases[f.id]))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def _audit() -> None:
    """Everything the patch relies on, checked before anything is patched."""
    import importlib
    import io

    import torch

    modules = {name: importlib.import_module(name) for name in AUDITED_MODULES}
    ckpt = modules["composer.utils.checkpoint"]
    expected = {
        "_torch_load_with_validation": ["checkpoint_filepath", "map_location"],
        "load_checkpoint": ["path", "state", "logger"],
        "_ensure_valid_checkpoint": ["checkpoint_filepath"],
    }
    for name, params in expected.items():
        fn = getattr(ckpt, name, None)
        if not callable(fn):
            raise _composer_problem(f"composer.utils.checkpoint.{name} is gone")
        have = list(inspect.signature(fn).parameters)
        if have[:len(params)] != params:
            raise _composer_problem(f"composer.utils.checkpoint.{name}{tuple(have)} is not "
                                    f"{name}({', '.join(params)}, ...)")
    reader = getattr(ckpt, "FileSystemReaderWithValidation", None)
    if reader is None or not {"read_metadata", "read_data"} <= set(vars(reader)):
        raise _composer_problem("FileSystemReaderWithValidation.read_metadata/read_data are gone")
    subclasses = list(reader.__subclasses__())
    while subclasses:  # they may extend read_data (download first), not replace the reads
        cls = subclasses.pop()
        subclasses += cls.__subclasses__()
        if "read_metadata" in vars(cls):
            raise _composer_problem(f"{cls.__name__} reads sharded metadata its own way")
    if not callable(getattr(modules["composer.checkpoint.load"], "load_resumption_checkpoint",
                            None)):
        raise _composer_problem("composer.checkpoint.load.load_resumption_checkpoint is gone")
    for name, module in modules.items():
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError) as e:
            raise _composer_problem(f"the source of {name} cannot be read ({e})") from None
        for where, call in unpickler_calls(source):
            top = where.split(".")[0]
            if top not in REPLACED.get(name, set()):
                raise _composer_problem(f"{name}.{where} calls {call}")
    # torch: the scope's environment variable must turn weights_only=False into True
    buf = io.BytesIO()
    torch.save({"probe": _Probe()}, buf)
    buf.seek(0)
    with weights_only_scope():
        try:
            torch.load(buf, weights_only=False)
        except pickle.UnpicklingError:
            return
    raise _composer_problem(f"torch {torch.__version__} ignores {FORCE_ENV}")


def _rebind(replacements: dict[int, Any]) -> None:
    """Point every name a loaded composer module binds to a replaced function at its
    replacement (``replacements``: id(original) -> replacement)."""
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "composer" or mod_name.startswith("composer.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in replacements and callable(value):
                setattr(module, attr, replacements[id(value)])


def guard_checkpoint_loads() -> None:
    """Make every Composer checkpoint load in this process refuse pickled code (see the
    module docstring). Idempotent; raises ``RuntimeError`` when this Composer's load path
    is not the one the guard knows."""
    import composer.checkpoint.load as new_load
    from composer.utils import checkpoint as ckpt

    if getattr(ckpt, _MARK, False):
        return
    with _install_lock:
        if getattr(ckpt, _MARK, False):
            return
        _audit()
        originals = {
            ckpt._torch_load_with_validation: _weights_only_torch_load,
            ckpt.load_checkpoint: _guarded_load_checkpoint(ckpt.load_checkpoint),
            new_load.load_resumption_checkpoint: _refuse_resumption_checkpoint,
        }
        _rebind({id(k): v for k, v in originals.items()})
        reader = ckpt.FileSystemReaderWithValidation
        reader.read_metadata = _read_metadata
        reader.read_data = _scoped_read_data(reader.read_data)
        setattr(ckpt, _MARK, True)


def is_guarded() -> bool:
    """Whether :func:`guard_checkpoint_loads` has been installed in this process."""
    ckpt = sys.modules.get("composer.utils.checkpoint")
    return bool(ckpt is not None and getattr(ckpt, _MARK, False))
