"""Checkpoints in and out of the training stages.

* In: the ``checkpoint`` artifact a post-training stage starts from (``load_start``).
* Out: the trained weights, gathered unsharded with torch's state-dict API whatever wraps
  the module (DDP, FSDP, ``torch.compile``; ``gather_weights``), written as a
  ``checkpoint`` artifact (``save_checkpoint_artifact``).
* Composer's own checkpoints in the stage's scratch (``checkpoint_dir``): before autoresume,
  a damaged latest one is replaced by the newest whole one kept (``repair_checkpoints``),
  without unpickling anything.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from recipe_engine import StageContext, StageError


def checkpoint_dir(ctx: StageContext) -> Path:
    """Where Composer writes the stage's checkpoints (scratch: kept across attempts)."""
    return Path(ctx.work) / "checkpoints"


# -- in: the starting checkpoint of post-training ----------------------------------------------


def load_start(stage: Any, ctx: StageContext) -> dict[str, Any]:
    """The tokenizer (checked for the chat tokens), the starting checkpoint's module and spec,
    and the row length."""
    from composer.utils import reproducibility
    from safetensors.torch import load_model as load_weights

    from recipe_engine import ModelConfig
    from recipe_engine.artifacts import checkpoint_weights_path, load_tokenizer, read_model_spec

    from .posttrain import chat_token_ids

    tokenizer = load_tokenizer(ctx.inputs["tokenizer"].path)
    chat_token_ids(tokenizer, stage.name)
    ckpt = ctx.inputs["checkpoint"]
    spec = read_model_spec(ckpt.path)
    if spec["vocab_size"] < tokenizer.vocab_size:
        raise StageError(f"{stage.name}: the checkpoint's vocab_size={spec['vocab_size']} is "
                         f"smaller than the tokenizer's {tokenizer.vocab_size}; was it "
                         "pretrained with this tokenizer?")
    context = int(spec["max_seq_len"])
    max_len = stage.max_seq_len or context
    if max_len > context:
        raise StageError(f"{stage.name}: max_seq_len={max_len} is longer than the checkpoint's "
                         f"context of {context} tokens; use at most {context} (or 0)")
    model_cfg = ctx.build(ModelConfig, {"name": spec["name"], **spec["params"]})
    reproducibility.seed_all(stage.seed)
    module = model_cfg.build(spec["vocab_size"], context)
    load_weights(module, str(checkpoint_weights_path(ckpt.path)))
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    return {"tokenizer": tokenizer, "spec": spec, "model_cfg": model_cfg, "module": module,
            "max_len": max_len, "pad_id": pad_id}


# -- out: the trained weights --------------------------------------------------------------------


def gather_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights of ``module`` (the architecture's module, whatever wraps it or
    its blocks), fp32 on the CPU, under the plain module's names. A collective under FSDP
    (every rank calls it); complete on rank 0, empty on the others when several processes
    run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    return {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
            for k, v in sd.items()}


def save_checkpoint_artifact(state_dict: dict[str, torch.Tensor], model_cfg: Any, vocab_size: int,
                             seq_len: int, output: Path) -> None:
    """Write the checkpoint artifact: the weights, loaded into a fresh module of
    ``model_cfg`` (so that every name fits), as ``model.safetensors``, and ``model.json``."""
    from safetensors.torch import save_model as save_weights

    from recipe_engine.artifacts import WEIGHTS_FILE, write_model_spec

    fresh = model_cfg.build(vocab_size, seq_len)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
    # a tied weight may be gathered under one of its names only; the fresh module ties it
    first_name: dict[int, str] = {}
    tied = set()
    for name, p in fresh.named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            tied.update({name, first_name[id(p)]})
        first_name.setdefault(id(p), name)
    if unexpected or set(missing) - tied:
        raise StageError(f"the trained weights do not fit a fresh {model_cfg.name}: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    save_weights(fresh, str(output / WEIGHTS_FILE))  # the checkpoint artifact
    write_model_spec(output, model_cfg.name, model_cfg.params(), vocab_size, seq_len)


# -- Composer checkpoints left by an earlier attempt -----------------------------------------


def _checkpoint_batch(path: Path) -> int:
    """The batch count in a Composer checkpoint's name (``ep2-ba12-rank0.pt`` -> 12)."""
    for part in path.name.split("-"):
        if part.startswith("ba") and part[2:].isdigit():
            return int(part[2:])
    return -1


def checkpoint_damage(path: Path) -> str:
    """Why the checkpoint file at ``path`` cannot be whole ('' when it looks whole). A
    ``torch.save`` file is a zip archive: it must end with the archive's directory, and every
    member must match its CRC. Nothing is unpickled. A directory (a sharded checkpoint) is
    not checked here."""
    import zipfile

    if path.is_dir():
        return ""
    if not path.is_file():
        return "missing"
    try:
        if not zipfile.is_zipfile(path):
            return "not a complete zip archive (truncated?)"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"member {bad} does not match its checksum" if bad else ""
    except Exception as e:  # noqa: BLE001 (a damaged archive fails in many ways)
        return f"unreadable ({type(e).__name__}: {e})"


def repair_checkpoints(ckpt_dir: Path, rank: int = 0) -> str:
    """Before autoresume: when ``latest-rank{rank}.pt`` names a damaged or missing checkpoint,
    remove it and point ``latest`` at the newest whole checkpoint kept
    (``num_checkpoints_to_keep``), or remove them all, so that the stage starts afresh
    (Composer would fail on every retry). Returns what was done, for the log ('' if nothing)."""
    latest = ckpt_dir / f"latest-rank{rank}.pt"
    if not latest.is_symlink() and not latest.exists():
        return ""
    target = ckpt_dir / os.readlink(latest) if latest.is_symlink() else latest
    why = checkpoint_damage(target)
    if not why:
        return ""
    damaged = f"the latest checkpoint {target.name} is damaged ({why})"
    kept = sorted((p for p in ckpt_dir.glob(f"ep*-ba*-rank{rank}.pt")
                   if p.name != target.name and not p.is_symlink()),
                  key=_checkpoint_batch, reverse=True)
    if target.is_file() and not target.is_symlink():
        target.unlink()
    for candidate in kept:
        if checkpoint_damage(candidate):
            candidate.unlink()
            continue
        tmp = ckpt_dir / f".latest-rank{rank}.pt.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(candidate.name)
        os.replace(tmp, latest)  # one rename: latest always names something
        return f"{damaged}; removed it and resuming from {candidate.name} instead"
    latest.unlink(missing_ok=True)
    return f"{damaged}, and no earlier whole checkpoint was kept; training this stage afresh"
