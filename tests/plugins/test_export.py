"""hf_export: the exported directory loads with transformers (and lm-eval's ``hf`` model) offline
and computes what our model computes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipe_engine import Artifact, RecipeError
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.export import SAMPLE_PROMPTS, HFExport
from recipe_engine_plugins.export.hf import load_export
from recipe_engine_plugins.models import Llama, load_model, save_model
from recipe_engine_plugins.models.hf import from_hf_name, to_hf_name
from recipe_engine_plugins.tokenizers.spm import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CODE = (
    "import os\n\n\nclass Greeter:\n    \"\"\"Says hello.\"\"\"\n\n"
    "    def greet(self, name: str) -> str:\n\t\treturn f'héllo, {name} 👋'  # ünïcode\n"
    "\n\n\n        \n    x  =  [1,   2]\r\n日本語\u00a0nbsp\u3000ideo\n"
)
TRICKY = [
    CODE, "", " ", "\n", "\n\n\n", "  leading", "trailing  ", "\t\tx", "a\u2581b \u2581\u2581 c",
    "private \ue000 use \ue000_ and \ue000\ue000\u2581 end \ue000", "\ue000", "x\x00\x0b\x7fz",
    "ε = λ ω: ω ** 2  # 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🐍", "<s> not special </s>",
]


@pytest.fixture(scope="module")
def tokenizer_artifact(stdlib_tokenizer):
    return stdlib_tokenizer("json")


@pytest.fixture(scope="module")
def tok(tokenizer_artifact):
    return Tokenizer.load(tokenizer_artifact.path)


def _checkpoint(directory: Path, vocab_size: int, **params) -> Artifact:
    torch.manual_seed(0)
    config = Llama(**{"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                      "ffn_hidden_dim": 64, "rope_theta": 500.0, "norm_eps": 1e-6, **params})
    module = config.build(vocab_size, 64)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    save_model(module, config, vocab_size, 64, directory)
    meta = {"vocab_size": vocab_size, "seq_len": 64, "num_tokens": 12345}
    return Artifact(kind="checkpoint", path=directory,
                    manifest={"meta": meta, "metrics": {"train_loss": 5.5}})


@pytest.fixture(scope="module", params=["tied-gqa", "untied-mha"])
def exported(request, tmp_path_factory, tokenizer_artifact, tok):
    root = tmp_path_factory.mktemp(request.param)
    params = ({"tie_embeddings": True} if request.param == "tied-gqa"
              else {"tie_embeddings": False, "n_kv_heads": 0, "ffn_hidden_dim": 0,
                    "multiple_of": 16})
    ckpt = _checkpoint(root / "ckpt", tok.vocab_size, **params)
    art = run_stage(HFExport(), root / "export",
                    inputs={"checkpoint": ckpt, "tokenizer": tokenizer_artifact})
    return ckpt, art


def test_registered_and_light():
    assert PluginManager().registry.get("stage", "hf_export").cls is HFExport
    code = ("import sys, recipe_engine_plugins.export; "
            "print([m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(RecipeError, match="dtype"):
        HFExport(dtype="int8")


def test_names_round_trip():
    ours = ["tok_embeddings.weight", "norm.weight", "output.weight"] + [
        f"layers.3.{k}.weight" for k in ("attention.wq", "attention.wk", "attention.wv",
                                          "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                          "feed_forward.w3", "attention_norm", "ffn_norm")]
    assert [from_hf_name(to_hf_name(n)) for n in ours] == ours
    assert to_hf_name("layers.0.feed_forward.w1.weight") == "model.layers.0.mlp.gate_proj.weight"


def test_hf_model_logits_equal_ours(exported, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt, art = exported
    ours = load_model(ckpt.path)
    hf = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    cfg = AutoConfig.from_pretrained(art.path)
    a = ours.args
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.max_position_embeddings) == \
        (a.vocab_size, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.max_seq_len)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == \
        (a.rope_theta, a.norm_eps, a.tie_embeddings)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_id, tok.eos_id)
    ids = torch.tensor([[tok.bos_id, *tok.encode(CODE)][:64], [tok.bos_id, *range(5, 68)][:64]])
    with torch.no_grad():
        want = ours(ids)
        got = hf(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.std() > 0.1  # not a vacuous comparison


def test_hf_tokenizer_ids_equal_ours(exported, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(exported[1].path)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert len(hf) == tok.vocab_size
    for text in TRICKY:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf(text)["input_ids"] == [tok.bos_id, *ids]  # <s> in front, as in training
        assert hf.decode(ids) == text, repr(text)
        assert hf.decode([tok.bos_id, *ids, tok.eos_id], skip_special_tokens=True) == text


def test_directory_layout_and_card(exported):
    ckpt, art = exported
    out = art.path
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "README.md", "recipe_engine/model.json", "recipe_engine/tokenizer.model",
                 "recipe_engine/tokenizer.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "num_tokens | 12345" in card and "LlamaForCausalLM" in card
    assert art.manifest["meta"]["num_params"] == art.manifest["metrics"]["num_params"] > 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_load_export_gives_our_model_back(exported, tok):
    ckpt, art = exported
    model, tokenizer = load_export(art.path)
    ours = load_model(ckpt.path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.encode(CODE) == tok.encode(CODE)


def test_bfloat16_export(tmp_path, tokenizer_artifact, tok):
    from transformers import AutoModelForCausalLM

    ckpt = _checkpoint(tmp_path / "ckpt", tok.vocab_size)
    art = run_stage(HFExport(dtype="bfloat16"), tmp_path / "export",
                    inputs={"checkpoint": ckpt, "tokenizer": tokenizer_artifact})
    hf = AutoModelForCausalLM.from_pretrained(art.path, dtype="auto")
    assert hf.dtype == torch.bfloat16
    assert (art.path / "model.safetensors").stat().st_size < 0.6 * sum(
        t.numel() * 4 for t in load_model(ckpt.path).state_dict().values())


@pytest.mark.slow
def test_lm_eval_hf_model_on_export(tmp_path, tokenizer_artifact, tok):
    """`lm_eval --model hf` on the export scores exactly what our own lm_eval stage scores."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from recipe_engine_plugins.evaluation import TASKS_DIR, LmEval

    ckpt = _checkpoint(tmp_path / "ckpt", tok.vocab_size)
    art = run_stage(HFExport(), tmp_path / "export",
                    inputs={"checkpoint": ckpt, "tokenizer": tokenizer_artifact})
    ours = run_stage(LmEval(limit=20), tmp_path / "ours",
                     inputs={"checkpoint": ckpt, "tokenizer": tokenizer_artifact})
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={art.path},tokenizer={art.path},dtype=float32",
        tasks=["python_basics"], limit=20, batch_size=4, device="cpu",
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    got = res["results"]["python_basics"]
    assert res["n-samples"]["python_basics"]["effective"] == 20
    assert got["acc,none"] == ours.manifest["metrics"]["python_basics/acc"]
    assert got["acc_norm,none"] == ours.manifest["metrics"]["python_basics/acc_norm"]
    # and the log-likelihoods themselves are our model's, on our tokenizer's ids
    model = load_model(ckpt.path)
    samples = res["samples"]["python_basics"]
    reqs = [tuple(a) for s in samples for a in s["arguments"]]
    hf_lls = [r[0][0] for s in samples for r in s["resps"]]
    assert len(reqs) == len(hf_lls) > 40
    assert [_our_loglikelihood(model, tok, *r) for r in reqs] == pytest.approx(hf_lls, abs=1e-4)


