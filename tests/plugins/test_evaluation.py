"""heldout_eval, lm_eval and their pieces, on a tiny random Llama and a tiny tokenizer."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard

from recipe_engine import Artifact, RecipeError
from recipe_engine.artifacts import part_name, write_documents
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.evaluation import HeldoutEval, LmEval, flatten_results
from recipe_engine_plugins.evaluation.heldout import plan_windows, score_documents
from recipe_engine_plugins.models import Llama, save_model
from recipe_engine_plugins.tokenizers.spm import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_DIR = Path(__file__).parents[2] / "plugins" / "evaluation" / "tasks" / "python_basics"


@pytest.fixture(scope="module")
def tokenizer_artifact(stdlib_tokenizer):
    return stdlib_tokenizer("json", "collections")


@pytest.fixture(scope="module")
def tok(tokenizer_artifact):
    return Tokenizer.load(tokenizer_artifact.path)


def _checkpoint(directory: Path, vocab_size: int, max_seq_len: int = 64, seed: int = 0,
                **params) -> Artifact:
    torch.manual_seed(seed)
    config = Llama(**{"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                      "ffn_hidden_dim": 64, **params})
    save_model(config.build(vocab_size, max_seq_len), config, vocab_size, max_seq_len, directory)
    return Artifact(kind="checkpoint", path=directory,
                    manifest={"meta": {"vocab_size": vocab_size, "seq_len": max_seq_len}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    return _checkpoint(tmp_path_factory.mktemp("ckpt"), tok.vocab_size)


HELDOUT_TEXTS = {
    "b-short": "x = 1\n",
    "a-tabs": "def f(x):\n\tif x:\n\t\treturn  x   \n\n\n    pass\n",
    "c-unicode": "print('日本語 😀🐍 café')  # ünïcode ▁ \ue000\n",
    "d-long": "".join(f"def func_{i}(a, b):\n    return a * {i} + b\n\n" for i in range(12)),
    "e-empty": "",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("shards")
    (root / "val_documents").mkdir()
    docs = [{"id": k, "text": v, "source": "test", "path": None} for k, v in HELDOUT_TEXTS.items()]
    write_documents(root / "val_documents" / part_name(0), docs[:3])
    write_documents(root / "val_documents" / part_name(1), docs[3:])
    meta = {"seq_len": 64, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    return Artifact(kind="shards", path=root, manifest={"meta": meta})


def _model(checkpoint):
    from recipe_engine_plugins.models import load_model

    return load_model(checkpoint.path)


# -- registration --------------------------------------------------------------------------


def test_registered_and_light():
    reg = PluginManager().registry
    assert reg.get("stage", "heldout_eval").cls is HeldoutEval
    assert reg.get("stage", "lm_eval").cls is LmEval
    code = ("import sys, recipe_engine_plugins.evaluation; "
            "print([m for m in ('torch', 'lm_eval', 'transformers', 'datasets') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_params_rejected():
    for bad in ({"stride": -1}, {"batch_size": 0}, {"max_documents": -2}, {"zstd_level": 30}):
        with pytest.raises(RecipeError):
            HeldoutEval(**bad)
    for bad in ({"tasks": []}, {"limit": -1}, {"batch_size": 0}):
        with pytest.raises(RecipeError):
            LmEval(**bad)


# -- sliding windows -----------------------------------------------------------------------


@pytest.mark.parametrize("window,stride", [(1, 1), (4, 1), (4, 2), (4, 4), (7, 3), (16, 8)])
def test_windows_score_every_token_once(window, stride):
    for n in range(1, 40):
        scored = []
        for w in plan_windows(n, window, stride):
            assert 0 <= w.begin < w.end <= n - 1 and w.length <= window
            labels = range(w.begin + 1 + w.skip, w.end + 1)
            for j in labels:  # context of label j is ids[begin:j]
                assert j - w.begin >= min(j, window - stride + 1)
            scored += labels
        assert scored == list(range(1, n)), (n, window, stride)
    with pytest.raises(ValueError):
        plan_windows(10, 4, 5)


def _direct_nll(model, ids, context: int | None = None) -> float:
    """Reference: each token j >= 1 from ids[max(0, j - context):j], one forward per token."""
    total = 0.0
    with torch.no_grad():
        if context is None:  # whole document in one forward pass
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double()[0], -1)
            return -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
        for j in range(1, len(ids)):
            ctx = ids[max(0, j - context):j]
            logp = torch.log_softmax(model(torch.tensor([ctx])).double()[0, -1], -1)
            total -= logp[ids[j]].item()
    return total


def test_windowed_scores_match_direct(checkpoint, tok):
    model = _model(checkpoint)
    docs = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in HELDOUT_TEXTS.values()]
    fits = [d for d in docs if len(d) <= 65]
    assert len(fits) >= 3 and any(len(d) > 65 for d in docs)
    # documents that fit the window: one pass each, whatever the batching and padding
    for batch_size in (1, 16):
        got = score_documents(model, fits, window=64, stride=32, batch_size=batch_size)
        want = [_direct_nll(model, d) for d in fits]
        assert got == pytest.approx(want, rel=1e-5)
    # a smaller window changes nothing for a document that fits it
    tiny = [d for d in fits if len(d) <= 17]
    assert tiny and score_documents(model, tiny, window=16, stride=3, batch_size=2) == \
        pytest.approx(score_documents(model, tiny, window=64, stride=32, batch_size=2), rel=1e-5)
    # a small window over long documents: stride 1 gives each token exactly `window` context
    long_doc = docs[3][:40]
    got = score_documents(model, [long_doc, fits[0]], window=8, stride=1, batch_size=4)
    assert got[0] == pytest.approx(_direct_nll(model, long_doc, context=8), rel=1e-5)
    # any stride: same tokens scored, each once; more context never hurts much on random weights
    n_tok = len(long_doc) - 1
    for stride in (3, 8):
        nll = score_documents(model, [long_doc], window=8, stride=stride, batch_size=3)[0]
        assert abs(nll / n_tok - got[0] / n_tok) < 0.05


# -- heldout_eval --------------------------------------------------------------------------


def test_heldout_eval_stage(tmp_path, checkpoint, shards, tokenizer_artifact, tok):
    inputs = {"checkpoint": checkpoint, "shards": shards, "tokenizer": tokenizer_artifact}
    art = run_stage(HeldoutEval(batch_size=4), tmp_path / "all", inputs=inputs)
    m = art.manifest["metrics"]
    texts = [HELDOUT_TEXTS[k] for k in sorted(HELDOUT_TEXTS)]
    num_bytes = sum(len(t.encode()) for t in texts)
    num_tokens = sum(len(tok.encode(t)) + 1 for t in texts)  # + eos; bos is never scored
    zstd_bytes = sum(len(zstandard.ZstdCompressor(level=19).compress(t.encode())) for t in texts)
    assert m["num_documents"] == 5 and m["num_bytes"] == num_bytes
    assert m["num_tokens"] == num_tokens
    assert m["bytes_per_token"] == pytest.approx(num_bytes / num_tokens)
    assert m["zstd_bits_per_byte"] == pytest.approx(8 * zstd_bytes / num_bytes)
    # a random model is close to uniform over the vocabulary
    assert abs(m["loss"] - math.log(tok.vocab_size)) < 0.3
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * num_tokens / math.log(2) / num_bytes)
    assert m["bits_per_byte"] == pytest.approx(
        math.log2(tok.vocab_size) / m["bytes_per_token"], rel=0.1)
    report = json.loads((art.path / "report.json").read_text())
    assert report["metrics"] == m
    rows = report["documents"]
    assert [r["id"] for r in rows] == sorted(HELDOUT_TEXTS)
    assert sum(r["model_bits"] for r in rows) == pytest.approx(m["bits_per_byte"] * num_bytes)
    assert report["settings"]["window"] == 64 and report["settings"]["stride"] == 32

    # the first N documents by id; the windows (stride) change only the long document
    first = run_stage(HeldoutEval(max_documents=2, stride=64), tmp_path / "two", inputs=inputs)
    rows2 = json.loads((first.path / "report.json").read_text())["documents"]
    assert [r["id"] for r in rows2] == ["a-tabs", "b-short"]
    assert [r["model_bits"] for r in rows2] == pytest.approx([r["model_bits"] for r in rows[:2]])


def test_clamped_stride_warns(tmp_path, checkpoint, shards, tokenizer_artifact):
    from recipe_engine import RecipeWarning

    inputs = {"checkpoint": checkpoint, "shards": shards, "tokenizer": tokenizer_artifact}
    with pytest.warns(RecipeWarning, match="stride=1000 is longer than the model's context"):
        art = run_stage(HeldoutEval(max_documents=1, stride=1000), tmp_path, inputs=inputs)
    assert json.loads((art.path / "report.json").read_text())["settings"]["stride"] == 64


def test_recipe_engine_model_is_hflm_on_the_checkpoint(checkpoint, tokenizer_artifact, lm):
    """``--model recipe_engine`` (a checkpoint, no export) is lm-eval's HFLM, scoring what
    ``make_lm`` scores; options it has no use for are named in a warning."""
    from lm_eval.models.huggingface import HFLM

    from recipe_engine import RecipeWarning
    from recipe_engine_plugins.evaluation.lm_eval_model import RecipeEngineLM

    with pytest.warns(RecipeWarning, match="ignoring model_args \\['dtype'\\]"):
        cli = RecipeEngineLM(checkpoint=str(checkpoint.path),
                             tokenizer=str(tokenizer_artifact.path), device="cpu", dtype="bf16",
                             batch_size="auto")
    assert isinstance(cli, HFLM) and type(cli.model).__name__ == "LlamaForCausalLM"
    assert cli.batch_size == "auto" and cli.max_length == 64
    pairs = [("def add(a, b):\n    return a", " + b"), ("x = ", "1\n")]
    assert [s for s, _ in cli.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)] \
        == [s for s, _ in lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)]


def test_heldout_eval_rejects_other_tokenizer(tmp_path, checkpoint, shards, tokenizer_artifact):
    wrong = Artifact(kind="shards", path=shards.path,
                     manifest={"meta": {**shards.meta, "eos_id": shards.meta["eos_id"] + 7}})
    from recipe_engine import StageError

    with pytest.raises(StageError, match="eos_id"):
        run_stage(HeldoutEval(), tmp_path, inputs={
            "checkpoint": checkpoint, "shards": wrong, "tokenizer": tokenizer_artifact})


# -- the python_basics task ----------------------------------------------------------------


def test_python_basics_data():
    items = [json.loads(line) for line in (TASK_DIR / "test.jsonl").read_text().splitlines()]
    shots = [json.loads(line) for line in (TASK_DIR / "fewshot.jsonl").read_text().splitlines()]
    assert len(items) >= 60 and len(shots) >= 3
    assert len({i["id"] for i in items + shots}) == len(items) + len(shots)
    assert len({i["context"] for i in items}) == len(items)
    for item in items + shots:
        assert 2 <= len(item["choices"]) <= 4 and len(set(item["choices"])) == len(item["choices"])
        assert 0 <= item["label"] < len(item["choices"])
        assert item["context"] and all(item["choices"])
    assert len({i["label"] for i in items}) >= 3  # the answer is not always in one place


# -- lm-eval's HFLM on the model's Hugging Face form ---------------------------------------


@pytest.fixture(scope="module")
def module(checkpoint):
    return _model(checkpoint)


@pytest.fixture(scope="module")
def lm(module, checkpoint, tok):
    from recipe_engine.artifacts import read_model_spec
    from recipe_engine_plugins.evaluation.lm_eval_runner import make_lm

    return make_lm(module, read_model_spec(checkpoint.path), tok, batch_size=3, device="cpu")


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _logprob(model, ids, num_scored):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double()[0], -1)
    n = len(ids) - 1
    return sum(logp[i, ids[i + 1]].item() for i in range(n - num_scored, n))


def test_make_lm_is_hflm_on_a_copy(lm, module, checkpoint, tok):
    from lm_eval.models.huggingface import HFLM

    assert isinstance(lm, HFLM) and type(lm.model).__name__ == "LlamaForCausalLM"
    assert (lm.max_length, lm.batch_size, lm.eot_token_id, lm.prefix_token_id) == \
        (64, 3, tok.eos_id, tok.bos_id)
    # a copy: the module (which may go on training) shares no storage with it
    ours = {p.data_ptr() for p in module.parameters()}
    assert not ours & {p.data_ptr() for p in lm.model.parameters()}
    ids = torch.tensor([[tok.bos_id, *tok.encode("def f(x):\n    return x * 2\n")]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, module(ids), atol=1e-5, rtol=0)


def test_make_lm_refuses_a_model_without_hf_form(tmp_path, tok):
    from recipe_engine import StageError
    from recipe_engine.artifacts import read_model_spec
    from recipe_engine_plugins.evaluation.lm_eval_runner import make_lm

    ckpt = _checkpoint(tmp_path, tok.vocab_size, position_embedding="alibi")
    with pytest.raises(StageError, match="cannot hold this model: position_embedding: alibi"):
        make_lm(_model(ckpt), read_model_spec(ckpt.path), tok, batch_size=2, device="cpu")


def test_loglikelihood_matches_torch(lm, module, tok):
    long_ctx = "".join(f"x{i} = {i}\n" for i in range(40))  # longer than the 64-token window
    pairs = [("def add(a, b):\n    return a", " + b"), ("for i in range(n)", ":"),
             ("", "import os\n"), (long_ctx, "y = x1 + x2\n"), ("print(x", ")\n")]
    got = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(pairs, got):
        whole = tok.encode(context + continuation)
        context = context.rstrip()  # lm-eval moves trailing whitespace into the continuation
        n_ctx = len(tok.encode(context)) if context else 0
        ids = [tok.bos_id, *whole][-65:]
        want = _logprob(module, ids, min(len(whole) - n_ctx, len(ids) - 1))
        assert score == pytest.approx(want, rel=1e-5, abs=1e-4), (context, continuation)
        assert isinstance(greedy, bool)
    assert len(tok.encode(long_ctx)) > 64


def test_a_continuation_merged_into_the_context_is_healed(lm, module, tok):
    """HFLM stops on a pair whose continuation has no tokens of its own (BPE merged it into
    the context's last token); ours scores it from where the two encodings part."""
    pieces = [tok.decode([i]) for i in range(4, tok.vocab_size)]
    pairs = [("x = f(" + p[:-1], p[-1]) for p in pieces
             if len(p) >= 2 and not p[:-1][-1].isspace() and not p[-1].isspace()]
    merged = [(c, k) for c, k in pairs if len(tok.encode(c + k)) <= len(tok.encode(c))]
    assert len(merged) >= 2, "no piece of this tokenizer merges across the boundary"
    before = lm.healed
    got = lm.loglikelihood(_requests("loglikelihood", merged[:2]), disable_tqdm=True)
    assert lm.healed == before + len(merged[:2])
    for (context, continuation), (score, _greedy) in zip(merged, got):
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        split = next(i for i in range(len(whole)) if whole[i] != ctx[i])
        ids = [tok.bos_id, *whole]
        assert score == pytest.approx(_logprob(module, ids, len(whole) - split), rel=1e-5)
        assert score < 0


def test_loglikelihood_rolling(lm, module, tok):
    """HFLM's rolling windows score the tokenizer's output, ``<s>`` included, after a ``<s>``
    prefix (what ``lm_eval --model hf`` does with any Llama tokenizer)."""
    short = "def f(x):\n    return x\n"
    long = "".join(f"value_{i} = {i} * {i}\n" for i in range(30))
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]),
                                   disable_tqdm=True)
    ids = [tok.bos_id, tok.bos_id, *tok.encode(short)]
    assert got[0] == pytest.approx(_logprob(module, ids, len(ids) - 1), rel=1e-5)
    n_long = len(tok.encode(long)) + 1
    assert n_long > 64 and got[1] < 0
    assert -got[1] / n_long == pytest.approx(math.log(tok.vocab_size), abs=0.3)


