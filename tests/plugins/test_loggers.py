"""The metrics loggers (``tensorboard``, ``wandb``, ``mlflow``) and checkpoint upload
(``object_store``): each destination is built as the training stage builds it and fed by a
real Composer ``Trainer`` on a tiny model for a few batches, offline. What each wrote is read
back with the library's own reader (TensorBoard's ``EventAccumulator``, W&B's transaction
log, MLflow's client, boto3 on moto's S3 server) and compared with the losses the trainer
logged."""
from __future__ import annotations

import glob
import struct
import sys
from pathlib import Path

import pytest

from recipe_engine import RecipeError, StageError
from recipe_engine.plugins import PluginManager

RUN = "pretrain"  # the stage label the training stage passes as the run name
LOSS = "loss/train/total"


def logger(spec: dict):
    """A logger component built from its recipe form, as the training stage receives it."""
    return PluginManager().registry.build("logger", spec)


def fit(tiny_trainer, run_dir: Path, loggers: list, batches: int = 4,
        keep: int = 2) -> dict[int, float]:
    """Train the ``tiny_trainer`` classifier for ``batches`` batches with the training
    stage's checkpoint settings (fixed run name, checkpoints in ``<run_dir>/checkpoints``
    every 2 batches, autoresume); return the loss the trainer logged at each step."""
    from composer.loggers import InMemoryLogger

    memory = InMemoryLogger()
    trainer = tiny_trainer(
        max_duration=f"{batches}ba", loggers=[*loggers, memory], run_name="train",
        save_folder=str(run_dir / "checkpoints"), save_interval="2ba",
        save_num_checkpoints_to_keep=keep, save_overwrite=True, autoresume=True)
    trainer.fit()
    trainer.close()
    return {int(ts.batch): float(v) for ts, v in memory.data[LOSS]}


# -- validation, cheap -----------------------------------------------------------------------


def test_loggers_are_registered_and_validate():
    reg = PluginManager().registry
    assert {"tensorboard", "wandb", "mlflow", "object_store"} <= set(reg.names("logger"))
    assert logger({"name": "wandb"}).mode == "offline"
    assert logger({"name": "mlflow"}).tracking_uri == ""
    for spec, key, words in [
        ({"name": "object_store", "uri": "s3://AKIAX:hunter2@bucket/x"}, "uri", "user-info"),
        ({"name": "object_store", "uri": "s3://bucket/x?X-Amz-Signature=hunter2"}, "uri", "query"),
        ({"name": "object_store", "uri": "ftp://bucket/x"}, "uri", "not supported"),
        ({"name": "object_store", "uri": "my-bucket/x"}, "uri", "not a URI"),
        ({"name": "object_store", "uri": "s3://bucket", "num_attempts": 0}, "num_attempts", ">= 1"),
        ({"name": "mlflow", "tracking_uri": "https://me:hunter2@mlflow.example"}, "tracking_uri",
         "user-info"),
        ({"name": "mlflow", "tracking_uri": "databricks"}, "tracking_uri", "not a URI"),
        ({"name": "wandb", "project": "a/b"}, "project", "W&B names"),
        ({"name": "wandb", "tags": ["x" * 65]}, "tags", "1 to 64"),
        ({"name": "tensorboard", "flush_interval": 0}, "flush_interval", ">= 1"),
        ({"name": "tensorboard", "log_dir": "s3://b/tb"}, "log_dir", "local directory"),
    ]:
        with pytest.raises(RecipeError) as e:
            logger(spec)
        text = str(e.value)
        assert f"{key}:" in text and words in text, (spec, text)
        assert "hunter2" not in text, text  # a refused secret is not repeated
    assert logger({"name": "object_store", "uri": "s3://bucket/runs/"}).key_prefix("pre train") \
        == "runs/pre-train"


def test_recipe_validation_names_the_logger_and_its_key(training_recipe_problems):
    text = training_recipe_problems({
        "model": {"name": "llama", "dim": 64, "n_layers": 2, "n_heads": 4},
        "max_duration": "10ba",
        "loggers": [{"name": "tensorboard"}, {"name": "wandb", "mode": "onlin"},
                    {"name": "object_store", "uri": "s3://key:hunter2@bucket/runs"}]})
    assert "loggers" in text and "mode" in text and "'offline'" in text, text
    assert "user-info" in text and "hunter2" not in text, text


def test_a_missing_library_fails_at_build_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(StageError, match=r"recipe-engine\[loggers\]"):
        logger({"name": "wandb"}).build(tmp_path, RUN)


# -- each destination under a real trainer ---------------------------------------------------


