"""The fused RMSNorm (common.models.rms_norm): which norms it replaces, its PyTorch fallback equal to Hugging Face's
bit for bit, and its kernel within one unit in the last place of Hugging Face's (Triton's CPU interpreter; CUDA)."""
from __future__ import annotations

import importlib

import pytest
import torch
from fixtures import HAVE_TRITON, run_in_triton_interpreter
from torch import nn
from transformers import LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from common.models import rms_norm
from common.models.rms_norm import FusedRMSNorm, use_fused_rms_norms

# the norm class of every architecture common.models.rotation supports
NORM_CLASSES = [("llama", "LlamaRMSNorm"), ("qwen2", "Qwen2RMSNorm"), ("qwen3", "Qwen3RMSNorm"),
                ("mistral", "MistralRMSNorm"), ("mixtral", "MixtralRMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"),
                ("qwen3_moe", "Qwen3MoeRMSNorm")]


def _tiny(config_cls, **kw):
    return config_cls(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_hidden_layers=1, vocab_size=32, **kw)


@pytest.mark.parametrize("module,name", NORM_CLASSES)
def test_every_supported_architecture_norm_computes_the_fused_formula(module, name):
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    assert rms_norm._computes_formula(cls), f"{name}.forward is no longer the Llama RMSNorm formula"


def test_decoder_layers_get_fused_norms_sharing_their_weights():
    layer = LlamaDecoderLayer(_tiny(LlamaConfig), layer_idx=0)
    keys, weight = set(layer.state_dict()), layer.input_layernorm.weight
    assert use_fused_rms_norms(layer) == 2
    assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(layer.post_attention_layernorm, FusedRMSNorm)
    assert layer.input_layernorm.weight is weight and set(layer.state_dict()) == keys
    assert use_fused_rms_norms(layer) == 0  # idempotent
    qwen3 = Qwen3DecoderLayer(_tiny(Qwen3Config), layer_idx=0)
    assert use_fused_rms_norms(qwen3) == 4  # + the per-head q_norm and k_norm
    assert isinstance(qwen3.self_attn.q_norm, FusedRMSNorm)


def test_norms_with_another_formula_are_left_alone():
    class OnePlusScale(LlamaRMSNorm):  # Gemma-style (1 + g) scale
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    block = nn.Sequential(OnePlusScale(8), nn.LayerNorm(8))
    assert use_fused_rms_norms(block) == 0


def test_fallback_equals_hugging_face_bit_for_bit_and_keeps_autograd():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hf = LlamaRMSNorm(48, eps=1e-5).to(dtype)
        with torch.no_grad():
            hf.weight.mul_(torch.rand(48).to(dtype) + 0.5)
        x = (torch.randn(3, 7, 48) * 3).to(dtype)
        assert torch.equal(FusedRMSNorm(hf)(x), hf(x))
    x = torch.randn(5, 48, requires_grad=True)
    FusedRMSNorm(LlamaRMSNorm(48))(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


KERNEL_VS_HF = r"""
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from common.models import rms_norm
from common.models.rms_norm import FusedRMSNorm

g = torch.Generator().manual_seed(0)
for n, dtype, wdtype in ((96, torch.float16, torch.float16), (80, torch.float32, torch.float32),
                         (64, torch.float16, torch.float32)):
    hf = LlamaRMSNorm(n, eps=1e-6).to(wdtype)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(n, generator=g) + 0.5)
    x = ((torch.randn(4, 33, n, generator=g) + torch.randn(n, generator=g)) * 5).to(dtype)
    with torch.no_grad():
        assert rms_norm.available(x, hf.weight)
        out, ref = FusedRMSNorm(hf)(x), hf(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # h = x / rms(x) rounded to x's dtype differs by at most one unit (<= eps |h|); times g and rounded again: within
    # 2 eps |g h|; float32 x: a few units (sum order, rsqrt)
    fin = torch.finfo(dtype)
    bound = (4 if dtype == torch.float32 else 2) * fin.eps * ref.float().abs().clamp_min(fin.smallest_normal)
    assert ((out.float() - ref.float()).abs() <= bound).all(), (n, dtype)
    if dtype != torch.float32:  # 16-bit roundings differ only next to a rounding boundary
        assert (out != ref).float().mean() < 0.01, (n, dtype)
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_kernel_within_one_ulp_of_hugging_face_in_interpreter():
    run_in_triton_interpreter(KERNEL_VS_HF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_within_one_ulp_of_hugging_face_on_cuda():
    torch.manual_seed(0)
    for n in (576, 4096, 11008):
        hf = LlamaRMSNorm(n, eps=1e-5).cuda().half()
        with torch.no_grad():
            hf.weight.copy_(torch.rand(n) + 0.5)
            x = ((torch.randn(2, 1024, n, device="cuda") + torch.randn(n, device="cuda")) * 3).half()
            out, ref = FusedRMSNorm(hf)(x), hf(x)
        fin = torch.finfo(torch.float16)
        # one unit of x / rms(x) in float16, times g, then rounded: within 2 eps |g h| (subnormals: a fixed unit)
        bound = 2 * fin.eps * ref.float().abs().clamp_min(fin.smallest_normal)
        assert ((out.float() - ref.float()).abs() <= bound).all()
        assert (out != ref).float().mean() < 1e-3
    x.requires_grad_(True)
    FusedRMSNorm(hf)(x.float()).sum().backward()  # autograd: the PyTorch formula
    assert x.grad is not None
