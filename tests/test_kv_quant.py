"""KV-cache quantization and R3: exactness of the Q/K Hadamard, quantized cache contents, cache/no-cache
agreement, generation, all four decoder families, eager and sdpa attention, bad flags."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.quant.act_quant import ActQuantizer
from common.models.kv_quant import KVQuantConfig, add_kv_quantization, kv_quantizers, remove_kv_quantization
from fixtures import make_tiny_causal_lm

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
HEAD_DIM = 16


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvq")
    return {arch: make_tiny_causal_lm(arch, root / arch) for arch in ARCHS}


def load(model_dirs, arch, attn="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32,
                                                 attn_implementation=attn)
    return model.eval()


def hadamard_transform(x):
    """Independent reference: x H with H the orthonormal Sylvester Hadamard matrix of size x.shape[-1]."""
    h = torch.ones(1, 1)
    while h.shape[0] < x.shape[-1]:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return x @ h / h.shape[0] ** 0.5


def ids(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 300, (2, n), generator=g)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_r3_is_exact(model_dirs, arch, attn):
    model, x = load(model_dirs, arch, attn), ids()
    ref = model(x).logits
    add_kv_quantization(model, KVQuantConfig(rotate_qk=True))
    assert len(kv_quantizers(model)) == 2
    out = model(x)
    assert rel_err(out.logits, ref) < 1e-4
    k = out.past_key_values.layers[0].keys
    ref_k = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32)(x).past_key_values
    assert torch.allclose(k, hadamard_transform(ref_k.layers[0].keys), atol=1e-5)  # cache holds RoPE(k) H


@torch.no_grad()
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cache_holds_4bit_keys_and_values(model_dirs, arch, attn, rotate):
    model, x = load(model_dirs, arch, attn), ids()
    ref = model(x, use_cache=True).past_key_values
    add_kv_quantization(model, KVQuantConfig(k_bits=4, v_bits=4, rotate_qk=rotate))
    cache = model(x, use_cache=True).past_key_values
    for layer, ref_layer in zip(cache.layers, ref.layers):
        for t, t_ref in ((layer.keys, ref_layer.keys), (layer.values, ref_layer.values)):
            assert t.shape == t_ref.shape and t.shape[-1] == HEAD_DIM
            rows = t.reshape(-1, HEAD_DIM)
            assert max(len(torch.unique(r)) for r in rows) <= 16  # one 4-bit grid per head and token
            assert not torch.allclose(t, t_ref, atol=1e-3)
    # Layer 0 sees the unquantized input: its cache is exactly the per-head, per-token quantization.
    q4 = ActQuantizer(bits=4)
    k0 = ref.layers[0].keys
    assert torch.allclose(cache.layers[0].keys, q4(hadamard_transform(k0) if rotate else k0), atol=1e-5)
    assert torch.allclose(cache.layers[0].values, q4(ref.layers[0].values), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_no_cache_matches_cache(model_dirs, arch):
    model, x = load(model_dirs, arch), ids()
    add_kv_quantization(model, KVQuantConfig(k_bits=3, v_bits=4, k_groupsize=8, rotate_qk=True))
    a = model(x, use_cache=True).logits
    b = model(x, use_cache=False).logits
    assert rel_err(a, b) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_full_recompute(model_dirs, arch, attn):
    """Per-token K/V quantization makes incremental decoding equal to recomputing without a cache."""
    model, x = load(model_dirs, arch, attn), ids(8)[:1]
    add_kv_quantization(model, KVQuantConfig(k_bits=4, v_bits=4, rotate_qk=True))
    out = model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=3)
    assert out.shape == (1, 11)
    seq = x
    for _ in range(3):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_pre_rope_keys_and_quantization_changes_logits(model_dirs):
    model, x = load(model_dirs, "llama"), ids()
    ref = model(x).logits
    with pytest.warns(UserWarning, match="k_pre_rope"):
        add_kv_quantization(model, KVQuantConfig(k_bits=4, k_pre_rope=True, rotate_qk=True))
    out = model(x)
    assert 1e-4 < rel_err(out.logits, ref) < 0.5
    # Layer 0's cache holds RoPE(Q4(k_proj(x))): quantized before RoPE.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
    k = model.model.layers[0].self_attn.k_proj(h).view(2, x.shape[1], -1, HEAD_DIM).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(x.shape[1])[None])
    _, k_rope = apply_rotary_pos_emb(k, ActQuantizer(bits=4)(k), cos, sin)
    assert torch.allclose(out.past_key_values.layers[0].keys, k_rope, atol=1e-5)


@torch.no_grad()
def test_idempotent_remove_and_deepcopy(model_dirs):
    model, x = load(model_dirs, "qwen3"), ids()
    ref = model(x).logits
    cfg = KVQuantConfig(k_bits=4, v_bits=4, rotate_qk=True)
    add_kv_quantization(model, cfg)
    q = model(x).logits
    add_kv_quantization(model, cfg)
    attn = model.model.layers[0].self_attn
    assert len(attn.v_proj._forward_hooks) == 1
    assert torch.equal(model(x).logits, q)
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].self_attn.forward.__self__ is clone.model.layers[0].self_attn
    assert torch.equal(clone(x).logits, q)
    base = type(attn).__mro__[1]
    assert type(attn).__name__ == base.__name__ and "forward" not in attn.__dict__
    remove_kv_quantization(model)
    assert not attn.v_proj._forward_hooks and type(attn) is base
    assert torch.equal(model(x).logits, ref)
    assert torch.equal(clone(x).logits, q)  # the copy keeps its own quantizers


def test_installed_module_is_freed_without_garbage_collection(model_dirs):
    """No module -> bound method -> module cycle: a dropped (deep-copied) quantized layer frees its weights at once
    (the pipeline's GPTAQ full-precision copy of every layer once stayed on the GPU until Python's next collection)."""
    import gc
    import weakref

    model = load(model_dirs, "llama")
    add_kv_quantization(model, KVQuantConfig(k_bits=4, v_bits=4, rotate_qk=True))
    gc.collect()
    gc.disable()
    try:
        clone = copy.deepcopy(model.model.layers[0])
        gone = weakref.ref(clone.self_attn.q_proj.weight)
        del clone
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("kwargs", [dict(k_bits=1), dict(v_bits=12), dict(k_bits=4.0), dict(v_bits=32),
                                    dict(k_groupsize=0), dict(v_clip_ratio=1.5)])
def test_bad_flags_raise(kwargs):
    with pytest.raises(ValueError):
        KVQuantConfig(**kwargs)


def test_groupsize_must_divide_head_dim(model_dirs):
    model = load(model_dirs, "llama")
    with pytest.raises(ValueError, match="k_groupsize"):
        add_kv_quantization(model, KVQuantConfig(k_bits=4, k_groupsize=5))
    assert not kv_quantizers(model)


@pytest.mark.parametrize("extra, r3", [([], False), (["--k_bits", "4"], True), (["--v_bits", "4"], False),
                                       (["--k_bits", "4", "--export", "out"], False)])
def test_cli_installs_r3_only_with_quantized_keys(extra, r3):
    """--rotate adds R3 only when keys are quantized, as the published QuaRot / GPTAQ code does (without a key
    quantizer it leaves q k^T unchanged); --export never (a plain model)."""
    from common.cli.llm import build_parser, settings

    args = build_parser().parse_args(["--model", "m", "--rotate", "--w_bits", "4", *extra])
    assert settings(args)[2].rotate_qk is r3