def test_tensorboard_event_files_hold_the_loss(tmp_path, tiny_trainer):
    pytest.importorskip("tensorboard", reason="the loggers extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "work"
    tb = logger({"name": "tensorboard", "flush_interval": 2})
    losses = fit(tiny_trainer, run_dir, [tb.build(run_dir, RUN)])
    events = run_dir / "logs" / "tensorboard" / RUN
    assert glob.glob(str(events / "events.out.tfevents.*")), sorted(run_dir.rglob("*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert LOSS in acc.Tags()["scalars"], acc.Tags()
    written = {e.step: e.value for e in acc.Scalars(LOSS)}
    assert sorted(written) == sorted(losses) and len(losses) == 4
    assert written == pytest.approx(losses, rel=1e-6)  # float32 in the event file


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header
    (``:W&B``, magic, version), then LevelDB-log-style chunks in 32 KiB blocks, each
    ``crc32 (4) | length (2) | type (1) | data``; type 1 is a whole record, 2/3/4 its first /
    middle / last part."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left - 7
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_wandb_offline_run_holds_the_loss_without_login_or_network(tmp_path, monkeypatch,
                                                                  tiny_trainer):
    pytest.importorskip("wandb", reason="the loggers extra is not installed")
    for key in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))  # nothing in the home directory
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a request would fail

    run_dir = tmp_path / "work"
    wb = logger({"name": "wandb", "project": "micro", "tags": ["test"]})
    losses = fit(tiny_trainer, run_dir, [wb.build(run_dir, RUN)])
    runs = sorted((run_dir / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(run_dir.rglob("*"))
    (log,) = runs[0].glob("run-*.wandb")
    history: dict[int, float] = {}
    run_records = []
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_records.append(record.run)
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            if LOSS in items:
                history[int(items["_step"])] = float(items[LOSS])
    assert history == pytest.approx(losses) and len(losses) == 4
    assert run_records and run_records[0].project == "micro" and run_records[0].display_name == RUN
    assert list(run_records[0].tags) == ["test"]


def test_mlflow_local_store_holds_the_loss_and_resume_continues_the_run(tmp_path, monkeypatch,
                                                                       tiny_trainer):
    pytest.importorskip("mlflow", reason="the loggers extra is not installed")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_RUN_ID", "DATABRICKS_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    import mlflow
    from mlflow import MlflowClient

    run_dir = tmp_path / "work"
    ml = logger({"name": "mlflow", "experiment_name": "micro"})
    first = fit(tiny_trainer, run_dir, [ml.build(run_dir, RUN)], batches=4)
    assert mlflow.active_run() is None  # ended when the trainer closed
    # a second attempt in the same run directory resumes from the checkpoint at batch 4
    second = fit(tiny_trainer, run_dir, [ml.build(run_dir, RUN)], batches=6)
    assert sorted(second) == [4, 5]

    db = run_dir / "logs" / "mlflow" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("micro")
    assert experiment.artifact_location.startswith((run_dir / "logs" / "mlflow").resolve().as_uri())
    (run,) = client.search_runs([experiment.experiment_id])  # one run, continued on resume
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, LOSS)}
    assert history == pytest.approx({**first, **second}) and len(history) == 6


def test_object_store_uploads_every_checkpoint_byte_identical(tmp_path, moto_s3, tiny_trainer):
    from composer.utils import get_file

    moto_s3.create_bucket(Bucket="ckpt-bucket")
    run_dir = tmp_path / "work"
    up = logger({"name": "object_store", "uri": "s3://ckpt-bucket/runs/micro"})
    fit(tiny_trainer, run_dir, [up.build(run_dir, RUN)], batches=4, keep=1)  # keeps ba4 locally
    prefix = f"runs/micro/{RUN}/"
    listed = moto_s3.list_objects_v2(Bucket="ckpt-bucket", Prefix=prefix)
    keys = sorted(o["Key"][len(prefix):] for o in listed.get("Contents", []))
    assert keys == [".credentials_validated_successfully", "checkpoints/ep0-ba2-rank0.pt",
                    "checkpoints/ep0-ba4-rank0.pt", "checkpoints/latest-rank0.pt.symlink"], keys

    local = sorted((run_dir / "checkpoints").glob("ep*.pt"))
    assert [p.name for p in local] == ["ep0-ba4-rank0.pt"]  # ba2 rotated out, kept remotely
    body = moto_s3.get_object(Bucket="ckpt-bucket", Key=prefix + "checkpoints/ep0-ba4-rank0.pt")
    assert body["Body"].read() == local[0].read_bytes()
    pointer = moto_s3.get_object(Bucket="ckpt-bucket",
                                 Key=prefix + "checkpoints/latest-rank0.pt.symlink")
    assert pointer["Body"].read().decode() == prefix + "checkpoints/ep0-ba4-rank0.pt"
    # Composer's own loader follows the pointer to the newest checkpoint
    fetched = tmp_path / "fetched.pt"
    get_file(f"s3://ckpt-bucket/{prefix}checkpoints/latest-rank0.pt.symlink", str(fetched))
    assert fetched.read_bytes() == local[0].read_bytes()
    staged = sorted(p.name for p in (run_dir / ".upload").rglob("*"))
    assert not staged, staged  # staged copies removed after upload


# -- through the training stage --------------------------------------------------------------


def test_composer_train_feeds_its_loggers_and_uploads_its_checkpoints(tmp_path, moto_s3):
    """The stage builds each logger with its work directory and label: TensorBoard gets the
    loss and the stage's monitors (learning rate, throughput), the bucket every checkpoint,
    and the event files end up in the artifact."""
    pytest.importorskip("tensorboard", reason="the loggers extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_training import make_shards, stage

    from recipe_engine.testing import run_stage

    moto_s3.create_bucket(Bucket="ckpt-bucket")
    shards = make_shards(tmp_path / "shards", None, n_train=64, n_val=16)
    train = stage(max_duration="4ba", save_interval="2ba", loggers=[
        {"name": "tensorboard"}, {"name": "object_store", "uri": "s3://ckpt-bucket/runs"}])
    art = run_stage(train, tmp_path / "run", {"shards": shards})
    label = "composer_train-test"  # run_stage's stage label and fingerprint ("test"), cut to 8

    events = art.path / "logs" / "tensorboard" / label  # copied from the work directory
    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert LOSS in scalars and len(acc.Scalars(LOSS)) == 4, scalars
    assert any(t.startswith("lr-") for t in scalars), scalars  # LRMonitor
    listed = moto_s3.list_objects_v2(Bucket="ckpt-bucket", Prefix=f"runs/{label}/checkpoints/")
    keys = {o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])}
    assert {"ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "latest-rank0.pt.symlink"} <= keys, keys
