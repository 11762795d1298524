"""Post-training: the ``sft`` and ``dpo`` stages and the chat template they share.

**The template** (ChatML): a conversation is rendered as ``[bos]``, then for every message
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a prompt for generation ends with
``<|im_start|>assistant\\n``. ``<|im_start|>`` and ``<|im_end|>`` must be special tokens the
tokenizer declares (``special_tokens`` of ``sentencepiece_bpe`` / ``hf_byte_bpe``; one id
each): a stage given a tokenizer without them fails and says so. ``render_chat`` is the one
place the layout is written: it gives the token ids and, per id, whether it is a training
target (the assistant's content and its ``<|im_end|>``, so the model learns to stop; never
the role header, the other roles' turns, nor the newline between turns). Each piece is
encoded on its own and the ids concatenated: the header ``<|im_start|>assistant\\n`` and the
reply are the ids a model sees when it generates after that header. ``chat_template()`` is
the same layout as a Jinja string, built from the same constants, for a Hugging Face
tokenizer's ``chat_template`` (rendered text, then ``tokenizer(text)``, which prepends
``<s>``); both stages record it in their checkpoint's meta.

**Data** comes through the data stages as documents records (docs/artifacts.md,
"Post-training data"): conversations ``{"messages": [...]}`` for ``sft``, preferences
``{"prompt": [...], "chosen", "rejected"}`` for ``dpo``. Records marked ``split: heldout``
(``heldout_split``) are the validation set. A record that fails the schema is skipped and
counted (``skipped.<reason>``), and past ``max_skip_fraction`` the stage fails.

**Training** is the pretraining stage's: Composer's ``Trainer`` with the same ``optimizer``,
``scheduler`` and ``parallelism`` sub-components, Composer checkpoints in the stage's work
directory with ``autoresume`` (a killed stage resumes at its last checkpoint, at the same
batch of the same epoch order), a fingerprint of the tokenized training data in every
checkpoint. The output is a ``checkpoint`` artifact of the pretrained model's architecture
and context (``model.safetensors`` + ``model.json``), so ``heldout_eval``, ``lm_eval``,
``code_exec_eval`` and ``hf_export`` read it unchanged. Both stages are ``distributed`` as
``composer_train`` is, through the same launcher (``worker.run_share``): more than one
process per node, or more than one node, and each node launches its share of the ranks
into one run; node 0 commits.

This module stays light (no torch at import); the training bodies are in ``trainer.py``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from recipe_engine import Problems, Stage, StageContext, StageError
from recipe_engine.artifacts import chat_record_problem

from . import AdamW, CosineWarmup, Optimizer, Parallelism, Scheduler, SingleDevice, _check_time

CHAT_START = "<|im_start|>"  # opens a turn; the role follows
CHAT_END = "<|im_end|>"  # closes a turn's content
ROLE_SEP = "\n"  # between the role and the content
TURN_SEP = "\n"  # after CHAT_END
CHAT_TOKENS = (CHAT_START, CHAT_END)
CHAT_FORMAT = "chatml"
IGNORE_INDEX = -100
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(ep|ba|sp)\s*$", re.I)


# -- the chat template -------------------------------------------------------------------------


def chat_token_ids(tokenizer: Any, where: str = "chat template") -> tuple[int, int]:
    """The ids of ``<|im_start|>`` and ``<|im_end|>`` in ``tokenizer.special_tokens``; a clear
    error when the tokenizer does not declare them."""
    special = getattr(tokenizer, "special_tokens", None) or {}
    missing = [t for t in CHAT_TOKENS if t not in special]
    if missing:
        raise StageError(
            f"{where}: the tokenizer declares no {' / '.join(missing)} special token "
            f"(declared: {sorted(special) or 'none'}); the chat template needs both as single "
            f"tokens. Add them to the tokenizer stage's params, e.g. special_tokens: "
            f"[\"{CHAT_START}\", \"{CHAT_END}\"] (conf/tokenizer/bpe_8k.yaml declares them), "
            "and pretrain with that tokenizer")
    return int(special[CHAT_START]), int(special[CHAT_END])


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """``messages`` rendered with the chat template: ``(ids, target)``, one flag per id, True
    where the id is a training target (an assistant's content and its ``<|im_end|>``).
    ``add_generation_prompt`` appends an open assistant header (no target) for generation."""
    start, end = chat_token_ids(tokenizer)
    turn_sep = tokenizer.encode(TURN_SEP)
    ids, target = [int(tokenizer.bos_id)], [False]
    for m in messages:
        head = [start, *tokenizer.encode(m["role"] + ROLE_SEP)]
        body = [*tokenizer.encode(m["content"]), end]
        learn = m["role"] == "assistant"
        ids += head + body + turn_sep
        target += [False] * len(head) + [learn] * len(body) + [False] * len(turn_sep)
    if add_generation_prompt:
        head = [start, *tokenizer.encode("assistant" + ROLE_SEP)]
        ids += head
        target += [False] * len(head)
    return ids, target


def render_chat_text(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The text ``chat_template()`` renders for ``messages`` (no ``<s>``)."""
    text = "".join(f"{CHAT_START}{m['role']}{ROLE_SEP}{m['content']}{CHAT_END}{TURN_SEP}"
                   for m in messages)
    return text + (f"{CHAT_START}assistant{ROLE_SEP}" if add_generation_prompt else "")


def chat_template() -> str:
    """The template as a Jinja string for a Hugging Face tokenizer's ``chat_template``
    (``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``, then
    ``tokenizer(text)``, which prepends ``<s>`` as training did)."""
    def lit(s: str) -> str:  # a literal inside the template's text
        return s.replace("{", "{{ '{' }}") if "{" in s else s

    return ("{% for message in messages %}" + lit(CHAT_START) + "{{ message['role'] }}"
            + lit(ROLE_SEP) + "{{ message['content'] }}" + lit(CHAT_END) + lit(TURN_SEP)
            + "{% endfor %}{% if add_generation_prompt %}" + lit(CHAT_START) + "assistant"
            + lit(ROLE_SEP) + "{% endif %}")


def chat_meta(tokenizer: Any) -> dict[str, Any]:
    """What a post-trained checkpoint records about its chat format (artifact ``meta``)."""
    start, end = chat_token_ids(tokenizer)
    return {"chat_format": CHAT_FORMAT, "chat_template": chat_template(),
            "chat_start_id": start, "chat_end_id": end}


# -- the records -------------------------------------------------------------------------------


def conversation_problem(doc: dict[str, Any]) -> str | None:
    """Why a record is no conversation ``sft`` can train on (None when it is one)."""
    return chat_record_problem(doc, "conversation")


def preference_problem(doc: dict[str, Any]) -> str | None:
    """Why a record is no preference triple ``dpo`` can train on (None when it is one)."""
    return chat_record_problem(doc, "preference")


# -- examples, packing -------------------------------------------------------------------------


def truncate(ids: list[int], target: list[bool], max_len: int) -> tuple[list[int], list[bool], bool]:
    """Keep the first ``max_len`` ids; the third value says whether anything was cut."""
    if len(ids) <= max_len:
        return ids, target, False
    return ids[:max_len], target[:max_len], True


def labels_of(ids: Sequence[int], target: Sequence[bool]) -> list[int]:
    """Per position, the id when it is a target, else ``IGNORE_INDEX``."""
    return [i if t else IGNORE_INDEX for i, t in zip(ids, target)]


def pack(examples: Sequence[tuple[list[int], list[int]]], max_len: int
         ) -> list[tuple[list[int], list[int]]]:
    """Greedy packing in the given order: ``(ids, labels)`` examples appended to the current
    row while it stays within ``max_len`` ids, else a new row is started. Each example keeps
    its own labels (the next example's ``bos`` is never a target), so the loss is exactly that
    of the examples; attention is causal over the whole row (no per-example mask)."""
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex_ids, ex_labels in examples:
        if ids and len(ids) + len(ex_ids) > max_len:
            rows.append((ids, labels))
            ids, labels = [], []
        ids = ids + list(ex_ids)
        labels = labels + list(ex_labels)
    if ids:
        rows.append((ids, labels))
    return rows


# -- DPO losses --------------------------------------------------------------------------------


def dpo_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any,
             beta: float, kind: str = "sigmoid") -> tuple[Any, Any, Any]:
    """Per-pair preference losses from sequence log-probabilities (summed over the response
    tokens) of the policy and of the reference model. Returns ``(losses, chosen_rewards,
    rejected_rewards)``; a reward is ``beta * (log pi(y|x) - log pi_ref(y|x))``, the implicit
    reward of Rafailov et al.

    * ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7):
      ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``;
    * ``ipo`` (Azar et al. 2023, eq. 17, with ``tau = beta``):
      ``((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2``.
    """
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; known: sigmoid, ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_stats(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]
                 ) -> dict[str, float]:
    """Mean chosen / rejected reward, mean margin and accuracy (share of pairs whose chosen
    reward is strictly above the rejected one)."""
    n = len(chosen_rewards)
    if not n:
        return {}
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
    return {"rewards_chosen": sum(chosen_rewards) / n,
            "rewards_rejected": sum(rejected_rewards) / n,
            "reward_margin": sum(margins) / n,
            "reward_accuracy": sum(m > 0 for m in margins) / n,
            "num_pairs": n}