def _our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) from our module and runtime tokenizer, by lm-eval's rule:
    ``[bos] + encode(context + continuation)``, the continuation's tokens those past
    ``[bos] + encode(context)`` (trailing spaces of the context moved into the continuation),
    the last ``max_seq_len + 1`` tokens kept."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = [tok.bos_id, *tok.encode(context + continuation)]
    num_scored = len(whole) - 1 - len(tok.encode(context))
    ids = whole[-65:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double()[0], -1)
    n = len(ids) - 1
    return sum(logp[i, ids[i + 1]].item() for i in range(n - num_scored, n))


def test_export_is_byte_identical_and_run_facts_go_to_the_manifest(tmp_path, tokenizer_artifact,
                                                                    tok):
    """The same checkpoint exported twice gives the same bytes in every file, even when the
    checkpoint's two training attempts differ in timings and resume point: those go to the
    export's manifest metrics, never into the model card."""
    ckpt = _checkpoint(tmp_path / "ckpt", tok.vocab_size)
    arts = []
    for i, (seconds, resumed) in enumerate([(12.5, 0), (31.25, 8)]):
        attempt = Artifact(kind="checkpoint", path=ckpt.path, manifest={
            "meta": {**ckpt.meta, "resumed_from_step": resumed, "steps": 16},
            "metrics": {"train_loss": 5.5, "seconds": seconds,
                        "tokens_per_second": 1000.0 / seconds, "mfu": 0.01 * (i + 1)}})
        arts.append(run_stage(HFExport(), tmp_path / f"export{i}",
                              inputs={"checkpoint": attempt, "tokenizer": tokenizer_artifact}))
    a, b = (sorted(p.relative_to(art.path) for p in art.path.rglob("*")
                   if p.is_file() and p.name != "manifest.json")  # the manifest holds timings
            for art in arts)
    assert a == b and Path("README.md") in a and Path("model.safetensors") in a
    for rel in a:
        assert (arts[0].path / rel).read_bytes() == (arts[1].path / rel).read_bytes(), rel
    card = (arts[0].path / "README.md").read_text()
    assert "train_loss | 5.5" in card and "steps | 16" in card
    assert "seconds" not in card and "resumed_from_step" not in card and "mfu" not in card
    metrics = [art.manifest["metrics"] for art in arts]
    assert metrics[0]["training/seconds"] == 12.5 and metrics[1]["training/seconds"] == 31.25
    assert metrics[1]["training/resumed_from_step"] == 8
    assert "training/train_loss" not in metrics[0]


