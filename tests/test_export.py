"""GPTQ checkpoint export: an independent bit-level unpacker must reproduce the fake-quantized weights exactly."""
import json

import numpy as np
import pytest
import torch

from common.export import export_gptq, pack_codes, pack_linear
from common.solvers import gptq_quantize, gptaq_quantize, rtn_quantize


def unpack_bits(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Independent unpacker: int32 words -> bit array -> codes of `bits` bits, along `axis`."""
    words = np.moveaxis(packed.astype(np.int64) & 0xFFFFFFFF, axis, -1)  # [..., nwords]
    bitarr = ((words[..., :, None] >> np.arange(32)) & 1).reshape(*words.shape[:-1], -1)  # little-endian stream
    codes = bitarr.reshape(*bitarr.shape[:-1], -1, bits) @ (1 << np.arange(bits))
    return np.moveaxis(codes, -1, axis)


def dequantize_checkpoint(t: dict, bits: int, fmt: str) -> torch.Tensor:
    codes = unpack_bits(t["qweight"].numpy(), bits, axis=0)  # [in, out]
    zeros = unpack_bits(t["qzeros"].numpy(), bits, axis=1)  # [groups, out]
    if fmt == "gptq":
        zeros = zeros + 1
    g = t["g_idx"].numpy().astype(np.int64)
    scales = t["scales"].float().numpy()
    w = scales[g] * (codes.astype(np.float32) - zeros[g].astype(np.float32))  # [in, out]
    return torch.from_numpy(np.ascontiguousarray(w.T))


def problem(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, 4 * cols, generator=g)
    X = (torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g)) @ X
    H = X @ X.T / X.shape[1]
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, H, 0.1 * torch.randn(cols, cols, generator=g) / cols


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("mode", ["plain", "act_order", "act_order_static"])
def test_unpacked_checkpoint_reproduces_fake_quant_weights_bit_exactly(bits, group_size, mode):
    W, H, dXXT = problem(cols=256)
    kw = dict(bits=bits, group_size=group_size, act_order=mode != "plain", static_groups=mode == "act_order_static",
              sym=bits % 2 == 0, scale_dtype=torch.float16)
    for res in (gptq_quantize(W, H, **kw), gptaq_quantize(W, H, dXXT, **kw)):
        for fmt in ("gptq", "gptq_v2"):
            if fmt == "gptq" and bool((res.zeros == 0).any()):
                continue
            t = pack_linear(res, torch.randn(64), fmt)
            assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (256 * bits // 32, 64)
            ngroups = 1 if group_size == -1 else 256 // group_size
            assert t["qzeros"].shape == (ngroups, 64 * bits // 32) and t["scales"].dtype == torch.float16
            assert t["scales"].shape == (ngroups, 64) and t["g_idx"].shape == (256,)
            assert torch.equal(dequantize_checkpoint(t, bits, fmt), res.weight)


def test_pack_codes_known_patterns():
    codes = torch.arange(32).remainder(16).reshape(32, 1)
    packed = pack_codes(codes, 4)
    assert packed.shape == (4, 1) and packed[0, 0].item() == 0x76543210
    three = torch.full((32, 1), 7)
    assert torch.equal(pack_codes(three, 3), torch.full((3, 1), -1, dtype=torch.int32))  # all ones
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(16, 1, dtype=torch.int64), 4)


def test_v1_format_refuses_zero_point_zero():
    W = torch.rand(32, 64)  # all positive: asymmetric zero point 0
    res = rtn_quantize(W, bits=4)
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_linear(res, None, "gptq", name="mlp.up_proj")
    pack_linear(res, None, "gptq_v2")


def test_export_directory_layout(tmp_path):
    from fixtures import make_tiny_causal_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_tiny_causal_lm("llama", tmp_path / "src", hidden_size=128, intermediate_size=256)
    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    results = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            results[name] = rtn_quantize(mod.weight.data, bits=4, group_size=32, sym=True, scale_dtype=torch.float16)
    out = export_gptq(model, results, tmp_path / "q", bits=4, group_size=32, sym=True, desc_act=False,
                      tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 32
    assert cfg["sym"] is True and cfg["desc_act"] is False and cfg["checkpoint_format"] == "gptq"
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    assert (out / "tokenizer.json").exists()
    from safetensors.torch import load_file
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.weight" not in sd and sd[f"{name}.qweight"].shape == (256 * 4 // 32, 128)
    t = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
    assert torch.equal(dequantize_checkpoint(t, 4, "gptq"), results[name].weight)
    assert sd["model.embed_tokens.weight"].dtype == torch.float16
    assert not list(tmp_path.glob(".q.*"))  # no temporary folder left behind
