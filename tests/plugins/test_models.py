"""The ``llama`` and ``llama_moe`` model components: the defaults build today's model bit for
bit, every option builds, counts parameters exactly and FLOPs as documented, document
masking keeps attention inside documents, ALiBi and RoPE scaling follow their papers (and
transformers), mixture-of-experts routing and its load-balancing loss, the 70B shape plans.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from recipe_engine import ModelConfig, RecipeError
from recipe_engine.artifacts import read_model_spec, write_model_spec
from recipe_engine.plugins import PluginManager

torch = pytest.importorskip("torch")

VOCAB, SEQ = 512, 32


@lru_cache(maxsize=None)
def registry():
    return PluginManager().registry


def config(**params):
    params.setdefault("name", "llama")
    return registry().build(ModelConfig, params)


def built(cfg, seed: int = 0, vocab: int = VOCAB, seq: int = SEQ, **kwargs):
    torch.manual_seed(seed)
    return cfg.build(vocab, seq, **kwargs)


def state_digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- the defaults are today's model ----------------------------------------------------------

# Obtained by running the code as it was before the architecture options were added
# (plugins/models at the commit before this file existed): for each config,
# torch.manual_seed(0); m = config.build(512, 32); sha256 over sorted (name, fp32 bytes) of
# m.state_dict(); then the logits for ids = torch.randint(0, 512, (2, 16),
# generator=torch.Generator().manual_seed(1)): their sum, and a few values.
REFERENCE = {
    "micro_3m": (
        dict(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, tie_embeddings=True),
        "b5ba5f8ba27e8d0113af15f543c65cf81f71996f7cf87c793a0e447bc7fc5f2f", 39, 1722048,
        10479744.0, 4.525156264184261,
        [0.3675808012485504, -0.1915988028049469, -0.10653699189424515, -0.3282351493835449],
        [0.044634558260440826, 0.22732415795326233, 0.28957435488700867]),
    "mha_untied": (
        dict(dim=64, n_layers=2, n_heads=4, tie_embeddings=False, ffn_hidden_dim=96,
             rope_theta=500000.0, init_std=0.03),
        "8a312754675f205e4f4059b14d0009db602d6cf54866b27b9f89f2d147c8c342", 21, 135488,
        640896.0, -28.417490418515627,
        [-0.2756834030151367, 0.10518485307693481, 0.12277857959270477, 0.10101699829101562],
        [-0.20321352779865265, 0.563429594039917, 0.22364072501659393]),
}


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_defaults_build_exactly_the_previous_model(case):
    params, digest, n_tensors, n_params, flops, logit_sum, last, mid = REFERENCE[case]
    cfg = config(**params)
    m = built(cfg)
    assert len(m.state_dict()) == n_tensors
    assert state_digest(m) == digest  # same names, shapes and initial values, bit for bit
    assert cfg.num_params(VOCAB) == n_params
    assert cfg.flops_per_token(VOCAB, SEQ) == flops
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(ids)
    assert out.double().sum().item() == pytest.approx(logit_sum, rel=1e-5, abs=1e-3)
    assert out[0, -1, :4].tolist() == pytest.approx(last, abs=1e-5)
    assert out[1, 3, 100:103].tolist() == pytest.approx(mid, abs=1e-5)
    assert m.aux_loss is None


# -- exact counts ----------------------------------------------------------------------------

GRID = [
    dict(dim=64, n_layers=2, n_heads=4),  # MHA, tied
    dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False),  # GQA, untied
    dict(dim=64, n_layers=3, n_heads=8, n_kv_heads=1),  # MQA
    dict(dim=48, n_layers=2, n_heads=4, mlp="gelu", norm="layernorm", multiple_of=32),
    dict(dim=64, n_layers=2, n_heads=4, qk_norm=True, norm="layernorm", ffn_hidden_dim=80),
    dict(dim=64, n_layers=2, n_heads=4, qk_norm=True, position_embedding="alibi"),
    dict(dim=60, n_layers=1, n_heads=4, position_embedding="alibi", tie_embeddings=False),  # odd head dim
    dict(dim=64, n_layers=2, n_heads=4, rope_scaling="llama3", rope_scaling_factor=8.0,
         init="trunc_normal", document_masking=True),
    dict(name="llama_moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2),
    dict(name="llama_moe", dim=32, n_layers=2, n_heads=2, num_experts=3, top_k=1, mlp="gelu",
         tie_embeddings=False, qk_norm=True, ffn_hidden_dim=40),
]


@pytest.mark.parametrize("params", GRID, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_num_params_is_exact(params):
    cfg = config(**params)
    m = built(cfg, vocab=100, seq=16)
    total = sum(p.numel() for p in m.parameters())
    embedding = {id(m.tok_embeddings.weight), id(m.output.weight)}
    body = sum(p.numel() for p in m.parameters() if id(p) not in embedding)
    assert cfg.num_params(100) == total
    assert cfg.num_params(100, embeddings=False) == body
    ids = torch.randint(0, 100, (2, 16))
    m(ids).sum().backward()  # every option runs forward and backward
    assert all(p.grad is not None for p in m.parameters())


def test_flops_per_token_by_hand():
    # micro_3m, vocab 512, seq 32: head_dim 48, SwiGLU width 8/3*192 = 512 (multiple of 64)
    # attention 192*48*(2*4 + 2*2) = 110,592; MLP 3*192*512 = 294,912; norms 2*192
    # non-embedding 4*(110,592 + 294,912 + 384) + 192 = 1,623,744; head 512*192 = 98,304
    # 6*(1,623,744 + 98,304) + 6*4*192*32 (causal attention) = 10,332,288 + 147,456
    cfg = config(**REFERENCE["micro_3m"][0])
    assert cfg.num_params(512, embeddings=False) == 1_623_744
    assert cfg.flops_per_token(512, 32) == 10_479_744
    # llama_moe: dim 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), width 96, 4 experts,
    # top 2, vocab 100, seq 16, tied. Per layer: attention 64*16*(8+4) = 12,288, router
    # 64*4 = 256, one expert 3*64*96 = 18,432, norms 128.
    # all:    2*(12,288 + 256 + 4*18,432 + 128) + 64 = 172,864 (+ 6,400 embedding)
    # active: 2*(12,288 + 256 + 2*18,432 + 128) + 64 = 99,136 (+ 6,400 head)
    # FLOPs 6*(99,136 + 6,400) + 6*2*64*16 = 633,216 + 12,288
    moe = config(name="llama_moe", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 ffn_hidden_dim=96, num_experts=4, top_k=2)
    assert moe.num_params(100, embeddings=False) == 172_864
    assert moe.num_params(100) == 179_264
    assert moe.flops_per_token(100, 16) == 645_504
    # GELU MLP: two matrices of width 4*dim; LayerNorm: gain and bias
    gelu = config(dim=64, n_layers=1, n_heads=4, mlp="gelu", norm="layernorm", multiple_of=64)
    assert gelu.hidden_dim == 256
    assert gelu.num_params(10, embeddings=False) == 64 * 64 * 4 + 2 * 64 * 256 + 3 * 128


def test_70b_shape_counts_and_plans(tmp_path):
    import yaml

    spec = yaml.safe_load((ROOT / "conf" / "model" / "llama_70b.yaml").read_text())
    cfg = config(**spec)
    # per layer: attention 8192*128*(2*64 + 2*8) = 150,994,944; SwiGLU 3*8192*28,672 =
    # 704,643,072; norms 16,384 -> 855,654,400; 80 layers + final norm = 68,452,360,192;
    # untied embeddings 2*128,256*8192 = 2,101,346,304 -> 70,553,706,496
    assert cfg.num_params(128_256, embeddings=False) == 68_452_360_192
    assert cfg.num_params(128_256) == 70_553_706_496
    env = {**os.environ, "RECIPE_STORE": str(tmp_path / "store")}
    args = ["recipes/7b_code.yaml", "model=llama_70b", "tokenizer.vocab_size=128256"]
    cli = [sys.executable, "-m", "recipe_engine.cli"]
    # on the recipe's 8 x 80 GB the 70B shape does not fit: refused before anything runs
    refused = subprocess.run([*cli, "validate", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert refused.returncode == 1 and "device_memory_gb" in refused.stdout + refused.stderr
    args.append("train.device_memory_gb=0")  # not checked: the shape itself validates and plans
    assert subprocess.run([*cli, "validate", *args], cwd=ROOT, env=env).returncode == 0
    proc = subprocess.run([*cli, "plan", *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = next(s for s in json.loads(proc.stdout)["stages"] if s["component"] == "composer_train")
    assert train["estimates"]["params"] == 70_553_706_496
    assert train["estimates"]["params_non_embedding"] == 68_452_360_192
    flops = cfg.flops_per_token(128_256, 4096) * train["estimates"]["tokens"]
    assert float(train["estimates"]["train_flops"]) == pytest.approx(flops, rel=1e-3)


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("params, key", [
    (dict(dim=64, n_layers=2, n_heads=0), "n_heads"),
    (dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(dim=60, n_layers=2, n_heads=4), "dim"),  # odd head dim with RoPE
    (dict(dim=64, n_layers=2, n_heads=4, position_embedding="alibi", rope_scaling="linear",
          rope_scaling_factor=2.0), "rope_scaling"),
    (dict(dim=64, n_layers=2, n_heads=4, position_embedding="alibi", rope_theta=5e5), "rope_theta"),
    (dict(dim=64, n_layers=2, n_heads=4, rope_scaling_factor=4.0), "rope_scaling_factor"),
    (dict(dim=64, n_layers=2, n_heads=4, rope_scaling="linear", rope_scaling_factor=0.5),
     "rope_scaling_factor"),
    (dict(dim=64, n_layers=2, n_heads=4, rope_scaling="llama3", rope_scaling_factor=8.0,
          rope_low_freq_factor=4.0), "rope_low_freq_factor"),
    (dict(name="llama_moe", dim=64, n_layers=2, n_heads=4, num_experts=4, top_k=5), "top_k"),
    (dict(name="llama_moe", dim=64, n_layers=2, n_heads=4, num_experts=1, top_k=1), "num_experts"),
    (dict(name="llama_moe", dim=64, n_layers=2, n_heads=4, capacity_factor=-1.0), "capacity_factor"),
])
def test_bad_parameters_are_named(params, key):
    with pytest.raises(RecipeError) as e:
        config(**params)
    assert key in str(e.value)


def test_params_round_trip_through_the_model_spec(tmp_path):
    """Every option is in ``params()``, goes through model.json and rebuilds the same module
    (what heldout_eval, lm_eval and hf_export do with a checkpoint)."""
    from recipe_engine_plugins.models import load_model, save_model

    for i, params in enumerate(GRID):
        cfg = config(**params)
        m = built(cfg, vocab=100, seq=16)
        save_model(m, cfg, 100, 16, tmp_path / str(i))
        spec = read_model_spec(tmp_path / str(i))
        assert spec["name"] == cfg.name and spec["params"] == cfg.params()
        assert config(name=spec["name"], **spec["params"]) == cfg
        loaded = load_model(tmp_path / str(i), registry().build)
        assert state_digest(loaded) == state_digest(m)
    # a model.json written before the options existed still builds the same model
    old = {k: v for k, v in config(**REFERENCE["micro_3m"][0]).params().items()
           if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_dim", "multiple_of",
                    "norm_eps", "rope_theta", "tie_embeddings", "init_std")}
    (tmp_path / "old").mkdir()
    write_model_spec(tmp_path / "old", "llama", old, VOCAB, SEQ)
    spec = read_model_spec(tmp_path / "old")
    assert state_digest(built(config(name="llama", **spec["params"]))) == REFERENCE["micro_3m"][1]


def test_hf_compatibility_is_reported():
    base = dict(dim=64, n_layers=2, n_heads=4)
    for fine in (base, dict(base, n_kv_heads=1, tie_embeddings=False, document_masking=True,
                            init="depth_scaled", rope_scaling="linear", rope_scaling_factor=2.0)):
        assert config(**fine).hf_unsupported() == []
    for key, value in (("position_embedding", "alibi"), ("mlp", "gelu"),
                       ("norm", "layernorm"), ("qk_norm", True)):
        (why,) = config(**base, **{key: value}).hf_unsupported()
        assert key in why
    assert any("mixture of experts" in w for w in config(name="llama_moe", **base).hf_unsupported())
    assert config(**base).hf_rope_scaling() is None


HF_LOGIT_TOLERANCE = 1e-5  # max |logit difference|, both in fp32 on the same weights


@pytest.mark.parametrize("params", [
    dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-6),
    dict(dim=48, n_layers=2, n_heads=3, n_kv_heads=1, tie_embeddings=False, ffn_hidden_dim=80,
         rope_scaling="llama3", rope_scaling_factor=4.0, rope_original_max_seq_len=16),
], ids=["tied_gqa", "untied_mqa_llama3"])
def test_to_hf_computes_what_the_module_computes(params):
    """``to_hf`` is the one module -> LlamaForCausalLM conversion (hf_export saves it, lm_eval
    scores it): same logits within 1e-5 on a fixed batch, a copy of the weights, special ids
    in its config, and ``from_hf`` gives the module back bit for bit."""
    cfg = config(**params)
    module = built(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for p in module.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    hf = cfg.to_hf(module, VOCAB, SEQ, bos_id=1, eos_id=2, pad_id=3)
    assert type(hf).__name__ == "LlamaForCausalLM" and not hf.training
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (1, 2, 3)
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_params(VOCAB)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(ids)
        torch.testing.assert_close(hf(ids).logits, want, atol=HF_LOGIT_TOLERANCE, rtol=0)
    assert want.std() > 0.1  # not a vacuous comparison
    assert not {p.data_ptr() for p in hf.parameters()} & {p.data_ptr() for p in module.parameters()}
    back = cfg.from_hf(hf.state_dict(), VOCAB, SEQ)
    assert state_digest(back) == state_digest(module)
    half = cfg.to_hf(module, VOCAB, SEQ, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.config.bos_token_id is None


def test_to_hf_refuses_what_llama_cannot_hold():
    base = dict(dim=32, n_layers=1, n_heads=2)
    for params, reason in ((dict(position_embedding="alibi"), "position_embedding: alibi"),
                           (dict(name="llama_moe", num_experts=2, top_k=1), "mixture of experts")):
        cfg = config(**base, **params)
        with pytest.raises(ValueError, match=f"cannot hold this model: .*{reason}"):
            cfg.to_hf(built(cfg), VOCAB, SEQ)

    class NoHF(ModelConfig, name="test_no_hf_model"):
        pass

    with pytest.raises(NotImplementedError, match="'test_no_hf_model' architecture has no "
                                                  "Hugging Face form"):
        NoHF().to_hf(None, VOCAB, SEQ)


# -- positions -------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [
    dict(rope_scaling="none"),
    dict(rope_scaling="linear", rope_scaling_factor=4.0),
    dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_seq_len=64,
         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
])
def test_rope_scaling_matches_transformers(scaling):
    """Our inverse frequencies equal transformers' for the ``rope_scaling`` we would export."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from recipe_engine_plugins.models.llama_model import LlamaArgs, rope_frequencies

    cfg = config(dim=256, n_layers=1, n_heads=2, rope_theta=500000.0, **scaling)
    rope = cfg.hf_rope_scaling()
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0,
                     max_position_embeddings=512, rope_scaling=rope)
    theirs, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"] if rope else "default"](hf, "cpu")
    ours = rope_frequencies(128, LlamaArgs(**cfg.args(100, 512)))
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0)
    if scaling["rope_scaling"] == "llama3":  # high frequencies kept, low ones divided by 8
        base = rope_frequencies(128, LlamaArgs(**config(dim=256, n_layers=1, n_heads=2,
                                                        rope_theta=500000.0).args(100, 512)))
        assert ours[0] == base[0] and ours[-1] == pytest.approx(base[-1] / 8)


