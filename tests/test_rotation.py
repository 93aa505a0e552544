"""QuaRot rotation of tiny decoder LLMs: norm fusion and R1/R2/R4 leave the float32 logits unchanged (all four
families, Hadamard and random modes, biases, tied embeddings), the config record, rebuild, and bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from common.quant.act_quant import ActQuantLinear
from common.models.hadamard import OnlineHadamard, random_hadamard_matrix, random_orthogonal_matrix
from common.models.rotation import (SUPPORTED_ARCHITECTURES, fuse_norms, install_online_hadamards, quarot_rotate,
                             rotate_model)
from fixtures import make_tiny_causal_lm

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rot")
    dirs = {arch: make_tiny_causal_lm(arch, root / arch) for arch in ARCHS}
    dirs["tied"] = make_tiny_causal_lm("llama", root / "tied", tie_word_embeddings=True)
    dirs["bias"] = make_tiny_causal_lm("llama", root / "bias", attention_bias=True, mlp_bias=True)
    return dirs


def load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


IDS = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_norms_invariant(model_dirs, arch):
    model = load(model_dirs[arch])
    ref = logits(model)
    fuse_norms(model)
    assert rel(logits(model), ref) < TOL
    norms = [m for n, m in model.named_modules() if n.endswith("layernorm") or n == "model.norm"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    assert all(torch.all(m.weight == 1) for m in norms)


@pytest.mark.parametrize("mode", ["hadamard", "random"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quarot_rotation_invariant(model_dirs, arch, mode):
    model = load(model_dirs[arch])
    ref = logits(model)
    emb0 = model.model.embed_tokens.weight.clone()
    qk_norms = {n: p.clone() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    quarot_rotate(model, mode=mode, seed=1)
    assert rel(logits(model), ref) < TOL
    assert not torch.allclose(model.model.embed_tokens.weight, emb0, atol=1e-3)  # something was rotated
    for n, p in model.named_parameters():
        if n in qk_norms:
            assert torch.equal(p, qk_norms[n])  # Qwen3's per-head q/k norms are left alone
    for layer in model.model.layers:
        assert isinstance(layer.mlp.down_proj, ActQuantLinear)
        assert isinstance(layer.mlp.down_proj.pre_transform, OnlineHadamard)
    assert model.config.gptaq_rotation == {"mode": mode, "seed": 1, "online_r4": True, "fp32_had": False}
    if arch == "qwen3":
        assert len(qk_norms) == 2 * model.config.num_hidden_layers


def test_per_layer_r2_biases_and_no_r4(model_dirs):
    model = load(model_dirs["bias"])
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
    ref = logits(model)
    n_layers, head_dim = model.config.num_hidden_layers, model.model.layers[0].self_attn.head_dim
    R2 = [random_orthogonal_matrix(head_dim, 10 + i) for i in range(n_layers)]
    rotate_model(model, random_orthogonal_matrix(64, 3), R2, online_r4=False, mode="spinquant")
    assert rel(logits(model), ref) < TOL
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert model.config.gptaq_rotation["mode"] == "spinquant" and model.config.gptaq_rotation["seed"] is None


def test_r2_none_and_already_wrapped_down_proj(model_dirs):
    model = load(model_dirs["qwen2"])  # q/k/v biases
    ref = logits(model)
    layer = model.model.layers[0]
    layer.mlp.down_proj = ActQuantLinear(layer.mlp.down_proj)
    rotate_model(model, random_hadamard_matrix(64, 0), None, fp32_had=True)
    assert rel(logits(model), ref) < TOL
    assert layer.mlp.down_proj.pre_transform.fp32_had and isinstance(layer.mlp.down_proj.linear, torch.nn.Linear)


def test_tied_embeddings_untied_and_saved(model_dirs, tmp_path):
    model = load(model_dirs["tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = logits(model)
    quarot_rotate(model, seed=2)
    out = logits(model)
    assert rel(out, ref) < TOL
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False

    # rebuild: the saved weights hold every folded matrix, install_online_hadamards restores the online R4
    rebuilt = load(model_dirs["tied"])
    fuse_norms(rebuilt)
    install_online_hadamards(rebuilt, fp32_had=model.config.gptaq_rotation["fp32_had"])
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(logits(rebuilt), out, atol=1e-6)

    # without R4 the model is a plain transformers model: save_pretrained / from_pretrained keep it untied
    plain = load(model_dirs["tied"])
    rotate_model(plain, random_hadamard_matrix(64, 2), random_hadamard_matrix(16, 3), online_r4=False,
                 mode="hadamard", seed=2)
    plain.save_pretrained(str(tmp_path / "saved"))
    again = load(tmp_path / "saved")
    assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()
    assert again.config.gptaq_rotation["online_r4"] is False
    assert torch.allclose(logits(again), logits(plain), atol=1e-6)
    assert rel(logits(again), ref) < TOL


def test_bad_input(model_dirs):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model class GPT2LMHeadModel.*LlamaForCausalLM"):
        quarot_rotate(gpt2)
    assert "Qwen3ForCausalLM" in SUPPORTED_ARCHITECTURES
    model = load(model_dirs["llama"])
    w0 = model.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match="rotation mode"):
        quarot_rotate(model, mode="learned")
    with pytest.raises(ValueError, match=r"R1 must be a \[64, 64\]"):
        rotate_model(model, torch.eye(32), None)
    with pytest.raises(ValueError, match="R1 is not orthogonal"):
        rotate_model(model, 2 * torch.eye(64), None)
    with pytest.raises(ValueError, match="R2 list has 1 matrices for 2 layers"):
        rotate_model(model, torch.eye(64), [torch.eye(16)])
    assert torch.equal(model.model.embed_tokens.weight, w0)  # bad input touched nothing
    quarot_rotate(model)
    json.dumps(model.config.gptaq_rotation)
    with pytest.raises(ValueError, match="already rotated"):
        quarot_rotate(model)
