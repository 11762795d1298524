"""Metrics loggers for the training stages (kind ``logger``), chosen in the recipe as
``composer_train``'s ``loggers: [{name: ...}]``. Each builds one of Composer's
``LoggerDestination``s; Composer and the logging libraries are imported inside ``build``.

* ``tensorboard``: Composer's ``TensorboardLogger``; event files under ``logs/tensorboard``.
* ``wandb``: Composer's ``WandBLogger``, offline by default (files under ``logs/wandb``,
  for ``wandb sync`` later; no login, nothing sent).
* ``mlflow``: Composer's ``MLFlowLogger`` into a local SQLite tracking store by default
  (``logs/mlflow/mlflow.db``, artifacts beside it); a tracking server only when named.
* ``object_store``: Composer's ``RemoteUploaderDownloader``: every checkpoint the trainer
  saves is also uploaded to ``s3://`` / ``gs://`` / ``oci://`` (credentials from the
  environment only). Upload only: resume reads the stage's own local checkpoints.

The default directories are under ``<run_dir>/logs`` (``run_dir``: the stage's work
directory, which survives a crashed attempt, so a resumed run appends to the same files);
:func:`keep_logs` copies that directory into the stage's output when the run ends, since the
work directory is removed on commit. The libraries come with the ``loggers`` extra
(``pip install 'recipe-engine[loggers]'``); a logger whose library is missing validates and
fails when the stage starts, naming the extra.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from recipe_engine import Component, Problems, StageError

LOGS_DIR = "logs"  # under the run directory; keep_logs copies it into the output
EXTRA = "pip install 'recipe-engine[loggers]'"
OBJECT_STORE_SCHEMES = ("s3", "gs", "oci")
MLFLOW_SCHEMES = ("sqlite", "file", "http", "https")
_WANDB_BAD = re.compile(r"[/\\#?%:]")  # not allowed in W&B project / entity names
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(kw_only=True)
class MetricsLogger(Component, kind="logger"):
    """Where a training run's metrics also go (beside the stage's own ``metrics.jsonl``)."""

    def build(self, run_dir: Path, run_name: str) -> Any:
        """A ``composer.loggers.LoggerDestination``; ``run_dir`` is the stage's work
        directory (for offline files), ``run_name`` the stage's label."""
        raise NotImplementedError


def keep_logs(run_dir: Path, output: Path) -> list[str]:
    """Copy ``<run_dir>/logs`` (the loggers' offline files) to ``<output>/logs``; call it on
    rank 0 after ``trainer.close()``. Returns the copied files, relative to ``output``."""
    src = Path(run_dir) / LOGS_DIR
    if not src.is_dir():
        return []
    dst = Path(output) / LOGS_DIR
    shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=True)
    return sorted(str(p.relative_to(output)) for p in dst.rglob("*") if p.is_file())


def _need(logger: str, module: str, package: str) -> None:
    """Import ``module`` or fail the stage with the install command for the extra."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise StageError(f"logger {logger!r} needs the {package} package, which is not "
                         f"installed ({e}): {EXTRA}") from e


def _safe(name: str) -> str:
    """``name`` with characters other than letters, digits, ``.``, ``_``, ``-`` replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _check_uri(problems: Problems, key: str, uri: str, schemes: tuple[str, ...]) -> None:
    """A URI with one of ``schemes`` and no credentials in it (no user-info, no query
    string: those come from the environment). The message never repeats a secret."""
    parts = urlsplit(uri)
    if not parts.scheme:
        problems.add(key, f"{uri!r} is not a URI; write one of "
                          f"{', '.join(s + '://' for s in schemes)}...")
        return
    if parts.scheme not in schemes:
        problems.add(key, f"scheme {parts.scheme!r} is not supported here; use one of "
                          f"{', '.join(s + '://' for s in schemes)}")
    if "@" in parts.netloc:
        problems.add(key, f"the {parts.scheme}:// URI carries user-info (credentials) before "
                          "'@': remove it and give credentials through the environment")
    if parts.query or parts.fragment or uri.rstrip().endswith(("?", "#")):
        problems.add(key, f"the {parts.scheme}:// URI has a query string or fragment (a signed "
                          "URL or token?): remove it and give credentials through the environment")


# -- TensorBoard ----------------------------------------------------------------------------