def test_alibi_slopes_and_bias_follow_press_et_al():
    from recipe_engine_plugins.models.llama_model import alibi_bias, alibi_slopes

    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # 6 heads: the 4-head sequence 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3 from the 8-head one
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, 10)
    for h in range(4):
        for i in range(10):
            for j in range(10):
                want = -slopes[h].item() * (i - j) if j <= i else -math.inf
                assert bias[h, i, j].item() == want


def test_alibi_model_is_translation_invariant_inside_its_window():
    """With ALiBi nothing depends on absolute position: a token's output depends only on
    the tokens before it. (RoPE has the same property up to rounding.)"""
    cfg = config(dim=32, n_layers=2, n_heads=4, position_embedding="alibi")
    m = built(cfg, vocab=50, seq=16).eval()
    ids = torch.randint(3, 50, (1, 12))
    with torch.no_grad():
        full = m(ids)
        assert torch.allclose(m(ids[:, :7]), full[:, :7], atol=1e-5)


# -- document masking ------------------------------------------------------------------------

BOS = 1


@pytest.mark.parametrize("params", [
    dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    dict(dim=64, n_layers=2, n_heads=4, position_embedding="alibi", qk_norm=True),
    dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=1, rope_scaling="linear", rope_scaling_factor=2.0),
], ids=["rope_gqa", "alibi", "rope_mqa_scaled"])
def test_document_masking_equals_each_document_alone(params):
    cfg = config(document_masking=True, **params)
    m = built(cfg, vocab=64, seq=32, bos_id=BOS).eval()
    g = torch.Generator().manual_seed(3)
    pieces = [torch.randint(3, 64, (3,), generator=g)]  # the tail of a document carried over
    for n in (5, 2, 7):
        pieces.append(torch.cat([torch.tensor([BOS]), torch.randint(3, 64, (n,), generator=g)]))
    packed = torch.cat(pieces)[None]
    other = torch.cat([pieces[2], pieces[1], pieces[3]])[None]  # another packing, same length
    other = torch.cat([other, torch.full((1, packed.shape[1] - other.shape[1]), 7)], dim=1)
    with torch.no_grad():
        out = m(torch.cat([packed, other]))
        begin = 0
        for piece in pieces:
            alone = m(piece[None])
            assert torch.allclose(out[0, begin:begin + len(piece)], alone[0], atol=1e-5)
            begin += len(piece)
        assert torch.allclose(out[1, :len(pieces[2])], m(pieces[2][None])[0], atol=1e-5)
        # the same weights without the mask attend across documents: different outputs
        plain = cfg.build(64, 32)
        plain.load_state_dict(m.state_dict())
        crossed = plain.eval()(packed)
    start = len(pieces[0]) + len(pieces[1])
    assert not torch.allclose(crossed[0, start:], out[0, start:], atol=1e-3)
    assert torch.allclose(crossed[0, :len(pieces[0])], out[0, :len(pieces[0])], atol=1e-5)


