"""GPTQ checkpoint export: an independent bit-level unpacker must reproduce the fake-quantized weights exactly."""
import json

import numpy as np
import pytest
import torch

from common.models import llm
from common.io.export import ExportError, GPTQCollector, check_export_config, export_gptq, pack_codes, pack_linear
from common.solver import SolverConfig, gptaq_quantize, gptq_quantize, rtn_quantize


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
@pytest.mark.parametrize("group_size", [-1, 32, 64, 96, 128])  # 96: groups of 96, 96 and 64 on 256 columns
@pytest.mark.parametrize("mode", ["plain", "act_order", "act_order_static"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_unpacked_checkpoint_reproduces_fake_quant_weights_bit_exactly(bits, group_size, mode, sym):
    rows, cols = 32, 256
    W, H, dXXT = problem(rows=rows, cols=cols)
    kw = dict(bits=bits, group_size=group_size, sym=sym, scale_dtype=torch.float16)
    act = dict(act_order=mode != "plain", static_groups=mode == "act_order_static" and group_size > 0)
    results = [gptq_quantize(W, H, **kw, **act), gptaq_quantize(W, H, dXXT, **kw, **act)]
    if mode == "plain":
        results.append(rtn_quantize(W, **kw))
    ngroups = 1 if group_size == -1 else -(-cols // group_size)  # ceil: a narrower last group has its own grid
    for res in results:
        if mode == "act_order" and group_size > 0:
            assert not torch.equal(res.g_idx, torch.arange(cols, dtype=res.g_idx.dtype) // group_size)  # permuted
        for fmt in ("gptq", "gptq_v2"):
            if fmt == "gptq" and bool((res.zeros == 0).any()):
                with pytest.raises(ValueError, match="gptq_v2"):
                    pack_linear(res, None, fmt)
                continue
            t = pack_linear(res, torch.randn(rows), fmt)
            assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (cols * bits // 32, rows)
            assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (ngroups, rows * bits // 32)
            assert t["scales"].dtype == torch.float16 and t["scales"].shape == (ngroups, rows)
            assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (cols,)
            assert t["bias"].dtype == torch.float16
            assert torch.equal(dequantize_checkpoint(t, bits, fmt), res.weight)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_sym_grid_with_partial_groups_exports_bit_exactly(bits):
    """GPTQModel's symmetric grid (sym_grid "gptq", every code in use, zero 2^(b-1)) with groups of 96 on 224 columns
    (96, 96, 32): ceil(224 / 96) = 3 rows of scales and qzeros, g_idx the group of each column, bit-exact."""
    rows, cols = 64, 224
    W, H, dXXT = problem(rows=rows, cols=cols, seed=3)
    kw = dict(bits=bits, group_size=96, sym=True, sym_grid="gptq", scale_dtype=torch.float16)
    for res in (gptq_quantize(W, H, act_order=True, **kw), rtn_quantize(W, **kw),
                gptaq_quantize(W, H, dXXT, act_order=True, static_groups=True, **kw)):
        assert int(res.codes.min()) == 0 and int(res.codes.max()) == 2**bits - 1
        t = pack_linear(res, None, "gptq")
        assert t["scales"].shape == (3, rows) and t["qzeros"].shape == (3, rows * bits // 32)
        assert t["g_idx"].bincount().tolist() == [96, 96, 32]
        assert np.array_equal(unpack_bits(t["qzeros"].numpy(), bits, axis=1) + 1, np.full((3, rows), 2 ** (bits - 1)))
        assert torch.equal(dequantize_checkpoint(t, bits, "gptq"), res.weight)


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
    out = export_gptq(model, results, tmp_path / "q", SolverConfig(method="rtn", bits=4, group_size=32, sym=True),
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


def _tiny_wrapped(tmp_path, **overrides):
    """A tiny Llama with every decoder linear wrapped in ActQuantLinear (16-bit activations), as fake_quant has it,
    and the RTN results of those linears collected by GPTQCollector."""
    from fixtures import make_tiny_causal_lm
    from transformers import AutoModelForCausalLM

    src = make_tiny_causal_lm("llama", tmp_path / "src", **overrides)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    llm.add_act_quant(model, llm.ActQuantSettings())
    collector = GPTQCollector(model, llm.decoder_layers(model), "gptq")
    for i, layer in enumerate(llm.decoder_layers(model)):
        for group in llm.sublayer_groups(layer):
            for name in group:
                lin = layer.get_submodule(name).linear
                res = rtn_quantize(lin.weight.float(), bits=4, group_size=32, sym=True, scale_dtype=torch.float16)
                lin.weight.data.copy_(res.weight.half())
                collector(i, name, res)
    return model, collector


def test_export_unwraps_fake_quant_model_and_drops_tied_head(tmp_path):
    from safetensors.torch import load_file

    model, collector = _tiny_wrapped(tmp_path, tie_word_embeddings=True)
    assert set(collector.grids) == {f"model.layers.{i}.{n}" for i in range(2) for g in llm.LAYER_GROUPS for n in g}
    out = export_gptq(model, collector.grids, tmp_path / "q", SolverConfig(bits=4, group_size=32, sym=True))
    sd = load_file(str(out / "model.safetensors"))
    assert not [k for k in sd if ".linear." in k] and "lm_head.weight" not in sd
    assert sd["model.layers.1.self_attn.k_proj.qweight"].shape == (64 * 4 // 32, 32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "gptaq_rotation" not in cfg
    name = "model.layers.1.mlp.up_proj"
    t = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
    assert torch.equal(dequantize_checkpoint(t, 4, "gptq").half(), model.get_submodule(name).weight)
    assert (out / "config.json").stat().st_mode & 0o044 == 0o044  # readable like save_pretrained's output


def test_export_refusals(tmp_path):
    from transformers import LlamaConfig

    from common.models.kv_quant import KVQuantConfig, add_kv_quantization
    from common.models.rotation import install_online_hadamards

    model, collector = _tiny_wrapped(tmp_path)
    kw = dict(cfg=SolverConfig(bits=4, group_size=32, sym=True))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_gptq(model, collector.grids, tmp_path / "full", **kw)
    partial = dict(collector.grids)
    partial.pop("model.layers.0.mlp.down_proj")
    with pytest.raises(ExportError, match="model.layers.0.mlp.down_proj was not quantized"):
        export_gptq(model, partial, tmp_path / "q1", **kw)
    add_kv_quantization(model, KVQuantConfig(k_bits=4))
    with pytest.raises(ExportError, match="KV-cache"):
        export_gptq(model, collector.grids, tmp_path / "q2", **kw)
    add_kv_quantization(model, KVQuantConfig())
    install_online_hadamards(model)
    with pytest.raises(ExportError, match="online transform"):
        export_gptq(model, collector.grids, tmp_path / "q3", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "src"]  # nothing half-written
    check_export_config(LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                    num_key_value_heads=3))  # SmolLM2-135M: fine
    with pytest.raises(ExportError, match="multiples of 32"):
        check_export_config(LlamaConfig(hidden_size=64, intermediate_size=80, num_attention_heads=4))