@dataclass(kw_only=True)
class TensorBoard(MetricsLogger, name="tensorboard",
                  description="TensorBoard event files (Composer's TensorboardLogger)"):
    """Composer's ``TensorboardLogger``: every metric the trainer logs (loss, learning
    rate, throughput...) as TensorBoard scalars, in ``<log_dir>/<run name>/``."""

    log_dir: str = ""  # "": <run_dir>/logs/tensorboard
    flush_interval: int = 100  # batches between writes to disk (and at each eval / the end)

    def check(self, problems: Problems) -> None:
        problems.require(self.flush_interval >= 1, "flush_interval",
                         f"must be >= 1, got {self.flush_interval}")
        problems.require("://" not in self.log_dir, "log_dir",
                         f"{self.log_dir!r}: a local directory, not a URL (to copy event files "
                         "to an object store, add the object_store logger)")

    def build(self, run_dir: Path, run_name: str) -> Any:
        _need("tensorboard", "tensorboard", "tensorboard")
        base = Path(self.log_dir).expanduser() if self.log_dir else \
            Path(run_dir) / LOGS_DIR / "tensorboard"
        return _tensorboard_class()(log_dir=str(base), flush_interval=self.flush_interval,
                                    name=_safe(run_name))


@functools.cache
def _tensorboard_class() -> type:
    from composer.loggers import TensorboardLogger

    class NamedTensorboardLogger(TensorboardLogger):
        """Writes into ``<log_dir>/<name>`` (the stage's label), not into the trainer's fixed
        run name, so runs sharing a ``log_dir`` stay apart."""

        def __init__(self, *, name: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._name = name

        def init(self, state: Any, logger: Any) -> None:
            self.run_name = self._name
            self._initialize_summary_writer()

    return NamedTensorboardLogger


# -- Weights & Biases -----------------------------------------------------------------------


@dataclass(kw_only=True)
class WandB(MetricsLogger, name="wandb",
            description="Weights & Biases, offline by default (Composer's WandBLogger)"):
    """Composer's ``WandBLogger``. ``mode: offline`` (the default) writes the run under
    ``<run_dir>/logs/wandb/`` and sends nothing, with no login; upload it later with
    ``wandb sync <dir>``. ``online`` needs ``WANDB_API_KEY`` (or ``wandb login``) in the
    environment. The W&B run id is derived from the run directory, so a resumed stage
    continues the same W&B run."""

    project: str = "recipe-engine"
    entity: str = ""  # "": the account's default entity
    group: str = ""
    tags: list[str] = field(default_factory=list)
    mode: Literal["offline", "online", "disabled"] = "offline"

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.project.strip()), "project", "must not be empty")
        for key in ("project", "entity"):
            value = getattr(self, key)
            problems.require(not _WANDB_BAD.search(value) and len(value) <= 128, key,
                             f"{value!r}: W&B names are at most 128 characters, without / \\ # ? % :")
        for tag in self.tags:
            problems.require(isinstance(tag, str) and 1 <= len(tag) <= 64, "tags",
                             f"{tag!r}: W&B tags are 1 to 64 characters")

    def build(self, run_dir: Path, run_name: str) -> Any:
        _need("wandb", "wandb", "wandb")
        import wandb

        root = Path(run_dir) / LOGS_DIR
        root.mkdir(parents=True, exist_ok=True)
        where = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
        init_kwargs: dict[str, Any] = {
            "mode": self.mode,
            "dir": str(root),  # the run goes to <root>/wandb/
            "id": f"{_safe(run_name)[:48]}-{where}",  # stable across attempts: resume
            "resume": "allow",
            "settings": wandb.Settings(silent=True, console="off"),
        }
        return _wandb_class()(project=self.project, entity=self.entity or None,
                              group=self.group or None, name=run_name,
                              tags=list(self.tags) or None, init_kwargs=init_kwargs)


@functools.cache
def _wandb_class() -> type:
    from composer.loggers import WandBLogger

    class OfflineSafeWandBLogger(WandBLogger):
        """Never fetches checkpoints from W&B: Composer's autoresume asks every logger
        destination for one, and W&B's would call its web API (a login, the network).
        ``init`` is Composer's for one run on rank 0, reading the run's URL the way current
        wandb offers it (``run.url``; Composer 0.32 calls ``run.get_url()``, which wandb
        has since removed)."""

        def init(self, state: Any, logger: Any) -> None:
            import atexit

            import wandb
            from composer.utils import dist

            if self._init_kwargs.get("name") is None:
                self._init_kwargs["name"] = state.run_name
            if self._enabled:
                run = self._run = wandb.init(**self._init_kwargs)
                self.run_dir = getattr(run, "dir", None)
                self.run_url = getattr(run, "url", None)
                names = [str(getattr(run, "entity", None) or "disabled"),
                         str(getattr(run, "project", None) or "disabled")]
                atexit.register(self._set_is_in_atexit)
            else:
                names = [None, None]
            dist.broadcast_object_list(names)
            self.entity, self.project = names

        def post_close(self) -> None:
            """Finish the run this logger started and stop wandb's service process, which
            writes the run's files: ``finish`` alone may return before they are complete,
            and the stage copies them into its artifact right after ``close``."""
            import sys

            import wandb

            run = getattr(self, "_run", None)
            if not self._enabled or run is None or self._is_in_atexit:
                return
            self._run = None
            failed = sys.exc_info() != (None, None, None)
            run.finish(exit_code=1 if failed else 0)
            wandb.teardown(exit_code=1 if failed else 0)

        def download_file(self, remote_file_name: str, destination: str,
                          overwrite: bool = False, progress_bar: bool = True) -> None:
            raise NotImplementedError("the wandb logger does not serve checkpoints")

    return OfflineSafeWandBLogger