def test_document_mask_layout():
    from recipe_engine.artifacts import document_starts

    m = built(config(dim=32, n_layers=1, n_heads=2, document_masking=True), vocab=20, seq=16,
              bos_id=BOS)
    ids = torch.tensor([[5, 6, BOS, 7, 8, 9, BOS, 4]])
    positions, mask = m._document_layout(ids)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1]]
    assert document_starts(ids[0].numpy(), BOS).tolist() == [2, 6]  # the shards' contract
    segment = [0, 0, 1, 1, 1, 1, 2, 2]
    want = [[j <= i and segment[i] == segment[j] for j in range(8)] for i in range(8)]
    assert mask[0, 0].tolist() == want


# -- initialisation --------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["scaled_normal", "normal", "trunc_normal", "depth_scaled"])
def test_initialisation_schemes(init):
    std, layers = 0.02, 4
    m = built(config(dim=256, n_layers=layers, n_heads=4, init=init, norm="layernorm",
                     qk_norm=True), vocab=64, seq=8)
    for i, layer in enumerate(m.layers):
        wo = layer.attention.wo.weight
        want = {"scaled_normal": std / math.sqrt(2 * layers), "normal": std,
                "trunc_normal": std / math.sqrt(2 * layers) * 0.9866,  # std of N cut at 3 sigma
                "depth_scaled": std / math.sqrt(2 * (i + 1))}[init]
        assert wo.std().item() == pytest.approx(want, rel=0.03)
        assert layer.attention.wq.weight.std().item() == pytest.approx(
            std * (0.9866 if init == "trunc_normal" else 1), rel=0.03)
        assert layer.ffn_norm.bias.abs().max() == 0 and (layer.ffn_norm.weight == 1).all()
        assert (layer.attention.q_norm.weight == 1).all()
    if init == "trunc_normal":
        assert m.layers[0].attention.wq.weight.abs().max().item() <= 3 * std


