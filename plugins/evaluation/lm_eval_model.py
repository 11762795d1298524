"""The trained model as an lm-evaluation-harness model, registered as ``recipe_engine``.

Scoring follows lm-eval's conventions (``TemplateLM``): a context is ``[bos] + encode(context)``
(the model saw ``bos`` at the start of every training document), the continuation's tokens are
those of ``encode(context + continuation)`` past the context's, and a context longer than the
window is truncated on the left. Batches are right-padded: attention is causal, so padding on
the right changes nothing to the left of it.

Usable outside a recipe once this module is imported::

    lm_eval.simple_evaluate(model="recipe_engine",
                            model_args="checkpoint=CKPT_DIR,tokenizer=TOKENIZER_DIR", ...)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from recipe_engine import warn

from .runtime import check_vocab, load_checkpoint, load_tokenizer, pick_device


@register_model("recipe_engine")
class RecipeEngineLM(TemplateLM):
    """A recipe-engine checkpoint + tokenizer, scored and sampled greedily in fp32."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        tokenizer: str | Path | None = None,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        device: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer_obj: Any = None,
        max_length: int | None = None,
        build: Callable[[str, Any], Any] | None = None,
        **ignored: Any,
    ) -> None:
        super().__init__()
        if ignored:
            warn(f"recipe_engine model: ignoring model_args {sorted(ignored)}; it takes "
                 "checkpoint, tokenizer, batch_size, max_gen_toks, device, max_length")
        if tokenizer_obj is None:
            if tokenizer is None:
                raise ValueError("recipe_engine model: pass tokenizer=<tokenizer artifact dir>")
            tokenizer_obj = load_tokenizer(Path(tokenizer))
        if model is None:
            if checkpoint is None:
                raise ValueError("recipe_engine model: pass checkpoint=<checkpoint artifact dir>")
            model, spec = load_checkpoint(Path(checkpoint), build)
            check_vocab(spec, tokenizer_obj, "recipe_engine model")
        self.tok = tokenizer_obj
        self._device = torch.device(device) if device else pick_device()
        self.model = model.to(self._device).eval()
        self._max_length = int(max_length or model.args.max_seq_len)
        if str(batch_size) == "auto":
            warn("recipe_engine model: batch_size=auto is not supported; using 16")
            batch_size = 16
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # -- what TemplateLM asks for ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "recipe_engine_spm"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any
                   ) -> list[int]:
        ids = list(self.tok.encode(string))
        return ids if add_special_tokens is False else [self.tok.bos_id, *ids]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits (fp32) for right-padded rows, each at most ``max_length`` long."""
        width = max(len(r) for r in rows)
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            inputs[i, :len(r)] = torch.as_tensor(r)
        return self.model(inputs.to(self._device)).float()

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None,
                              **_: Any) -> list[tuple[float, bool]]:
        batch_size = override_bs or self.batch_size
        prepared = []
        for _key, context_enc, continuation_enc in requests:
            if not continuation_enc:
                prepared.append(None)
                continue
            # the last max_length + 1 tokens: inputs are all but the last, labels all but the first
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            num_scored = min(len(continuation_enc), len(whole) - 1)
            prepared.append((whole[:-1], whole[-num_scored:]))
        order = sorted((i for i, p in enumerate(prepared) if p), key=lambda i: -len(prepared[i][0]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        pbar = tqdm(total=len(order), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            logits = self._logits([prepared[i][0] for i in chunk])
            for row, i in enumerate(chunk):
                inputs, targets = prepared[i]
                n = len(targets)
                logprobs = F.log_softmax(logits[row, len(inputs) - n:len(inputs)], dim=-1)
                target = torch.as_tensor(targets, device=logprobs.device)
                score = logprobs.gather(1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                out[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            pbar.update(len(chunk))
        pbar.close()
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, *window))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (score, _greedy) in zip(owners, scores):
            totals[index] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id])
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.get("until"), eos=eos or None)
            jobs.append((self.tok_encode(context), [s for s in until if s],
                         int(kwargs["max_gen_toks"])))
        results: list[str] = [""] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        pbar = tqdm(total=len(jobs), disable=disable_tqdm, desc="generate_until")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, text in zip(chunk, self._greedy([jobs[i] for i in chunk])):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            pbar.update(len(chunk))
        pbar.close()
        return results

    def _greedy(self, jobs: list[tuple[list[int], list[str], int]]) -> list[str]:
        """Greedy decoding of several prompts at once (no KV cache: the models are small)."""
        seqs = [list(ctx) for ctx, _, _ in jobs]
        generated: list[list[int]] = [[] for _ in jobs]
        texts = [""] * len(jobs)
        active = [i for i, job in enumerate(jobs) if job[2] > 0]
        while active:
            rows = [seqs[i][-self.max_length:] for i in active]
            logits = self._logits(rows)
            still = []
            for row, i in enumerate(active):
                token = int(logits[row, len(rows[row]) - 1].argmax())
                _ctx, until, max_new = jobs[i]
                if token == self.eot_token_id:
                    continue
                seqs[i].append(token)
                generated[i].append(token)
                texts[i] = self.tok_decode(generated[i])
                cut = min((texts[i].find(s) for s in until if s in texts[i]), default=-1)
                if cut >= 0:
                    texts[i] = texts[i][:cut]
                elif len(generated[i]) < max_new:
                    still.append(i)
            active = still
        return texts
