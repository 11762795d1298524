"""code_exec_eval: stdlib doctest problems, pass@k, the sandboxed scoring and the stage."""
import json
import math
import subprocess
import sys
import sysconfig
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import part_name, read_eval_report, write_documents
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.evaluation.code_exec import (
    DEFAULT_MODULES, CodeExecEval, _pick, extract_problems, mean_and_stderr, pass_at_k,
    score_completions, truncate_completion, validate_problems)
from recipe_engine_plugins.evaluation.sandbox import SandboxLimits
from recipe_engine_plugins.models import Llama, save_model
from recipe_engine_plugins.tokenizers.train import SentencePieceBPE

LIMITS = SandboxLimits(timeout_s=10, cpu_s=5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- pass@k ----------------------------------------------------------------------------------


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_known_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 1, 4) == 1.0  # n - c < k: some draw of 4 holds the correct one
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12)
    # large n: the product form stays finite and exact where the binomials are huge
    assert pass_at_k(1000, 7, 500) == pytest.approx(float(_exact(1000, 7, 500)), rel=1e-12)
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_and_stderr():
    assert mean_and_stderr([0.5]) == (0.5, None)
    mean, stderr = mean_and_stderr([0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5 and stderr == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_truncate_completion_stops_at_top_level():
    assert truncate_completion("    return 1\n\ndef g():\n    pass\n") == "    return 1\n\n"
    assert truncate_completion("    x = 1\n    return x\nprint(f())") == \
        "    x = 1\n    return x\n"
    assert truncate_completion("    return 1") == "    return 1"
    assert truncate_completion("class A: pass") == ""


def test_top_p_keeps_the_best_token():
    logits = torch.tensor([[0.1, 3.0, 0.2, 2.9], [5.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert _pick(logits, 1.0, 1e-6, gen) == [1, 0]
    assert _pick(logits, 0.0, 1.0, gen) == [1, 0]
    # top_p = 0.6 of [~.47, ~.43, ...]: only the first two can come out
    drawn = {t for _ in range(200) for t in _pick(logits[:1], 1.0, 0.6, gen)}
    assert drawn <= {1, 3} and len(drawn) == 2


# -- problems ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    candidates, dropped = extract_problems(["statistics", "heapq", "difflib"])
    assert candidates == extract_problems(["difflib", "heapq", "statistics"])[0]  # ordered
    kept, rejected = validate_problems(candidates, LIMITS, max_problems=5)
    assert len(kept) == 5
    return kept


def test_problems_are_prompts_checks_and_solutions(problems):
    ids = [p.task_id for p in problems]
    assert ids == sorted(ids, key=lambda t: (t.rsplit(".", 1)[0], ids.index(t)))
    assert ids[0].startswith("difflib.")
    for p in problems:
        module, name = p.task_id.rsplit(".", 1)
        assert p.entry_point == name and not name.startswith("_")
        assert f"def {name}(" in p.prompt and p.prompt.endswith("\n")
        assert ">>>" in p.prompt and ">>>" in p.examples  # the docstring is in the prompt
        assert p.canonical.strip() and p.canonical.lstrip("\n").startswith((" ", "\t"))
        assert truncate_completion(p.canonical) == p.canonical  # a body, nothing after
        assert f"import {module} as _module" in p.context and name in p.context


def test_canonical_solutions_score_one_and_empty_bodies_zero(problems):
    n = 2
    canonical = score_completions(problems, [[p.canonical] * n for p in problems], [1, 2],
                                  LIMITS)
    assert canonical["metrics"]["pass@1"] == 1.0 and canonical["metrics"]["pass@2"] == 1.0
    assert canonical["metrics"]["pass@1_stderr"] == 0.0
    assert canonical["metrics"]["num_sandbox_runs"] == len(problems)  # duplicates run once
    empty = score_completions(problems, [["    pass\n"] * n for p in problems], [1], LIMITS)
    assert empty["metrics"]["pass@1"] == 0.0 and empty["metrics"]["outcome/failed"] == 2 * 5
    # one right of two: pass@1 = 0.5, pass@2 = 1 for every problem
    mixed = score_completions(problems, [[p.canonical, "    return None\n"] for p in problems],
                              [1, 2], LIMITS)
    assert mixed["metrics"]["pass@1"] == 0.5 and mixed["metrics"]["pass@2"] == 1.0
    assert all(r["num_correct"] == 1 for r in mixed["problems"])


def test_hostile_completions_are_contained_and_counted(problems, tmp_path):
    victim = tmp_path / "pwned"
    hostile = [f"    import os\n    os.system('echo pwned > {victim}')\n",
               "    while True:\n        pass\n",
               "    import os\n    while True:\n        os.fork()\n",
               "    import os\n    os._exit(0)\n"]
    limits = SandboxLimits(timeout_s=2, cpu_s=2)
    scored = score_completions(problems[:1], [hostile], [1, 4], limits)
    m = scored["metrics"]
    assert m["pass@1"] == 0.0 and m["pass@4"] == 0.0
    assert (m["outcome/refused"], m["outcome/timeout"], m["outcome/error"]) == (2, 1, 1)
    assert not victim.exists()
    assert [s["outcome"] for s in scored["problems"][0]["samples"]] == \
        ["refused", "timeout", "refused", "error"]


def test_bad_params_rejected():
    for bad in ({"n": 2, "ks": [1, 5]}, {"ks": []}, {"temperature": 0.0, "n": 4, "ks": [1]},
                {"modules": []}, {"top_p": 0.0}, {"max_problems": -1}, {"timeout_s": 0},
                {"ks": [1, 1]}, {"workers": 0}, {"temperature": -1.0}):
        with pytest.raises(RecipeError):
            CodeExecEval(**bad)
    CodeExecEval(temperature=0.0, n=1, ks=[1])


def test_registered_and_light():
    assert PluginManager().registry.get("stage", "code_exec_eval").cls is CodeExecEval
    code = ("import sys, recipe_engine_plugins.evaluation.code_exec; "
            "print([m for m in ('torch', 'lm_eval', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert CodeExecEval().fingerprint_extra() != CodeExecEval(modules=["heapq"]).fingerprint_extra()
    assert set(DEFAULT_MODULES) >= {"statistics", "heapq"}


# -- the stage, on a tiny random model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("code_exec")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [{"id": p.name, "text": p.read_text(encoding="utf-8"), "source": "stdlib",
             "path": str(p)} for p in sorted((stdlib / "json").glob("*.py"))]
    (root / "docs").mkdir()
    write_documents(root / "docs" / part_name(0), docs)
    tok = run_stage(SentencePieceBPE(vocab_size=400, num_threads=1), root / "tok",
                    inputs={"documents": Artifact(kind="documents", path=root / "docs",
                                                  manifest={"meta": {}})})
    vocab = json.loads((tok.path / "tokenizer.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = Llama(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64)
    save_model(config.build(vocab, 64), config, vocab, 64, root / "ckpt")
    ckpt = Artifact(kind="checkpoint", path=root / "ckpt",
                    manifest={"meta": {"vocab_size": vocab, "seq_len": 64}})
    return {"checkpoint": ckpt, "tokenizer": tok}


def test_stage_end_to_end(tmp_path, tiny):
    stage = CodeExecEval(modules=["heapq", "statistics"], max_problems=2, n=3, ks=[1, 3],
                         temperature=1.0, max_new_tokens=6, batch_size=4, timeout_s=5)
    art = run_stage(stage, tmp_path / "a", inputs=tiny)
    report = read_eval_report(art.path)
    m = report["metrics"]
    assert m["code_exec/num_problems"] == 2 and m["code_exec/num_samples"] == 6
    assert 0.0 <= m["code_exec/pass@1"] <= m["code_exec/pass@3"] <= 1.0
    assert "code_exec/pass@1_stderr" in m
    assert sum(m[f"code_exec/outcome/{o}"] for o in
               ("passed", "failed", "error", "timeout", "memory", "refused")) == 6
    rows = report["report"]["problems"]
    assert [r["task_id"] for r in rows] == ["heapq.merge", "statistics.mean"]
    for row in rows:
        assert len(row["samples"]) == 3 and row["num_samples"] == 3
        assert row["pass@1"] == pass_at_k(3, row["num_correct"], 1)
        for sample in row["samples"]:  # cut at the first top-level line
            assert truncate_completion(sample["completion"]) == sample["completion"]
    assert report["report"]["settings"]["n"] == 3
    assert art.manifest["counts"]["problems"] == 2
    # same seed, same samples and outcomes
    again = run_stage(stage, tmp_path / "b", inputs=tiny)
    assert (again.path / "report.json").read_bytes() == (art.path / "report.json").read_bytes()
