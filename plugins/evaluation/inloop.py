"""``lm_eval_tasks``: the ``lm_eval`` stage's task spec as an ``Evaluator``, scored on a model
held in memory (``composer_train``'s ``in_loop_eval``, every N batches of training).

Same parameters, defaults and checks as the stage (``LmEvalTaskSpec``), same task lookup and
the same ``simple_evaluate`` call (``evaluate_tasks``), so a checkpoint scores the same here
as in an ``lm_eval`` stage. lm_eval and torch are imported inside ``evaluate``: this module is
imported whenever the plugin is loaded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from recipe_engine import Evaluator, StageError

from . import TASKS_DIR, LmEvalTaskSpec, flatten_results


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's ``TaskManager`` over the shipped tasks only, unless a task is one of
    lm-eval's own (indexing those takes seconds); an unknown task is a ``StageError``."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise StageError(f"lm-eval knows no task {unknown}; shipped tasks are in {TASKS_DIR}")
    return manager


def evaluate_tasks(spec: LmEvalTaskSpec, lm: Any, manager: Any) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``spec`` on the lm-eval model ``lm``: its results."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
        limit=spec.limit or None, batch_size=spec.batch_size, task_manager=manager,
        random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed, bootstrap_iters=spec.bootstrap_iters,
        log_samples=False,
    )
    if results is None:
        raise StageError("lm_eval.simple_evaluate returned no results")
    return results


def make_lm_for(module: Any, model_spec: dict[str, Any], tokenizer: Any, batch_size: int,
                device: Any) -> Any:
    """The lm-eval model over ``module``, on ``device`` (where it already is: nothing moves):
    lm-eval's ``HFLM`` on the converted model, as the ``lm_eval`` stage scores."""
    from .lm_eval_runner import make_lm

    return make_lm(module, model_spec, tokenizer, batch_size, device=device)


@dataclass(kw_only=True)
class LmEvalTasks(LmEvalTaskSpec, Evaluator,
                  name="lm_eval_tasks",
                  description="lm-evaluation-harness tasks on the model in training (in-loop)"):
    """lm-eval tasks scored on the model during training, with the ``lm_eval`` stage's
    task spec (parameters and checks: ``LmEvalTaskSpec``)."""

    def fingerprint_extra(self) -> str:
        """The shipped task files and lm-eval's version, as for the ``lm_eval`` stage."""
        from . import tasks_fingerprint

        return tasks_fingerprint()

    def evaluate(self, module: Any, model_spec: dict[str, Any], tokenizer: Any) -> dict[str, float]:
        """``{"<task>/<metric>": value, ...}`` as the ``lm_eval`` stage reports them. The
        module is scored where it is (its parameters' device), in the mode it is in; the
        caller puts it in eval mode and keeps its random state (lm-eval seeds Python,
        NumPy and torch). The tokenizer's Hugging Face form is ``tokenizer.hf_tokenizer``,
        which ``composer_train``'s in-loop callback makes once per run and reuses; the
        model's is made at each call (its weights have moved)."""
        # before lm_eval / datasets are imported: they read these at import time
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        if model_spec["vocab_size"] < tokenizer.vocab_size:
            raise StageError(
                f"lm_eval_tasks: the model's vocab_size={model_spec['vocab_size']} is smaller "
                f"than the tokenizer's vocab_size={tokenizer.vocab_size}")
        manager = self.__dict__.get("_manager")
        if manager is None:  # indexing the tasks once per run, not at every evaluation
            manager = self.__dict__["_manager"] = task_manager(list(self.tasks))
        device = next(module.parameters()).device
        lm = make_lm_for(module, model_spec, tokenizer, self.batch_size, device)
        return flatten_results(evaluate_tasks(self, lm, manager))


COMPONENTS = [LmEvalTasks]