def test_generate_until_greedy(lm, module, tok):
    context = "def add(a, b):\n    return"
    free = lm.generate_until(_requests("generate_until", [
        (context, {"until": [], "max_gen_toks": 6, "do_sample": False})]), disable_tqdm=True)[0]
    # reference greedy loop on our module
    ids = [tok.bos_id, *tok.encode(context)]
    out = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(module(torch.tensor([ids]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
            out.append(nxt)
    assert free == tok.decode(out)
    assert len(free) >= 3
    stop = free[1:3]  # stops inside the text, and the stop string is not returned
    cut = lm.generate_until(_requests("generate_until", [
        (context, {"until": [stop], "max_gen_toks": 6}),
        ("x", {"until": "\n", "max_gen_toks": 2})]), disable_tqdm=True)
    assert cut[0] == free[:free.find(stop)] and stop not in cut[0]
    assert len(tok.encode(cut[1])) <= 2


# -- the lm_eval stage ---------------------------------------------------------------------


def test_lm_eval_fingerprint_covers_task_files(tmp_path, monkeypatch):
    import shutil

    import recipe_engine_plugins.evaluation as evaluation

    extra = LmEval().fingerprint_extra()
    assert len(extra) == 64 and extra == LmEval(limit=3).fingerprint_extra()
    copy = tmp_path / "tasks"
    shutil.copytree(evaluation.TASKS_DIR, copy)
    monkeypatch.setattr(evaluation, "TASKS_DIR", copy)
    assert LmEval().fingerprint_extra() == extra  # same content, other place: same digest
    test_file = copy / "python_basics" / "test.jsonl"
    test_file.write_text(test_file.read_text().replace('"label": 0', '"label": 1', 1))
    assert LmEval().fingerprint_extra() != extra  # one edited item: the stage reruns


def test_flatten_results():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                             "exact_match,strict": 1.0, "x,none": "N/A"}},
           "n-samples": {"t": {"original": 10, "effective": 4}}}
    assert flatten_results(res) == {"t/acc": 0.5, "t/acc_stderr": 0.1,
                                    "t/exact_match/strict": 1.0, "t/num_samples": 4}


