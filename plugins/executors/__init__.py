"""Executors for data stages: a local process pool (default), in-process serial, and Ray.

The runner builds one executor per stage run, so an executor instance lives as long as one
stage: ``local`` keeps one process pool on the instance for every ``map`` of that stage (a
stage with several passes starts its workers once) and shuts it down in ``close()``, when the
instance is garbage-collected (the runner drops it when the stage ends), or at interpreter
exit, whichever comes first. ``ray`` lives in ``ray_executor``, which imports Ray only when a
``map`` runs, so listing or validating recipes never imports it.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from recipe_engine import Executor, Problems, hookimpl

from .ray_executor import RayExecutor


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: the kernel SIGKILLs this worker when the stage's process dies
    (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves no worker writing into the scratch
    directory the next attempt uses. Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was set
        os._exit(1)


@dataclass(kw_only=True)
class SerialExecutor(Executor,
                     name="serial",
                     description="run tasks one after another in the runner's process"):
    """Runs every task in the calling process; for debugging and tiny inputs."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            yield fn(item)

    def close(self) -> None:
        """Nothing to release."""


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container or
    ``taskset`` narrows), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _shutdown(pool: Any) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


@dataclass(kw_only=True)
class LocalExecutor(Executor,
                    name="local",
                    description="process pool on this machine (spawn), results in input order"):
    """A process pool on this machine; ``num_workers: 0`` means one per usable CPU core.

    One pool per executor instance, started at the first ``map`` that has more than one task
    and reused by every later ``map`` (workers are spawned as tasks need them, up to
    ``num_workers``). ``close()`` shuts it down; so does garbage collection of the instance
    and interpreter exit. A worker that dies leaves the pool broken: the ``map`` fails and
    shuts it down, and the next ``map`` starts a new one. Usable as a context manager
    (``with LocalExecutor() as ex: ...``)."""

    num_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pool: Any = None
        self._finalizer: weakref.finalize | None = None

    def check(self, problems: Problems) -> None:
        problems.require(self.num_workers >= 0, "num_workers",
                         f"{self.num_workers} is negative; 0 means one per CPU core")

    def workers(self) -> int:
        return self.num_workers or usable_cpus()

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        if min(self.workers(), len(items)) <= 1:
            yield from map(fn, items)
            return
        from concurrent.futures.process import BrokenProcessPool

        pool = self._get_pool()
        try:
            yield from pool.map(fn, items)  # stopped early: pool.map cancels what is queued
        except BrokenProcessPool:  # a worker died (killed, out of memory): start afresh
            self.close()
            raise

    def _get_pool(self) -> Any:
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the runner may hold threads (progress display, torch) already
            self._pool = ProcessPoolExecutor(self.workers(), mp_context=mp.get_context("spawn"),
                                             initializer=_die_with_parent,
                                             initargs=(os.getpid(),))
            self._finalizer = weakref.finalize(self, _shutdown, self._pool)
        return self._pool

    def close(self) -> None:
        """Shut the pool down (waiting for running tasks; queued ones are cancelled). The
        executor stays usable: a later ``map`` starts a new pool."""
        finalizer, self._pool, self._finalizer = self._finalizer, None, None
        if finalizer is not None:
            finalizer()

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # the pool stays with its owner
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_finalizer")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _pool=None, _finalizer=None)


@hookimpl
def recipe_components():
    return [LocalExecutor, SerialExecutor, RayExecutor]


@hookimpl
def recipe_default_executor():
    return {"name": "local"}