# -- mixture of experts ----------------------------------------------------------------------


def moe_layer(**kwargs):
    from recipe_engine_plugins.models.moe import MoEFeedForward

    torch.manual_seed(0)
    args = dict(dim=16, hidden_dim=24, num_experts=4, top_k=2, capacity_factor=0.0,
                aux_loss_coef=1.0)
    return MoEFeedForward(**{**args, **kwargs})


def test_moe_routing_shapes_and_dropless_output():
    layer = moe_layer()
    x = torch.randn(3, 5, 16)
    probs, experts, weights = layer.route(x.reshape(-1, 16))
    assert probs.shape == (15, 4) and experts.shape == weights.shape == (15, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(15))
    assert torch.allclose(probs.sum(-1), torch.ones(15))
    out = layer(x)
    assert out.shape == x.shape
    assert layer.last_counts.sum().item() == 15 * 2 and layer.last_dropped == 0
    # dropless: each token is the weighted sum of its experts' outputs
    flat = x.reshape(-1, 16)
    for t in range(15):
        want = sum(weights[t, s] * layer.expert(int(experts[t, s]), flat[t:t + 1])[0] for s in range(2))
        assert torch.allclose(out.reshape(-1, 16)[t], want, atol=1e-6)


def test_moe_capacity_drops_the_latest_tokens():
    layer = moe_layer(top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 16, 16)
    x[0, :, 0] = 1.0  # all of them
    out = layer(x)
    capacity = math.ceil(0.5 * 16 * 1 / 4)  # 2
    assert layer.last_counts.tolist() == [16, 0, 0, 0] and layer.last_dropped == 16 - capacity
    assert out[0, :capacity].abs().sum() > 0 and (out[0, capacity:] == 0).all()


