"""Functional correctness of generated code: the ``code_exec_eval`` stage, its problems and
pass@k.

Problems come from the standard library of the interpreter that runs the stage: every
module-level function of the listed modules whose docstring holds doctest examples. A
problem's prompt is the module's top-level imports, then the function's decorators,
signature and docstring; the model writes the body. Its check is the docstring's doctest
examples, run with ``doctest`` in the namespace of prompt + completion; its canonical
solution is the real function's body. A candidate is kept only when

* its examples call the function by its bare name and never import its module (else they
  could pass by calling the real function),
* the canonical solution passes the check in the sandbox, and
* the prompt with an empty body (``pass``) fails it (the check tells something).

Extraction and validation are deterministic for one Python version; the kept problems are
the first ``max_problems`` valid ones in (module, function) order.

Completions are sampled from the checkpoint (greedy when ``temperature`` is 0), cut at the
first line that starts in column 0 (a new top-level statement ends the function), and each
(problem, completion) pair runs once in ``sandbox.run_program``. pass@k is the unbiased
estimator of Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)`` for ``c`` correct of ``n``,
computed as a product, averaged over problems, with the standard error across problems.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from recipe_engine import Problems, Stage, StageContext, StageError

from .sandbox import OUTCOMES, SandboxLimits, SandboxResult, run_program

# the standard-library modules whose module-level functions give valid problems on CPython
# 3.11 (56 problems: pickletools 23, statistics 17, difflib 7, pickle 2, typing 2, one each
# from collections, doctest, enum, heapq, ipaddress)
DEFAULT_MODULES = ["collections", "difflib", "doctest", "enum", "heapq", "ipaddress", "pickle",
                   "pickletools", "statistics", "typing"]

TOP_LEVEL = re.compile(r"^\S", re.M)  # a line that starts in column 0 ends the completion


@dataclass(frozen=True)
class CodeProblem:
    task_id: str  # "module.function"
    entry_point: str  # the function's name
    prompt: str  # imports + decorators + signature + docstring, ends with "\n"
    canonical: str  # the real body (the completion that must pass)
    examples: str  # the doctest text the check runs
    test: str  # Python source: runs the examples against the program's namespace
    context: str  # Python source run before the prompt: the module's other names in scope

    def program(self, completion: str) -> str:
        """What the sandbox runs before ``test``: context, prompt and the completion."""
        return self.context + self.prompt + completion


# -- problems ------------------------------------------------------------------------------

def _top_imports(tree: ast.Module, source: str) -> list[str]:
    """The module's unconditional top-level absolute imports, as source lines."""
    lines = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom) and (node.level or node.module == "__future__"):
                continue
            lines.append(ast.get_source_segment(source, node) or "")
    return [line for line in lines if line]


def _check_source(examples: str, name: str) -> str:
    return textwrap.dedent(f"""\
        import doctest as _doctest
        import sys as _sys
        _runner = _doctest.DocTestRunner(verbose=False)
        _test = _doctest.DocTestParser().get_doctest({examples!r}, dict(globals()), {name!r},
                                                     None, 0)
        _failed, _tried = _runner.run(_test, out=_sys.stdout.write, clear_globs=True)
        assert _tried > 0, "no doctest example ran"
        assert _failed == 0, f"{{_failed}} of {{_tried}} doctest examples failed"
        """)


def _context_source(module: str, name: str) -> str:
    """The module's other globals, as the function sees them in its module (helpers such
    as ``statistics._ss``); the function itself is left out."""
    return (f"import {module} as _module\n"
            f"globals().update({{_k: _v for _k, _v in vars(_module).items()\n"
            f"                  if not _k.startswith('__') and _k != {name!r}}})\n"
            f"del _module\n")


def _calls_bare(examples: list[Any], name: str, module: str) -> bool:
    call = re.compile(rf"(?<![\w.]){re.escape(name)}\s*\(")
    imports_module = re.compile(rf"^\s*(import|from)\s+{re.escape(module.split('.')[0])}\b", re.M)
    return (any(call.search(e.source) for e in examples)
            and not any(imports_module.search(e.source) for e in examples))