def test_export_verifies_its_logits_and_stores_samples(exported):
    _, art = exported
    verified = art.manifest["meta"]["verified"]
    assert verified["max_abs_logit_diff"] <= verified["tolerance"] == 1e-4
    assert verified["tokens"] > 10
    samples = json.loads((art.path / "samples.json").read_text())
    assert [s["prompt"] for s in samples["samples"]] == list(SAMPLE_PROMPTS)
    assert all(isinstance(s["completion"], str) and s["completion"] for s in samples["samples"])
    assert samples["settings"]["do_sample"] is False


def test_a_wrong_conversion_fails_the_export(tmp_path, tokenizer_artifact, tok, monkeypatch):
    """A conversion bug (here: two layers' query weights swapped) is caught by the stage's own
    check, not shipped."""
    from recipe_engine import StageError
    from recipe_engine_plugins.models import hf

    real = hf.hf_state_dict

    def swapped(*args, **kwargs):
        sd = real(*args, **kwargs)
        a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
        sd[a], sd[b] = sd[b], sd[a]
        return sd

    monkeypatch.setattr(hf, "hf_state_dict", swapped)
    ckpt = _checkpoint(tmp_path / "ckpt", tok.vocab_size)
    with pytest.raises(StageError, match="logits differ"):
        run_stage(HFExport(sample_prompts=[]), tmp_path / "export",
                  inputs={"checkpoint": ckpt, "tokenizer": tokenizer_artifact})


def test_a_tokenizer_format_without_hf_form_is_a_clear_error():
    from recipe_engine.tokenizer import Tokenizer as Base

    class Plain(Base):  # no format: not registered
        pass

    with pytest.raises(NotImplementedError, match="format '' has no Hugging Face form"):
        Plain().hf_tokenizer(64)


@pytest.mark.parametrize("params, reason", [
    ({"position_embedding": "alibi", "rope_theta": 10000.0}, "position_embedding: alibi"),
    ({"mlp": "gelu"}, "mlp: gelu"),
    ({"qk_norm": True}, "qk_norm"),
])
def test_architectures_llama_cannot_hold_are_refused(tmp_path, tokenizer_artifact, tok, params, reason):
    from recipe_engine import StageError

    ckpt = _checkpoint(tmp_path / "ckpt", tok.vocab_size, **params)
    with pytest.raises(StageError, match=f"cannot hold this model: {reason}"):
        run_stage(HFExport(), tmp_path / "export",
                  inputs={"checkpoint": ckpt, "tokenizer": tokenizer_artifact})


def test_rope_scaling_is_exported_and_verified(tmp_path, tokenizer_artifact, tok):
    ckpt = _checkpoint(tmp_path / "ckpt", tok.vocab_size, rope_scaling="linear",
                       rope_scaling_factor=4.0)
    art = run_stage(HFExport(sample_prompts=[]), tmp_path / "export",
                    inputs={"checkpoint": ckpt, "tokenizer": tokenizer_artifact})
    config = json.loads((art.path / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == 4.0
    assert art.manifest["meta"]["verified"]["max_abs_logit_diff"] <= 1e-4
