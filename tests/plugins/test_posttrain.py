"""sft and dpo: the chat template, the loss masks, packing, the DPO losses against hand-computed
values, and both stages end to end with real Composer on a tiny model and a tiny tokenizer."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from recipe_engine import Artifact, RecipeError, StageError
from recipe_engine.artifacts import (checkpoint_weights_path, load_tokenizer, read_model_spec,
                                     write_documents, write_model_spec)
from recipe_engine.component import instantiate
from recipe_engine.plugins import PluginManager
from recipe_engine.testing import run_stage
from recipe_engine_plugins.training.posttrain import (
    CHAT_END, CHAT_START, IGNORE_INDEX, chat_template, dpo_loss, labels_of, pack, render_chat,
    render_chat_text, reward_stats)

MODEL = {"name": "llama", "dim": 48, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
         "multiple_of": 16}
CONTEXT = 96
TWO_TURNS = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Add two numbers."},
             {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
             {"role": "user", "content": "And subtract?"},
             {"role": "assistant", "content": "def sub(a, b):\n    return a - b"}]


def build(cls, **params):
    return instantiate(cls, params, PluginManager().registry.build)


def documents(path: Path, docs: list[dict]) -> Artifact:
    path.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        d.setdefault("id", f"r{i}")
        d.setdefault("text", "x")
        d.setdefault("source", "test")
        d.setdefault("path", None)
    write_documents(path / "part-00000.jsonl.zst", docs)
    return Artifact(kind="documents", path=path, manifest={"meta": {"num_documents": len(docs)}})


def tokenizer_stage(root: Path, special: list[str]) -> Artifact:
    from recipe_engine_plugins.tokenizers.train import SentencePieceBPE

    import textwrap as _tw
    import heapq as _hq
    texts = [Path(m.__file__).read_text() for m in (_tw, _hq)]
    corpus = documents(root / "corpus", [{"text": t} for t in texts]
                       + [{"text": m["content"]} for m in TWO_TURNS])
    return run_stage(SentencePieceBPE(vocab_size=400, num_threads=1, special_tokens=special),
                     root / "tok", inputs={"documents": corpus})


@pytest.fixture(scope="module")
def tok_art(tmp_path_factory):
    return tokenizer_stage(tmp_path_factory.mktemp("chat_tok"), [CHAT_START, CHAT_END])


@pytest.fixture(scope="module")
def tok(tok_art):
    return load_tokenizer(tok_art.path)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tok):
    """A 'pretrained' checkpoint: a freshly initialised tiny Llama, saved like composer_train's."""
    import torch
    from safetensors.torch import save_model

    from recipe_engine import ModelConfig

    root = tmp_path_factory.mktemp("base_ckpt")
    config = PluginManager().registry.build(ModelConfig, MODEL)
    torch.manual_seed(0)
    module = config.build(tok.vocab_size, CONTEXT)
    save_model(module, str(root / "model.safetensors"))
    write_model_spec(root, config.name, config.params(), tok.vocab_size, CONTEXT)
    meta = {"vocab_size": tok.vocab_size, "seq_len": CONTEXT, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    return Artifact(kind="checkpoint", path=root, manifest={"meta": meta})


CONVERSATIONS = [
    [{"role": "user", "content": "Write a function that adds."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
    [{"role": "user", "content": "Write a function that doubles."},
     {"role": "assistant", "content": "def double(x):\n    return 2 * x"}],
    [{"role": "user", "content": "Write a function that negates."},
     {"role": "assistant", "content": "def neg(x):\n    return -x"}],
    [{"role": "user", "content": "Write a function that squares."},
     {"role": "assistant", "content": "def square(x):\n    return x * x"}],
]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    docs = [{"messages": CONVERSATIONS[i % 4]} for i in range(64)]
    docs += [{"messages": c, "split": "heldout"} for c in CONVERSATIONS]
    docs += [{"messages": [{"role": "user", "content": "no answer"}]},  # skipped, counted
             {"text": "a plain document"}]
    return documents(tmp_path_factory.mktemp("conversations"), docs)


def sft(**params):
    from recipe_engine_plugins.training.posttrain import SFT

    base = {"optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
            "scheduler": {"name": "cosine_warmup", "warmup": "1ba", "alpha_f": 1.0},
            "global_batch_size": 4, "max_duration": "8ba", "save_interval": "4ba",
            "device": "cpu", "log_interval": 4}
    return build(SFT, **{**base, **params})


def dpo(**params):
    from recipe_engine_plugins.training.posttrain import DPO

    base = {"optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
            "scheduler": {"name": "cosine_warmup", "warmup": "1ba", "alpha_f": 1.0},
            "global_batch_size": 4, "max_duration": "12ba", "save_interval": "6ba",
            "device": "cpu", "beta": 0.5}
    return build(DPO, **{**base, **params})


# -- the template --------------------------------------------------------------------------


def test_only_the_assistant_turns_are_targets(tok):
    ids, target = render_chat(tok, TWO_TURNS)
    assert len(ids) == len(target) and ids[0] == tok.bos_id and not target[0]
    assert tok.decode(ids) == render_chat_text(TWO_TURNS)  # bos decodes to nothing
    start, end = tok.special_tokens[CHAT_START], tok.special_tokens[CHAT_END]
    assert ids.count(start) == ids.count(end) == 5
    # the targets are exactly two runs: each assistant content followed by its <|im_end|>
    runs, run = [], []
    for i, t in zip(ids, target):
        if t:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    assert run == []
    assert [r[-1] for r in runs] == [end, end]
    assert [tok.decode(r[:-1]) for r in runs] == [TWO_TURNS[2]["content"], TWO_TURNS[4]["content"]]
    assert sum(target) == sum(len(r) for r in runs)
    # the header "<|im_start|>assistant\n" is prompt, not target
    for k, i in enumerate(ids):
        if i == start:
            assert not target[k] and not target[k + 1]
    labels = labels_of(ids, target)
    assert [lab for lab in labels if lab != IGNORE_INDEX] == [i for i, t in zip(ids, target) if t]


def test_generation_prompt_and_the_jinja_template_render_the_same_text(tok):
    import jinja2

    prompt = TWO_TURNS[:2]
    ids, target = render_chat(tok, prompt, add_generation_prompt=True)
    assert not any(target)
    assert tok.decode(ids).endswith(f"{CHAT_START}assistant\n")
    template = jinja2.Environment().from_string(chat_template())
    for messages, gen in ((TWO_TURNS, False), (prompt, True)):
        assert template.render(messages=messages, add_generation_prompt=gen) == \
            render_chat_text(messages, gen)
    assert CHAT_START in chat_template() and CHAT_END in chat_template()


def test_a_tokenizer_without_chat_tokens_is_refused(tmp_path, base_ckpt, conversations):
    plain = tokenizer_stage(tmp_path, ["<|fim_prefix|>"])
    with pytest.raises(StageError, match=r"declares no <\|im_start\|> / <\|im_end\|>.*special_tokens"):
        run_stage(sft(), tmp_path / "sft", {"checkpoint": base_ckpt, "tokenizer": plain,
                                            "documents": conversations})


def test_packing_keeps_every_example_and_its_labels():
    examples = [([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, -100]), ([1, 8, 9, 10], [-100, -100, 9, 10]),
                ([1, 11, 12, 13, 14, 15], [-100] * 5 + [15])]
    rows = pack(examples, 6)
    assert rows == [([1, 5, 6, 1, 7], [-100, 5, 6, -100, -100]),
                    ([1, 8, 9, 10], [-100, -100, 9, 10]),
                    ([1, 11, 12, 13, 14, 15], [-100] * 5 + [15])]
    assert all(len(ids) == len(labels) <= 6 for ids, labels in rows)


# -- DPO losses ----------------------------------------------------------------------------


def test_dpo_losses_match_hand_computed_values():
    import torch

    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    # h = (pc - rc) - (pr - rr) = (1 - (-1), 0 - 1) = (2, -1)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="sigmoid")
    expected = [-math.log(1 / (1 + math.exp(-0.1 * 2))), -math.log(1 / (1 + math.exp(0.1)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)  # 0.598139, 0.744397
    assert cr.tolist() == pytest.approx([0.1, 0.0]) and rj.tolist() == pytest.approx([-0.1, 0.1])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="ipo")
    assert losses.tolist() == pytest.approx([(2 - 5) ** 2, (-1 - 5) ** 2])  # 1/(2*0.1) = 5
    stats = reward_stats(cr.tolist(), rj.tolist())
    assert stats["reward_accuracy"] == 0.5
    assert stats["reward_margin"] == pytest.approx((0.2 + -0.1) / 2)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, kind="hinge")


def test_bad_params_are_rejected():
    from recipe_engine_plugins.training.posttrain import DPO, SFT

    with pytest.raises(RecipeError) as e:
        build(SFT, max_duration="100tok", global_batch_size=0, max_seq_len=4,
              save_interval="often")
    for key in ("max_duration", "global_batch_size", "max_seq_len", "save_interval"):
        assert key in str(e.value)
    with pytest.raises(RecipeError, match="device_microbatch_size"):
        build(SFT, global_batch_size=16, device_microbatch_size=3)
    with pytest.raises(RecipeError, match="beta"):
        build(DPO, beta=0.0)
    with pytest.raises(RecipeError, match="precision"):
        build(SFT, device="cpu", precision="amp_bf16")


# -- the stages, end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_ckpt, tok_art, conversations):
    root = tmp_path_factory.mktemp("sft")
    out = run_stage(sft(), root, {"checkpoint": base_ckpt, "tokenizer": tok_art,
                                  "documents": conversations})
    return root, out


def test_sft_loss_on_the_assistant_tokens_falls(sft_run):
    root, out = sft_run
    metrics, counts = out.manifest["metrics"], out.manifest["counts"]
    assert metrics["val_loss"] < 0.7 * metrics["val_loss_before"]
    assert counts["skipped.last_not_assistant"] == 1 and counts["skipped.missing_messages"] == 1
    assert counts["records_in"] == 70
    meta = out.meta
    assert meta["steps"] == 8 and meta["resumed_from_step"] == 0
    assert meta["chat_template"] == chat_template() and meta["chat_format"] == "chatml"


def test_sft_output_is_a_checkpoint_like_pretraining(sft_run, base_ckpt, tok_art):
    """Read back through the public readers and the model class, as heldout_eval and
    hf_export do; the weights moved."""
    import torch
    from safetensors.torch import load_file, load_model

    from recipe_engine import ModelConfig

    _, out = sft_run
    spec = read_model_spec(out.path)
    assert spec == read_model_spec(base_ckpt.path)
    config = PluginManager().registry.build(ModelConfig, {"name": spec["name"], **spec["params"]})
    module = config.build(spec["vocab_size"], spec["max_seq_len"])
    load_model(module, str(checkpoint_weights_path(out.path)))
    before = load_file(str(checkpoint_weights_path(base_ckpt.path)))
    after = load_file(str(checkpoint_weights_path(out.path)))
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    for key in ("vocab_size", "seq_len", "bos_id", "eos_id", "pad_id", "num_params", "steps"):
        assert key in out.meta


def test_sft_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, sft_run, base_ckpt,
                                                             tok_art, conversations):
    """As if killed after the checkpoint at batch 4: the run resumes there (autoresume in the
    work directory) and ends with exactly the uninterrupted run's weights."""
    from safetensors.torch import load_file
    import torch

    root, full = sft_run
    ckpts = root / "work" / "checkpoints"
    assert (ckpts / "ep0-ba4-rank0.pt").is_file() or sorted(ckpts.glob("*ba4-rank0.pt"))
    shutil.copytree(root / "work", tmp_path / "work", symlinks=True)
    work = tmp_path / "work" / "checkpoints"
    mid = sorted(work.glob("*-ba4-rank0.pt"))[0]
    for later in work.glob("*-ba8-rank0.pt"):
        later.unlink()
    (work / "latest-rank0.pt").unlink()
    os.symlink(mid.name, work / "latest-rank0.pt")
    resumed = run_stage(sft(), tmp_path, {"checkpoint": base_ckpt, "tokenizer": tok_art,
                                          "documents": conversations})
    assert resumed.meta["resumed_from_step"] == 4 and resumed.meta["steps"] == 8
    a = load_file(str(checkpoint_weights_path(full.path)))
    b = load_file(str(checkpoint_weights_path(resumed.path)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_pads_one_example_per_row_when_not_packing(tmp_path, base_ckpt, tok, tok_art,
                                                       conversations):
    rendered = [render_chat(tok, c) for c in CONVERSATIONS]
    cut = min(len(ids) for ids, _ in rendered) - 2  # every example loses its last 2+ ids ...
    assert all(any(t[:cut]) for _, t in rendered)  # ... and keeps some of its targets
    out = run_stage(sft(packing=False, max_duration="2ba", max_seq_len=cut), tmp_path,
                    {"checkpoint": base_ckpt, "tokenizer": tok_art, "documents": conversations})
    assert out.manifest["counts"]["examples"] == 64
    assert out.manifest["counts"]["truncated"] == 64


def test_sft_refuses_a_longer_context_than_the_checkpoint(tmp_path, base_ckpt, tok_art,
                                                          conversations):
    with pytest.raises(StageError, match="longer than the checkpoint's context"):
        run_stage(sft(max_seq_len=CONTEXT + 1), tmp_path,
                  {"checkpoint": base_ckpt, "tokenizer": tok_art, "documents": conversations})


PAIRS = [("Is 3 < 4?", "def f():\n    return 3 < 4", "def f():\n    return 3 >= 4"),
         ("Add one.", "def inc(x):\n    return x + 1", "def inc(x):\n    return x - 1"),
         ("Is it empty?", "def empty(s):\n    return not s", "def empty(s):\n    return s"),
         ("Both true?", "def both(a, b):\n    return a and b", "def both(a, b):\n    return a or b")]


def test_dpo_reward_accuracy_rises_above_chance(tmp_path, sft_run, tok_art):
    _, sft_out = sft_run
    docs = [{"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r}
            for p, c, r in PAIRS * 2]
    docs += [{"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r,
              "split": "heldout"} for p, c, r in PAIRS[:2]]
    docs += [{"prompt": [{"role": "user", "content": "x"}], "chosen": "same", "rejected": "same"}]
    prefs = documents(tmp_path / "prefs", docs)
    out = run_stage(dpo(), tmp_path / "dpo", {"checkpoint": sft_out, "tokenizer": tok_art,
                                              "documents": prefs}, max_skip_fraction=0.2)
    m = out.manifest["metrics"]
    assert m["train/reward_accuracy"] > 0.5 and m["train/reward_margin"] > 0
    assert m["train/rewards_chosen"] > m["train/rewards_rejected"]
    assert m["train/num_pairs"] == 8 and m["heldout/num_pairs"] == 2
    assert "heldout/reward_accuracy" in m
    assert out.manifest["counts"]["skipped.chosen_equals_rejected"] == 1
    assert out.meta["posttraining"] == "dpo" and out.meta["steps"] == 12
    ipo = run_stage(dpo(loss="ipo", max_duration="2ba"), tmp_path / "ipo",
                    {"checkpoint": sft_out, "tokenizer": tok_art, "documents": prefs},
                    max_skip_fraction=0.2)
    assert math.isfinite(ipo.manifest["metrics"]["train_loss"])


def test_export_of_a_chat_model_carries_its_template(tmp_path, sft_run, tok_art):
    """The SFT checkpoint's template reaches the export's tokenizer_config.json, and
    transformers' apply_chat_template + tokenizer give the ids the training rendered."""
    from transformers import AutoTokenizer

    from recipe_engine_plugins.export import HFExport

    out = run_stage(HFExport(sample_prompts=[]), tmp_path / "export",
                    inputs={"checkpoint": sft_run[1], "tokenizer": tok_art})
    hf = AutoTokenizer.from_pretrained(str(out.path))
    messages = [{"role": "user", "content": "Write a function that adds two numbers."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
    text = hf.apply_chat_template(messages, tokenize=False)
    ours, _ = render_chat(load_tokenizer(tok_art.path), messages)
    assert hf(text)["input_ids"] == ours
    gen = json.loads((out.path / "generation_config.json").read_text())
    assert isinstance(gen["eos_token_id"], list) and len(gen["eos_token_id"]) == 2
