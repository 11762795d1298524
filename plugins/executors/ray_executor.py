"""The ``ray`` executor: a data stage's tasks as Ray tasks, on a cluster or a local instance.

Ray is an optional extra (``pip install 'recipe-engine[ray]'``) imported only when ``map``
runs: naming the executor in a recipe, validating or planning it needs no Ray.

Connection (once per process; later stages reuse it): ``ray.init(address=address or None,
include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)``. An empty
``address`` starts a local instance (``num_cpus`` of this machine's cores, 0 = all), which
lives until the runner's process exits and whose workers get this process's ``sys.path`` as
their ``PYTHONPATH`` (they import what the runner can, as a local pool's workers do); ``auto`` or ``host:port`` joins a running cluster
(``ray start --head``), ``ray://host:10001`` connects through Ray Client. When Ray is
already initialised in the process (a notebook), that connection is used as it is. Usage
statistics are off unless ``RAY_USAGE_STATS_ENABLED`` says otherwise.

A cluster must see what a local pool sees: the same recipe-engine and plugin packages on
every node, and the stage's scratch directory (``work/<fp>/scratch`` under the store) on a
file system every node mounts at the same path, since tasks write their part files there.

Order and memory: ``map`` keeps at most ``max_in_flight`` tasks submitted and yields results
with ``ray.get`` in input order, so the results, and the files the stage writes from them,
are the same as with ``serial`` or ``local``. A task that raises surfaces its own exception
(unwrapped from ``RayTaskError``); the tasks still in flight are cancelled.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from recipe_engine import Executor, Problems, StageError


@dataclass(kw_only=True)
class RayExecutor(Executor,
                  name="ray",
                  description="Ray tasks on a cluster or a local Ray instance, results in "
                              "input order"):
    """Runs each task as a Ray task (one CPU each); results in input order."""

    address: str = ""  # "" starts a local instance; "auto", "host:6379" or "ray://host:10001"
    num_cpus: int = 0  # local instance only: CPUs it may use (0: all of this machine's)
    max_in_flight: int = 0  # tasks submitted ahead of the one awaited (0: 2 x cluster CPUs)

    def check(self, problems: Problems) -> None:
        problems.require(self.num_cpus >= 0, "num_cpus",
                         f"{self.num_cpus} is negative; 0 means all of this machine's cores")
        problems.require(not (self.address and self.num_cpus), "num_cpus",
                         f"applies only to a local instance (address: \"\"), not to a "
                         f"cluster at {self.address!r}, whose nodes declare their own CPUs; "
                         "remove num_cpus")
        problems.require(self.max_in_flight >= 0, "max_in_flight",
                         f"{self.max_in_flight} is negative; 0 means twice the cluster's CPUs")

    def connect(self) -> Any:
        """The ``ray`` module, initialised (see the module docstring)."""
        try:
            import ray
        except ImportError as e:
            raise StageError("executor ray needs Ray: pip install 'recipe-engine[ray]' "
                             f"(import failed: {e})") from e
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs: dict[str, Any] = {"address": self.address or None,
                                      "ignore_reinit_error": True,
                                      "logging_level": logging.WARNING}
            if not self.address.startswith("ray://"):  # Ray Client takes fewer options
                kwargs.update(include_dashboard=False, log_to_driver=False)
            if not self.address:  # workers import what this process can, as a local pool's
                path = os.pathsep.join(p for p in sys.path if p)
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
            if self.num_cpus:
                kwargs["num_cpus"] = self.num_cpus
            ray.init(**kwargs)
        return ray

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        if not items:
            return
        ray = self.connect()
        remote = ray.remote(num_cpus=1)(fn)
        window = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: collections.deque[Any] = collections.deque()
        todo = iter(items)
        try:
            for item in todo:
                pending.append(remote.remote(item))
                if len(pending) >= window:
                    yield _get(ray, pending.popleft())
            while pending:
                yield _get(ray, pending.popleft())
        finally:
            for ref in pending:  # an error or an abandoned map: stop what is still queued
                try:
                    ray.cancel(ref)
                except Exception:  # already finished, or the cluster is gone
                    pass

    def close(self) -> None:
        """Nothing per stage: a local Ray instance is shared by the run's stages and stops
        when the process exits."""


def _get(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task's own exception, as other executors
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from e
        raise