# -- the stages --------------------------------------------------------------------------------


def num_batches(max_duration: str, global_batch_size: int, batches_per_epoch: int) -> int:
    """Optimizer steps for ``max_duration`` (``"2ep"``, ``"100ba"``, ``"800sp"``)."""
    m = _DURATION.match(max_duration)
    if not m:
        raise StageError(f"max_duration {max_duration!r}: use ep, ba or sp")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "ep":
        return max(1, math.ceil(value * batches_per_epoch))
    if unit == "sp":
        return max(1, math.ceil(value / global_batch_size))
    return max(1, math.ceil(value))


@dataclass(kw_only=True)
class PostTrainStage(Stage, distributed=True):
    """What ``sft`` and ``dpo`` share (no name: not registered). Distributed like
    ``composer_train``: in a multi-node job node 0 runs the stage and commits it, every
    other node launches its own processes into the same run (``run_follower``)."""

    optimizer: Optimizer = field(default_factory=AdamW)
    scheduler: Scheduler = field(default_factory=CosineWarmup)
    parallelism: Parallelism = field(default_factory=SingleDevice)
    global_batch_size: int = 16  # sequences (sft) or pairs (dpo) per optimizer step
    device_microbatch_size: int = 0  # 0 = the whole device batch
    max_duration: str = "1ep"  # Composer time in ep, ba or sp
    max_seq_len: int = 0  # 0: the checkpoint's context length
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    grad_clip_norm: float = 1.0
    save_interval: str = "50ba"
    num_checkpoints_to_keep: int = 2
    seed: int = 17
    log_interval: int = 10
    eval_batch_size: int = 16  # rows per forward pass when measuring (val loss, rewards)

    def check(self, problems: Problems) -> None:
        m = _DURATION.match(str(self.max_duration))
        if not m:
            problems.add("max_duration", f"{self.max_duration!r} is not a duration in ep, ba or "
                         "sp ('1ep', '200ba', '3200sp')")
        elif float(m.group(1)) <= 0 or (m.group(2).lower() != "ep"
                                        and float(m.group(1)) != int(float(m.group(1)))):
            problems.add("max_duration", f"{self.max_duration!r}: give a positive duration, "
                         "whole in ba and sp")
        problems.require(self.global_batch_size >= 1, "global_batch_size",
                         f"must be >= 1, got {self.global_batch_size}")
        problems.require(self.device_microbatch_size >= 0, "device_microbatch_size",
                         f"must be >= 0 (0 = whole device batch), got {self.device_microbatch_size}")
        if self.device_microbatch_size and self.global_batch_size % self.device_microbatch_size:
            problems.add("device_microbatch_size", f"{self.device_microbatch_size} does not "
                         f"divide global_batch_size={self.global_batch_size}")
        problems.require(self.max_seq_len == 0 or self.max_seq_len >= 8, "max_seq_len",
                         f"must be 0 (the checkpoint's) or at least 8, got {self.max_seq_len}")
        _check_time(problems, "save_interval", self.save_interval, ("ep", "ba", "sp", "dur"),
                    positive=True)
        problems.require(self.num_checkpoints_to_keep >= 1 or self.num_checkpoints_to_keep == -1,
                         "num_checkpoints_to_keep", "must be >= 1, or -1 to keep all, got "
                         f"{self.num_checkpoints_to_keep}")
        problems.require(self.grad_clip_norm >= 0, "grad_clip_norm",
                         f"must be >= 0, got {self.grad_clip_norm}")
        problems.require(self.log_interval >= 1, "log_interval", f"must be >= 1, got {self.log_interval}")
        problems.require(self.eval_batch_size >= 1, "eval_batch_size",
                         f"must be >= 1, got {self.eval_batch_size}")
        if self.device == "cpu" and self.precision != "fp32":
            problems.add("precision", f"{self.precision} needs a GPU; set precision: fp32 for "
                         "device: cpu")
        self.parallelism.check_device(self.device, problems)

    def preflight(self, ctx: StageContext) -> None:
        """What every node checks before launching anything (each worker would find the same
        problems, later and behind the launcher's output): the tokenizer's chat tokens, the
        row length against the checkpoint's context, and ``global_batch_size`` against the
        run's processes (``ctx.num_nodes`` x the parallelism's processes per node)."""
        from recipe_engine.artifacts import load_tokenizer, read_model_spec

        chat_token_ids(load_tokenizer(ctx.inputs["tokenizer"].path), self.name)
        context = int(read_model_spec(ctx.inputs["checkpoint"].path)["max_seq_len"])
        if self.max_seq_len > context:
            raise StageError(f"{self.name}: max_seq_len={self.max_seq_len} is longer than the "
                             f"checkpoint's context of {context} tokens; use at most {context} "
                             "(or 0)")
        nproc = self.parallelism.num_processes_per_node()
        world = nproc * ctx.num_nodes
        if self.global_batch_size % world:
            raise StageError(f"{self.name}: global_batch_size={self.global_batch_size} is not "
                             f"divisible by the run's {world} processes ({ctx.num_nodes} node(s) "
                             f"x {nproc}); use a multiple of {world}")

    def run(self, ctx: StageContext) -> None:
        """One process here, or this node's share of ``ctx.num_nodes`` x the parallelism's
        processes per node, launched (``worker.py``; the workers run ``train_posttrain``)."""
        from .worker import run_share

        self.preflight(ctx)
        run_share(self, ctx)

    def run_follower(self, ctx: StageContext) -> None:
        """On a node other than node 0: launch this node's processes into node 0's run."""
        from .worker import run_share

        self.preflight(ctx)
        run_share(self, ctx)