def test_moe_balance_loss_is_minimal_for_uniform_routing_and_trains_the_router():
    layer = moe_layer(aux_loss_coef=0.5)
    x = torch.randn(64, 16)
    with torch.no_grad():
        layer.router.weight.zero_()  # every expert equally likely
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(0.5)  # coef * E * sum(f_i / E) = coef
    with torch.no_grad():
        layer.router.weight.normal_()
        layer.router.weight[1] += 2.0 * x.mean(0)  # favour expert 1
    out = layer(x)
    assert layer.aux_loss.item() > 0.5
    (grad_aux,) = torch.autograd.grad(layer.aux_loss, layer.router.weight, retain_graph=True)
    assert grad_aux.abs().sum() > 0
    (grad_lm,) = torch.autograd.grad(out.pow(2).sum(), layer.router.weight)
    assert grad_lm.abs().sum() > 0  # the language-model loss reaches the router too
    single = moe_layer(top_k=1)
    (grad_k1,) = torch.autograd.grad(single(x).pow(2).sum(), single.router.weight)
    assert grad_k1.abs().sum() > 0  # top-1 keeps the raw probability (Switch)


def test_moe_model_exposes_its_aux_loss():
    cfg = config(name="llama_moe", dim=32, n_layers=3, n_heads=2, num_experts=4, top_k=2,
                 aux_loss_coef=0.1)
    m = built(cfg, vocab=50, seq=16)
    names = set(m.state_dict())
    assert {"layers.0.feed_forward.router.weight", "layers.0.feed_forward.w1",
            "layers.0.feed_forward.w2", "layers.0.feed_forward.w3"} <= names
    logits = m(torch.randint(0, 50, (2, 16)))
    assert m.aux_loss.shape == () and m.aux_loss.item() >= 3 * 0.1 - 1e-6  # >= coef per layer
    assert m.aux_loss.item() == pytest.approx(
        sum(layer.feed_forward.aux_loss.item() for layer in m.layers))
    (logits.float().logsumexp(-1).mean() + m.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in m.named_parameters() if "router" in n)
    # residual-output initialisation reaches the experts' down projections
    w2 = m.layers[0].feed_forward.w2
    assert w2.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.1)


