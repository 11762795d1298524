"""Runs lm-eval's ``simple_evaluate`` for the ``lm_eval`` stage, offline."""
from __future__ import annotations

import logging
import os
from typing import Any

from recipe_engine import StageContext, StageError


def run_lm_eval(stage: Any, ctx: StageContext) -> dict[str, Any]:
    # before lm_eval / datasets are imported: they read these at import time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import lm_eval
    from lm_eval.tasks import TaskManager

    from . import TASKS_DIR, flatten_results
    from .lm_eval_model import RecipeEngineLM

    # our own tasks only, unless a task is one of lm-eval's (indexing those takes seconds)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if not all(t in manager.all_tasks for t in stage.tasks):
        manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [t for t in stage.tasks if t not in manager.all_tasks]
    if unknown:
        raise StageError(f"lm-eval knows no task {unknown}; shipped tasks are in {TASKS_DIR}")

    lm = RecipeEngineLM(checkpoint=ctx.inputs["checkpoint"].path,
                        tokenizer=ctx.inputs["tokenizer"].path,
                        batch_size=stage.batch_size, build=ctx.build)
    ctx.log(f"tasks {stage.tasks}, {stage.num_fewshot}-shot, on {lm.device}")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(stage.tasks), num_fewshot=stage.num_fewshot,
        limit=stage.limit or None, batch_size=stage.batch_size, task_manager=manager,
        random_seed=stage.seed, numpy_random_seed=stage.seed, torch_random_seed=stage.seed,
        fewshot_random_seed=stage.seed, bootstrap_iters=stage.bootstrap_iters,
        log_samples=False,
    )
    if results is None:
        raise StageError("lm_eval.simple_evaluate returned no results")
    flat = flatten_results(results)
    ctx.metrics.update(flat)
    ctx.meta.update(flat)
    for task in stage.tasks:
        ctx.log(", ".join(f"{k}={v:.4f}" for k, v in flat.items() if k.startswith(task + "/")))
    return {key: results[key] for key in
            ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
             "higher_is_better", "n-samples", "config") if key in results}