@dataclass(kw_only=True)
class SFT(PostTrainStage,
          name="sft",
          version="1",
          description="supervised fine-tuning on conversations, loss on the assistant turns",
          inputs={"checkpoint": "checkpoint", "tokenizer": "tokenizer", "documents": "documents"},
          output="checkpoint"):
    """Fine-tune a checkpoint on conversations rendered with the chat template; the loss is
    on the assistant's tokens only. Packs examples into rows (or pads one per row)."""

    packing: bool = True  # greedy packing into max_seq_len rows; false: one example per row

    def describe_plan(self, inputs_meta: dict[str, Any]) -> dict[str, Any]:
        docs = inputs_meta.get("documents") or {}
        return {"conversations": docs.get("num_documents"), "max_duration": self.max_duration}


@dataclass(kw_only=True)
class DPO(PostTrainStage,
          name="dpo",
          version="1",
          description="direct preference optimisation on (prompt, chosen, rejected) triples",
          inputs={"checkpoint": "checkpoint", "tokenizer": "tokenizer", "documents": "documents"},
          output="checkpoint"):
    """Preference-tune a checkpoint (also the frozen reference) on preference triples with
    the DPO (sigmoid) or IPO loss; reference log-probabilities are computed once, up front."""

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"

    def check(self, problems: Problems) -> None:
        super().check(problems)
        problems.require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")

    def describe_plan(self, inputs_meta: dict[str, Any]) -> dict[str, Any]:
        docs = inputs_meta.get("documents") or {}
        return {"pairs": docs.get("num_documents"), "max_duration": self.max_duration,
                "beta": self.beta, "loss": self.loss}


COMPONENTS: list[type] = [SFT, DPO]