# -- MLflow ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MLflow(MetricsLogger, name="mlflow",
             description="MLflow tracking, a local SQLite store by default (Composer's MLFlowLogger)"):
    """Composer's ``MLFlowLogger``. The default tracking store is a SQLite file in the run
    directory (``logs/mlflow/mlflow.db``, run artifacts in ``logs/mlflow/artifacts``); open
    it with ``mlflow ui --backend-store-uri sqlite:///<path>/mlflow.db``. A tracking server
    (``http(s)://``) is contacted only when named; its credentials come from MLflow's
    environment variables (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_USERNAME`` /
    ``_PASSWORD``). With the default store, a resumed stage continues the same MLflow run."""

    tracking_uri: str = ""  # "": sqlite:///<run_dir>/logs/mlflow/mlflow.db
    experiment_name: str = "recipe-engine"
    log_system_metrics: bool = False  # CPU / GPU / memory samples (psutil; pynvml on GPU)

    def check(self, problems: Problems) -> None:
        if self.tracking_uri:
            _check_uri(problems, "tracking_uri", self.tracking_uri, MLFLOW_SCHEMES)
        problems.require(bool(self.experiment_name.strip()), "experiment_name", "must not be empty")

    def build(self, run_dir: Path, run_name: str) -> Any:
        _need("mlflow", "mlflow", "mlflow-skinny")
        local = not self.tracking_uri
        artifacts = None
        uri = self.tracking_uri
        if local:
            _need("mlflow", "sqlalchemy", "sqlalchemy (mlflow's SQLite store)")
            _need("mlflow", "alembic", "alembic (mlflow's SQLite store)")
            home = (Path(run_dir) / LOGS_DIR / "mlflow").resolve()
            home.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{home / 'mlflow.db'}"
            artifacts = (home / "artifacts").as_uri()
        return _mlflow_class()(
            experiment_name=self.experiment_name, run_name=run_name, tracking_uri=uri,
            log_system_metrics=self.log_system_metrics, artifact_location=artifacts,
            # a local store belongs to this run directory: continue its run on resume. On a
            # shared server the trainer's fixed run name would join other runs: start anew
            resume=local)


@functools.cache
def _mlflow_class() -> type:
    from composer.loggers import MLFlowLogger

    class LocalMLFlowLogger(MLFlowLogger):
        """Creates the experiment with its artifacts beside a local store (MLflow would put
        them in ``./mlruns`` of the working directory), and ends the MLflow run it started
        when the trainer closes, so a later stage in the same process starts its own."""

        def __init__(self, *, artifact_location: str | None, **kwargs: Any) -> None:
            if artifact_location:
                from composer.utils import dist
                from mlflow import MlflowClient

                if dist.get_global_rank() == 0:
                    client = MlflowClient(kwargs["tracking_uri"])
                    if client.get_experiment_by_name(kwargs["experiment_name"]) is None:
                        client.create_experiment(kwargs["experiment_name"],
                                                 artifact_location=artifact_location)
            super().__init__(**kwargs)

        def post_close(self) -> None:
            super().post_close()
            import mlflow

            active = mlflow.active_run()
            if self._enabled and active is not None and active.info.run_id == self._run_id:
                status = self._mlflow_client.get_run(self._run_id).info.status
                mlflow.end_run(status=status if status in ("FINISHED", "FAILED", "KILLED")
                               else "FAILED")

    return LocalMLFlowLogger


# -- object store: checkpoint upload --------------------------------------------------------


