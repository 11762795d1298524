"""Executors for data stages: a local process pool (default) and in-process serial."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from recipe_engine import Executor, hookimpl


@dataclass(kw_only=True)
class SerialExecutor(Executor,
                     name="serial",
                     description="run tasks one after another in the runner's process"):
    """Runs every task in the calling process; for debugging and tiny inputs."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            yield fn(item)


@dataclass(kw_only=True)
class LocalExecutor(Executor,
                    name="local",
                    description="process pool on this machine (spawn), results in input order"):
    """A process pool on this machine; ``num_workers: 0`` means one per CPU core."""

    num_workers: int = 0

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        workers = self.num_workers or os.cpu_count() or 1
        workers = min(workers, len(items))
        if workers <= 1:
            yield from map(fn, items)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the runner may hold threads (progress display, torch) already
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            yield from pool.map(fn, items)


@hookimpl
def recipe_components():
    return [LocalExecutor, SerialExecutor]


@hookimpl
def recipe_default_executor():
    return {"name": "local"}