def extract_problems(modules: Iterable[str]) -> tuple[list[CodeProblem], dict[str, int]]:
    """Candidate problems (not yet validated) from ``modules``, in (module, function) order,
    and the candidates left out per reason."""
    import doctest

    parser = doctest.DocTestParser()
    problems: list[CodeProblem] = []
    dropped: dict[str, int] = {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for module_name in sorted(set(modules)):
        try:
            module = importlib.import_module(module_name)
            path = inspect.getsourcefile(module)
            source = Path(path).read_text(encoding="utf-8") if path else None
        except (ImportError, OSError, TypeError, UnicodeDecodeError):
            drop("module_without_source")
            continue
        if source is None:
            drop("module_without_source")
            continue
        tree = ast.parse(source)
        header = "\n".join(_top_imports(tree, source))
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=False)
            if not doc or ">>>" not in doc:
                continue
            if node.name.startswith("_") or isinstance(node, ast.AsyncFunctionDef):
                drop("private_or_async")
                continue
            examples = parser.get_examples(inspect.cleandoc(doc))
            if not examples:
                drop("no_examples")
                continue
            if not _calls_bare(examples, node.name, module_name):
                drop("examples_do_not_call_it")
                continue
            if len(node.body) < 2:
                drop("docstring_only")
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            doc_end = node.body[0].end_lineno
            head = "".join(lines[first:doc_end])
            body = "".join(lines[doc_end:node.end_lineno])
            if head.startswith((" ", "\t")):  # not a module-level def (cannot happen at top)
                drop("indented")
                continue
            prompt = (header + "\n\n\n" if header else "") + head
            text = inspect.cleandoc(doc)
            problems.append(CodeProblem(
                task_id=f"{module_name}.{node.name}", entry_point=node.name, prompt=prompt,
                canonical=body, examples=text, test=_check_source(text, node.name),
                context=_context_source(module_name, node.name)))
    return problems, dropped


def validate_problems(candidates: Sequence[CodeProblem], limits: SandboxLimits,
                      max_problems: int = 0, workers: int = 2,
                      ) -> tuple[list[CodeProblem], dict[str, int]]:
    """The candidates whose canonical body passes and whose empty body fails, in order (the
    first ``max_problems`` of them when it is > 0), and the rejected counted per reason."""
    kept: list[CodeProblem] = []
    dropped: dict[str, int] = {}

    def check(problem: CodeProblem) -> str:
        good = run_program(problem.program(problem.canonical), problem.test, limits)
        if not good.passed:
            return f"canonical_{good.outcome}"
        empty = run_program(problem.program("    pass\n"), problem.test, limits)
        return "empty_body_passes" if empty.passed else ""

    chunk = max(1, workers) * 2
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(candidates), chunk):
            batch = candidates[start:start + chunk]
            for problem, reason in zip(batch, pool.map(check, batch)):
                if reason:
                    dropped[reason] = dropped.get(reason, 0) + 1
                elif not max_problems or len(kept) < max_problems:
                    kept.append(problem)
            if max_problems and len(kept) >= max_problems:
                break
    return kept, dropped


# -- pass@k --------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``c`` correct of ``n`` samples: ``1 - C(n-c, k) / C(n, k)``,
    as the product ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); no
    stderr for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def truncate_completion(text: str) -> str:
    """The function body: ``text`` up to the first line that starts in column 0."""
    match = TOP_LEVEL.search(text)
    return text if match is None else text[:match.start()]


def score_completions(problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]],
                      ks: Sequence[int], limits: SandboxLimits, workers: int = 2,
                      progress: Callable[[int, int], None] | None = None,
                      ) -> dict[str, Any]:
    """Run every completion of every problem in the sandbox; pass@k per problem and overall.

    ``completions[i]`` are the ``n`` samples for ``problems[i]`` (the same ``n`` for all).
    Identical (problem, completion) pairs run once."""
    if len(problems) != len(completions) or not problems:
        raise ValueError("one list of completions per problem, and at least one problem")
    n = len(completions[0])
    if any(len(c) != n for c in completions) or n < 1:
        raise ValueError("every problem needs the same number (>= 1) of completions")
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"every k in {list(ks)} must be between 1 and n={n}")
    unique = sorted({(i, text) for i, samples in enumerate(completions) for text in samples})
    results: dict[tuple[int, str], SandboxResult] = {}

    def job(key: tuple[int, str]) -> SandboxResult:
        problem = problems[key[0]]
        return run_program(problem.program(key[1]), problem.test, limits)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (key, result) in enumerate(zip(unique, pool.map(job, unique)), 1):
            results[key] = result
            if progress:
                progress(done, len(unique))

    rows = []
    outcomes = {o: 0 for o in OUTCOMES}
    for i, (problem, samples) in enumerate(zip(problems, completions)):
        sample_rows = []
        for text in samples:
            result = results[(i, text)]
            outcomes[result.outcome] += 1
            sample_rows.append({"completion": text, "outcome": result.outcome,
                                "detail": result.detail[:300]})
        correct = sum(r["outcome"] == "passed" for r in sample_rows)
        rows.append({"task_id": problem.task_id, "num_samples": n, "num_correct": correct,
                     **{f"pass@{k}": pass_at_k(n, correct, k) for k in ks},
                     "samples": sample_rows})
    metrics: dict[str, float] = {}
    for k in ks:
        mean, stderr = mean_and_stderr([r[f"pass@{k}"] for r in rows])
        metrics[f"pass@{k}"] = mean
        if stderr is not None:
            metrics[f"pass@{k}_stderr"] = stderr
    metrics["num_problems"] = len(rows)
    metrics["num_samples"] = len(rows) * n
    metrics["num_sandbox_runs"] = len(unique)
    for outcome, count in outcomes.items():
        metrics[f"outcome/{outcome}"] = count
    return {"metrics": metrics, "problems": rows}


