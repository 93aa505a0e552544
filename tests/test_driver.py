"""common.pipeline.driver: GPTQ / GPTAQ / RTN block by block on a tiny rotated Llama, and on a toy non-HF block."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.models import llm
from common.quant.act_quant import ActQuantLinear, ActQuantizer, set_act_quant, wrap_linears
from common.pipeline.driver import quantize_blocks
from common.pipeline.hessian import HessianAccumulator
from common.solver import SolverConfig
from fixtures import make_tiny_causal_lm, rotated_quantized_model

LINEARS = [n for g in llm.LAYER_GROUPS for n in g]
_ADD = HessianAccumulator.add  # the production accumulator's own add, wrapped by _run


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_causal_lm("llama", tmp_path_factory.mktemp("llama"))


def _setup(path, a_bits=4):
    return rotated_quantized_model(path, a_bits)


def _run(model, batches, method, monkeypatch, **kw):
    """The driver with the production accumulator, each of its `add` calls recorded (columns, x~, x)."""
    calls = []

    def recording_add(self, x_tilde, x=None):
        calls.append((self.columns, x_tilde.detach().clone(), None if x is None else x.detach().clone()))
        _ADD(self, x_tilde, x)

    monkeypatch.setattr(HessianAccumulator, "add", recording_add)
    inputs = llm.capture_layer_inputs(model, batches, "cpu")
    cfg = SolverConfig(method=method, bits=4, **kw)
    recs = quantize_blocks(llm.decoder_layers(model), inputs.inputs, inputs.run_layer, llm.sublayer_groups, cfg,
                           prepare_block=llm.make_prepare_layer(llm.ActQuantSettings(bits=4)), device="cpu")
    return recs, calls


def _fp_layer_inputs(path, batches):
    """Inputs of self_attn.k_proj in each layer of the rotated, unquantized model (the FP stream X)."""
    from common.models.rotation import quarot_rotate

    model = llm.load_model(str(path), "float32")
    quarot_rotate(model, seed=0)
    seen = {i: [] for i in range(len(model.model.layers))}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].clone()))
    with torch.no_grad():
        for b in batches:
            model(b)
    return seen


def _distinct_per_row(W: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in W)


def test_gptaq_streams_differ_from_gptq(llama_dir, monkeypatch):
    model, batches = _setup(llama_dir)
    fp = _fp_layer_inputs(llama_dir, batches)
    _, gptq_calls = _run(model, batches, "gptq", monkeypatch)
    model2, _ = _setup(llama_dir)
    recs, gptaq_calls = _run(model2, batches, "gptaq", monkeypatch)

    # one add per distinct input and batch (k/v/q and up/gate share theirs): 4 inputs x 2 batches x 2 layers
    assert len(gptq_calls) == len(gptaq_calls) == 4 * 2 * 2
    assert all(x is None for _, _, x in gptq_calls)
    assert all(x is not None for _, _, x in gptaq_calls)
    # layer 0, first linear (k_proj), batch 0: GPTQ captures the FP input (activation quantizers off) ...
    _, xt_gptq, _ = gptq_calls[0]
    _, xt_gptaq, x_gptaq = gptaq_calls[0]
    assert torch.allclose(xt_gptq, fp[0][0], atol=1e-5)
    # ... GPTAQ captures the 4-bit quantized input X~ and pairs it with the FP input X
    assert torch.allclose(x_gptaq, fp[0][0], atol=1e-5)
    assert not torch.allclose(xt_gptaq, x_gptaq, atol=1e-3)
    assert max(len(torch.unique(tok)) for tok in xt_gptaq.reshape(-1, xt_gptaq.shape[-1])) <= 16
    # layer 1: the FP stream X is the unquantized model's (carried through FP copies of the blocks), X~ is not
    first_l1 = 4 * 2  # calls of layer 0 come first
    _, xt1, x1 = gptaq_calls[first_l1]
    assert torch.allclose(x1, fp[1][0], atol=1e-4)
    assert not torch.allclose(xt1, x1, atol=1e-3)
    # and GPTQ's layer-1 stream (quantized weights, FP activations) differs from both
    _, xt1_gptq, _ = gptq_calls[first_l1]
    assert not torch.allclose(xt1_gptq, fp[1][0], atol=1e-4)
    # records: every linear, with both proxy losses
    assert [(r["block"], r["name"]) for r in recs] == [(b, n) for b in range(2) for n in LINEARS]
    assert all(r["tokens"] == 2 * 2 * 32 and r["loss"] >= 0 and "asym_loss" in r for r in recs)


def test_quant_order_switches_activation_quantizers_during_calibration(llama_dir, monkeypatch):
    """--quant_order (paper Table 6): a_first makes GPTQ capture the 4-bit X~ (as GPTAQ does by default); w_first
    makes GPTAQ capture X~ with activations unquantized (its layer-0 X~ then equals the FP input X)."""
    batches = _setup(llama_dir)[1]
    fp = _fp_layer_inputs(llama_dir, batches)
    _, gptq_a = _run(_setup(llama_dir)[0], batches, "gptq", monkeypatch, quant_order="a_first")
    _, gptaq_auto = _run(_setup(llama_dir)[0], batches, "gptaq", monkeypatch)
    _, gptaq_w = _run(_setup(llama_dir)[0], batches, "gptaq", monkeypatch, quant_order="w_first")
    assert torch.allclose(gptq_a[0][1], gptaq_auto[0][1], atol=1e-6)  # same quantized X~ of layer 0
    assert not torch.allclose(gptq_a[0][1], fp[0][0], atol=1e-3)
    assert torch.allclose(gptaq_w[0][1], fp[0][0], atol=1e-5) and torch.allclose(gptaq_w[0][2], fp[0][0], atol=1e-5)
    assert SolverConfig(method="gptaq").acts_during_capture and not SolverConfig().acts_during_capture
    with pytest.raises(ValueError, match="quant_order"):
        SolverConfig(quant_order="first")


@pytest.mark.parametrize("method", ["gptq", "gptaq", "rtn"])
def test_every_decoder_linear_wrapped_and_quantized(llama_dir, monkeypatch, method):
    model, batches = _setup(llama_dir)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    if method == "rtn":
        recs = quantize_blocks(llm.decoder_layers(model), [], None, llm.sublayer_groups,
                               SolverConfig(method="rtn", bits=4),
                               prepare_block=llm.make_prepare_layer(llm.ActQuantSettings(bits=4)))
        assert all("loss" not in r for r in recs)
    else:
        recs, _ = _run(model, batches, method, monkeypatch)
    assert len(recs) == 14
    for layer in llm.decoder_layers(model):
        for name in LINEARS:
            m = layer.get_submodule(name)
            assert isinstance(m, ActQuantLinear) and isinstance(m.quantizer, ActQuantizer)
            assert m.quantizer.bits == 4
            assert _distinct_per_row(m.weight) <= 16  # per-channel 4-bit grid
    changed = [n for n, m in model.named_modules() if isinstance(m, ActQuantLinear)
               and not torch.equal(m.weight, before[n])]
    assert len(changed) == 14
    assert not isinstance(model.lm_head, ActQuantLinear)
    # GPTAQ leaves the activation quantizers on, GPTQ / RTN off (the caller switches them on)
    enabled = {q.enabled for q in model.modules() if isinstance(q, ActQuantizer)}
    assert enabled == ({True} if method == "gptaq" else {False})
    set_act_quant(model, True)
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).logits).all()


class ToyBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale):
        return x + scale * self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("offload", [False, True])
def test_generic_blocks_and_offload(offload):
    torch.manual_seed(0)
    blocks = [ToyBlock(), ToyBlock()]
    inputs = [torch.randn(3, 5, 16) for _ in range(2)]

    def prepare(block):
        for w in wrap_linears(block).values():
            w.quantizer = ActQuantizer(bits=6)

    recs = quantize_blocks(blocks, inputs, lambda b, x: b(x, 0.5), lambda b: [["fc1"], ["fc2"]],
                           SolverConfig(method="gptaq", bits=3, group_size=8, act_order=True),
                           prepare_block=prepare, offload_inputs=offload, desc="toy")
    assert [(r["block"], r["name"]) for r in recs] == [(0, "fc1"), (0, "fc2"), (1, "fc1"), (1, "fc2")]
    assert all(r["tokens"] == 2 * 3 * 5 and "asym_loss" in r for r in recs)
    for b in blocks:
        assert isinstance(b.fc1, ActQuantLinear) and b.fc1.weight.device.type == "cpu"


def test_no_weight_quantization_only_prepares():
    blocks = [ToyBlock()]
    w = blocks[0].fc1.weight.detach().clone()
    recs = quantize_blocks(blocks, [], None, lambda b: [["fc1"], ["fc2"]], SolverConfig(method="none"),
                           prepare_block=wrap_linears)
    assert recs == [] and isinstance(blocks[0].fc1, ActQuantLinear) and torch.equal(blocks[0].fc1.weight, w)


def test_bad_config_and_missing_data():
    with pytest.raises(ValueError, match="method"):
        SolverConfig(method="awq")
    with pytest.raises(ValueError, match="calibration inputs"):
        quantize_blocks([ToyBlock()], [], lambda b, x: b(x, 1.0), lambda b: [["fc1"]],
                        SolverConfig(method="gptq", bits=4))
