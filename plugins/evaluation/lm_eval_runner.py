"""lm-eval on our models: ``make_lm`` (a module in memory -> lm-eval's own ``HFLM``) and
``run_lm_eval`` (``simple_evaluate`` for the ``lm_eval`` stage, offline).

One model path: the model component's ``to_hf`` converts the module to a transformers model
(``LlamaForCausalLM`` for ``llama``) and the runtime tokenizer's ``hf_tokenizer`` gives the
fast tokenizer with the same ids; these are what ``hf_export`` saves, so the stage scores
exactly what ``lm_eval --model hf`` scores on the export.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator

from recipe_engine import ModelConfig, StageContext, StageError


def _offline() -> None:
    # before lm_eval / datasets are imported: they read these at import time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hf_pair(module: Any, model_spec: dict[str, Any], tokenizer: Any, device: Any = None,
            build: Callable[[Any, Any], Any] | None = None) -> tuple[Any, Any]:
    """``module`` as a transformers model (fp32, eval mode, on ``device``; ``None``: the
    module's) and ``tokenizer`` as a transformers fast tokenizer. ``model_spec`` is
    ``model.json``'s content (name, params, vocab_size, max_seq_len); ``build`` a stage's
    ``ctx.build`` (by default the installed plugins' registry). A model or tokenizer without
    a Hugging Face form is a ``StageError`` saying why."""
    if build is None:
        from recipe_engine import PluginManager

        build = PluginManager().registry.build
    config = build(ModelConfig, {"name": model_spec["name"], **model_spec["params"]})
    try:
        hf = config.to_hf(module, model_spec["vocab_size"], model_spec["max_seq_len"],
                          bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id, device=device)
        tok = tokenizer.hf_tokenizer(model_spec["max_seq_len"])
    except (NotImplementedError, ValueError) as e:
        raise StageError(f"lm-eval scores a model through its Hugging Face form: {e}") from e
    return hf, tok


def make_lm(module: Any, model_spec: dict[str, Any], tokenizer: Any, batch_size: int | str,
            device: Any = None, build: Callable[[Any, Any], Any] | None = None) -> Any:
    """lm-eval's ``HFLM`` (``BoundaryHFLM``: one crash case handled) on a copy of ``module``
    (see ``hf_pair``), with the model's context as ``max_length``; the module itself is left
    as it is (it may go on training)."""
    _offline()
    from .lm_eval_model import BoundaryHFLM

    hf, tok = hf_pair(module, model_spec, tokenizer, device, build)
    with quiet_hflm():
        return BoundaryHFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size,
                            max_length=int(model_spec["max_seq_len"]))


@contextlib.contextmanager
def quiet_hflm() -> Iterator[None]:
    """Around ``HFLM(pretrained=<model object>)``: it warns that a model object makes its
    loading options moot, which is the point here."""
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)


def run_lm_eval(stage: Any, ctx: StageContext) -> dict[str, Any]:
    """The ``lm_eval`` stage: its checkpoint through ``make_lm``, then the task lookup and
    ``simple_evaluate`` call the in-loop evaluator makes too (``inloop``)."""
    _offline()
    from . import flatten_results
    from .inloop import evaluate_tasks, task_manager
    from .runtime import check_vocab, load_checkpoint, load_tokenizer, pick_device

    manager = task_manager(list(stage.tasks))
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"].path)
    module, spec = load_checkpoint(ctx.inputs["checkpoint"].path, ctx.build)
    check_vocab(spec, tokenizer, "lm_eval")
    lm = make_lm(module, spec, tokenizer, stage.batch_size, device=pick_device(), build=ctx.build)
    del module
    ctx.log(f"tasks {stage.tasks}, {stage.num_fewshot}-shot, on {lm.device} "
            f"({type(lm.model).__name__} through lm-eval's HFLM)")
    results = evaluate_tasks(stage, lm, manager)
    if lm.healed:
        ctx.log(f"{lm.healed} continuations merged whole into their context's last tokens; "
                "scored from where the encodings part (lm-eval's HFLM stops on those)")
    flat = flatten_results(results)
    ctx.metrics.update(flat)
    ctx.meta.update(flat)
    for task in stage.tasks:
        ctx.log(", ".join(f"{k}={v:.4f}" for k, v in flat.items() if k.startswith(task + "/")))
    return {key: results[key] for key in
            ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
             "higher_is_better", "n-samples", "config") if key in results}