@dataclass(kw_only=True)
class ObjectStoreUpload(MetricsLogger, name="object_store",
                        description="upload every checkpoint to s3:// / gs:// / oci://"):
    """Composer's ``RemoteUploaderDownloader``: every checkpoint the trainer saves is also
    uploaded, to ``<uri>/<run name>/checkpoints/<file>`` (with the ``latest-rank0.pt.symlink``
    pointer Composer's ``load_path`` follows), and so is every file another logger hands
    to the trainer for upload (TensorBoard's event files, under ``tensorboard_logs/``).
    Checkpoints the stage rotates out locally stay in the store; the stage's final model
    (the ``checkpoint`` artifact) stays in the recipe store.

    Credentials come from the environment only (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``S3_ENDPOINT_URL`` for an S3-compatible
    server; Google's application-default credentials or ``GCS_KEY`` / ``GCS_SECRET``; OCI's
    config file): a URI with user-info or a query string is refused. Upload only: a
    resumed stage reads its own local checkpoints, never the store's."""

    uri: str
    num_attempts: int = 3  # tries per file on a transient error

    def check(self, problems: Problems) -> None:
        _check_uri(problems, "uri", self.uri, OBJECT_STORE_SCHEMES)
        if urlsplit(self.uri).scheme in OBJECT_STORE_SCHEMES:
            bucket = urlsplit(self.uri).netloc
            problems.require(bool(_BUCKET.match(bucket)) or "@" in bucket, "uri",
                             f"{bucket!r} is not a bucket name (letters, digits, '.', '_', '-')")
        problems.require(self.num_attempts >= 1, "num_attempts",
                         f"must be >= 1, got {self.num_attempts}")

    def key_prefix(self, run_name: str) -> str:
        """The object-name prefix of this run: the URI's path, then the run name."""
        path = urlsplit(self.uri).path.strip("/")
        return f"{path}/{_safe(run_name)}" if path else _safe(run_name)

    def build(self, run_dir: Path, run_name: str) -> Any:
        parts = urlsplit(self.uri)
        if parts.scheme == "s3":
            _need("object_store", "boto3", "boto3")
        prefix = self.key_prefix(run_name)
        staging = Path(run_dir) / ".upload"
        return _uploader_class()(
            bucket_uri=f"{parts.scheme}://{parts.netloc}",
            backend_kwargs={"bucket": parts.netloc, "prefix": prefix},
            run_dir=Path(run_dir), key_prefix=prefix, num_attempts=self.num_attempts,
            upload_staging_folder=str(staging), use_procs=False, num_concurrent_uploads=1)


@functools.cache
def _uploader_class() -> type:
    from composer.loggers import RemoteUploaderDownloader

    class CheckpointUploader(RemoteUploaderDownloader):
        """Names objects relative to the run directory (the trainer's checkpoint names carry
        its local path), rewrites Composer's ``.symlink`` pointer files to the full object
        name, and refuses downloads (no resume from the store)."""

        def __init__(self, *, run_dir: Path, key_prefix: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._run_dir = run_dir
            self._key_prefix = key_prefix
            self._roots = {str(p).strip("/") for p in
                           (run_dir, Path(os.path.abspath(run_dir)), run_dir.resolve())}

        def object_name(self, remote_file_name: str) -> str:
            """The name under the key prefix: relative to the run directory when it is
            a file of it, else as the trainer gave it."""
            name = remote_file_name.lstrip("/")
            for root in self._roots:
                if root and name.startswith(root + "/"):
                    return name[len(root) + 1:]
            return name

        def upload_file(self, state: Any, remote_file_name: str, file_path: Any, *,
                        overwrite: bool) -> None:
            name = self.object_name(remote_file_name)
            if not name.endswith(".symlink"):
                super().upload_file(state, name, file_path, overwrite=overwrite)
                return
            # a pointer file holds the target's object name, with the run's local path in it
            target = self.object_name(Path(file_path).read_text().strip())
            Path(self._upload_staging_folder).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self._upload_staging_folder,
                                             suffix=".symlink") as f:
                f.write(f"{self._key_prefix}/{target}")
                f.flush()
                super().upload_file(state, name, f.name, overwrite=overwrite)  # copies it

        def download_file(self, remote_file_name: str, destination: str,
                          overwrite: bool = False, progress_bar: bool = True) -> None:
            raise NotImplementedError("object_store uploads only; resume uses local checkpoints")

        def post_close(self) -> None:
            """After every upload finished: remove the staging folder. Composer leaves a
            staged copy behind when one name is logged again before its first copy was
            queued (the checkpoint pointer, rewritten at each save)."""
            super().post_close()
            shutil.rmtree(self._upload_staging_folder, ignore_errors=True)

    return CheckpointUploader


COMPONENTS: list[type] = [TensorBoard, WandB, MLflow, ObjectStoreUpload]