@pytest.mark.filterwarnings("ignore:Please specify CheckpointImpl:FutureWarning")
@pytest.mark.parametrize("impl", ["REENTRANT", "NO_REENTRANT"])
def test_moe_aux_loss_keeps_its_gradient_under_activation_checkpointing(impl):
    """Composer's FSDP wraps each block in torch's checkpoint_wrapper, reentrant by default
    (``activation_checkpointing_reentrant``): the first forward runs without autograd, so
    the model's ``aux_loss`` must come out of the blocks as an output to be differentiable."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             checkpoint_wrapper)

    cfg = config(name="llama_moe", dim=32, n_layers=2, n_heads=2, num_experts=4, top_k=2,
                 aux_loss_coef=1.0)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(5))

    def router_grads(m):
        m.zero_grad()
        m.aux_loss = None
        m(ids)
        m.aux_loss.backward()  # the balance loss alone
        return [layer.feed_forward.router.weight.grad.clone() for layer in m.layers]

    m = built(cfg, vocab=50, seq=16)
    plain = router_grads(m)
    for i, layer in enumerate(m.layers):
        m.layers[i] = checkpoint_wrapper(layer, checkpoint_impl=getattr(CheckpointImpl, impl))
    wrapped = [layer._checkpoint_wrapped_module for layer in m.layers]
    m.zero_grad()
    m(ids)
    m.aux_loss.backward()
    for layer, want in zip(wrapped, plain):
        assert want.abs().sum() > 0
        assert torch.allclose(layer.feed_forward.router.weight.grad, want, atol=1e-7)