def test_lm_eval_stage_offline(tmp_path, checkpoint, tokenizer_artifact):
    n_items = len((TASK_DIR / "test.jsonl").read_text().splitlines())
    art = run_stage(LmEval(batch_size=8), tmp_path,
                    inputs={"checkpoint": checkpoint, "tokenizer": tokenizer_artifact})
    m = art.manifest["metrics"]
    assert 0 <= m["python_basics/acc"] <= 1 and 0 <= m["python_basics/acc_norm"] <= 1
    assert m["python_basics/num_samples"] == n_items
    results = json.loads((art.path / "results.json").read_text())
    assert results["results"]["python_basics"]["acc,none"] == m["python_basics/acc"]
    assert results["n-samples"]["python_basics"]["effective"] == n_items


def test_lm_eval_stage_fewshot_limit(tmp_path, checkpoint, tokenizer_artifact):
    art = run_stage(LmEval(num_fewshot=2, limit=5), tmp_path,
                    inputs={"checkpoint": checkpoint, "tokenizer": tokenizer_artifact})
    assert art.manifest["metrics"]["python_basics/num_samples"] == 5
    results = json.loads((art.path / "results.json").read_text())
    assert results["n-shot"]["python_basics"] == 2


@pytest.mark.slow
def test_lm_eval_unknown_task(tmp_path, checkpoint, tokenizer_artifact):
    from recipe_engine import StageError

    with pytest.raises(StageError, match="no_such_task"):
        run_stage(LmEval(tasks=["no_such_task"]), tmp_path,
                  inputs={"checkpoint": checkpoint, "tokenizer": tokenizer_artifact})