# -- sampling ------------------------------------------------------------------------------

def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], n: int, *,
                       temperature: float, top_p: float, max_new_tokens: int, seed: int,
                       batch_size: int, max_seq_len: int, device: Any = "cpu",
                       progress: Callable[[int, int], None] | None = None) -> list[list[str]]:
    """``n`` completions of each prompt, each cut where a line starts in column 0 (or at
    ``eos`` or ``max_new_tokens``). Rows are batched across prompts and samples; a context
    longer than the model's window keeps its last ``max_seq_len`` tokens. No KV cache: each
    step runs the window again (the models this runs on CPU are small)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = [(p, s) for p in range(len(prompts)) for s in range(n)]
    encoded = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    out: list[list[str]] = [[""] * n for _ in prompts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seqs = [list(encoded[p]) for p, _ in chunk]
        generated: list[list[int]] = [[] for _ in chunk]
        texts = [""] * len(chunk)
        active = list(range(len(chunk)))
        for _step in range(max_new_tokens):
            if not active:
                break
            windows = [seqs[r][-max_seq_len:] for r in active]
            width = max(len(w) for w in windows)
            inputs = torch.zeros(len(windows), width, dtype=torch.long)
            for j, w in enumerate(windows):
                inputs[j, :len(w)] = torch.as_tensor(w)
            with torch.inference_mode():
                logits = model(inputs.to(device)).float()
            last = torch.stack([logits[j, len(w) - 1] for j, w in enumerate(windows)]).cpu()
            tokens = _pick(last, temperature, top_p, generator)
            still = []
            for r, token in zip(active, tokens):
                if token == tokenizer.eos_id:
                    continue
                seqs[r].append(token)
                generated[r].append(token)
                texts[r] = tokenizer.decode(generated[r])
                if TOP_LEVEL.search(texts[r]) is None:
                    still.append(r)
            active = still
        for r, (p, s) in enumerate(chunk):
            out[p][s] = truncate_completion(texts[r])
        if progress:
            progress(min(start + batch_size, len(rows)), len(rows))
    return out


def _pick(logits: Any, temperature: float, top_p: float, generator: Any) -> list[int]:
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the better tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first one stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()


# -- the stage -----------------------------------------------------------------------------

@dataclass(kw_only=True)
class CodeExecEval(Stage,
                   name="code_exec_eval",
                   version="1",
                   description="pass@k of sampled completions on stdlib doctest problems, "
                               "run in a sandbox",
                   inputs={"checkpoint": "checkpoint", "tokenizer": "tokenizer"},
                   output="eval_report"):
    """Functional correctness (pass@k) of the model's completions of standard-library
    functions, each checked by its own doctests in a sandboxed process."""

    modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))
    max_problems: int = 0  # 0: every valid problem
    n: int = 10  # samples per problem
    ks: list[int] = field(default_factory=lambda: [1, 10])
    temperature: float = 0.8  # 0: greedy (then n must be 1)
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int = 1234
    batch_size: int = 16  # rows (problem x sample) generated at once
    timeout_s: float = 10.0  # wall clock per program
    cpu_s: int = 5
    memory_mb: int = 1024
    workers: int = 2  # sandboxed programs run at once

    def check(self, problems: Problems) -> None:
        problems.require(bool(self.modules), "modules", "is empty; name at least one module")
        problems.require(self.max_problems >= 0, "max_problems",
                         f"{self.max_problems} must be >= 0 (0: all)")
        problems.require(self.n >= 1, "n", f"{self.n} must be >= 1")
        problems.require(bool(self.ks), "ks", "is empty; give at least one k (1 for pass@1)")
        for k in self.ks:
            problems.require(1 <= k <= self.n, "ks",
                             f"k={k} must be between 1 and n={self.n} (pass@k needs n >= k)")
        problems.require(len(set(self.ks)) == len(self.ks), "ks", f"{self.ks} repeats a k")
        problems.require(self.temperature >= 0, "temperature",
                         f"{self.temperature} must be >= 0 (0: greedy)")
        problems.require(self.temperature > 0 or self.n == 1, "n",
                         f"greedy decoding (temperature 0) gives one completion; n={self.n} "
                         "samples would be copies: set n: 1 or a temperature > 0")
        problems.require(0 < self.top_p <= 1, "top_p", f"{self.top_p} must be in (0, 1]")
        for key in ("max_new_tokens", "batch_size", "cpu_s", "memory_mb", "workers"):
            problems.require(getattr(self, key) >= 1, key, f"{getattr(self, key)} must be >= 1")
        problems.require(self.timeout_s > 0, "timeout_s", f"{self.timeout_s} must be > 0")

    def limits(self) -> SandboxLimits:
        return SandboxLimits(timeout_s=self.timeout_s, cpu_s=self.cpu_s,
                             memory_mb=self.memory_mb)

    def fingerprint_extra(self) -> str:
        """The interpreter (its stdlib is the problem set and the sandbox's runtime) and
        the listed modules' source files."""
        digest = hashlib.sha256(sys.version.encode() + sys.executable.encode())
        for name in sorted(set(self.modules)):
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            origin = getattr(spec, "origin", None)
            digest.update(name.encode() + b"\0")
            if origin and Path(origin).is_file():
                digest.update(Path(origin).read_bytes())
        return digest.hexdigest()

    def run(self, ctx: StageContext) -> None:
        from .runtime import check_vocab, load_checkpoint, load_tokenizer, pick_device

        unknown = [m for m in self.modules if importlib.util.find_spec(m.split(".")[0]) is None]
        if unknown:
            raise StageError(f"modules: no module {unknown} in this Python's standard library")
        limits = self.limits()
        candidates, dropped = extract_problems(self.modules)
        problems, rejected = validate_problems(candidates, limits, self.max_problems,
                                               self.workers)
        for reason, count in {**dropped, **rejected}.items():
            ctx.count(f"dropped.{reason}", count)
        if not problems:
            raise StageError(f"no valid problem in modules {self.modules} "
                             f"(left out: {dropped}, failed validation: {rejected})")
        ctx.log(f"{len(problems)} problems from {len(self.modules)} modules "
                f"({len(candidates)} candidates)")

        tokenizer = load_tokenizer(ctx.inputs["tokenizer"].path)
        model, spec = load_checkpoint(ctx.inputs["checkpoint"].path, ctx.build)
        check_vocab(spec, tokenizer, "code_exec_eval")
        device = pick_device()
        model.to(device)
        completions = sample_completions(
            model, tokenizer, [p.prompt for p in problems], self.n,
            temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, seed=self.seed, batch_size=self.batch_size,
            max_seq_len=spec["max_seq_len"], device=device,
            progress=lambda done, total: ctx.progress(done, total, "samples"))
        scored = score_completions(problems, completions, self.ks, limits, self.workers,
                                   progress=lambda done, total: ctx.progress(done, total, "runs"))
        metrics = {f"code_exec/{k}": v for k, v in scored["metrics"].items()}
        metrics["code_exec/num_candidates"] = len(candidates)
        ctx.metrics.update(metrics)
        ctx.meta.update(metrics)
        ctx.count("problems", len(problems))
        report = {
            "metrics": metrics,
            "settings": {"modules": sorted(set(self.modules)), "n": self.n, "ks": self.ks,
                         "temperature": self.temperature, "top_p": self.top_p,
                         "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                         "limits": asdict(limits), "python": sys.version.split()[0],
                         "left_out": dropped, "failed_validation": rejected},
            "problems": scored["problems"],
        }
        (ctx.output / "report.json").write_text(json.dumps(report, indent=1))
        ctx.log(", ".join(f"{k}={v:.4f}" for k, v in scored["metrics"].items()
                          if k.startswith("pass@") and not k.endswith("stderr")))
