"""Stage-wise capture (common.models.stages, LayerInputs.stages): a decoder layer's residual halves reproduce its
forward bit for bit, and the driver quantizes to the same weights with less forward work."""
from __future__ import annotations

import logging

import pytest
import torch

from common.models import llm
from common.pipeline import driver
from common.pipeline.driver import quantize_blocks
from common.solver import SolverConfig
from fixtures import make_tiny_causal_lm, rotated_quantized_model


def _model(path, a_bits=4):
    model, batches = rotated_quantized_model(path, a_bits, nbatches=3)
    return model, llm.capture_layer_inputs(model, batches, "cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_residual_halves_reproduce_the_layer_bit_for_bit(arch, tmp_path):
    model, inputs = _model(make_tiny_causal_lm(arch, tmp_path))
    layer = llm.decoder_layers(model)[0]
    plan = inputs.stages(layer)
    assert [g for s in plan.groups for g in s] == llm.sublayer_groups(layer)
    with torch.no_grad():
        for x in inputs.inputs:
            assert driver._stages_agree(layer, plan, inputs.run_layer, x)
            assert driver._entries_agree(layer, plan, x)  # each half's first linears read its norm's output


class _Counter:
    def __init__(self, model):
        self.calls = 0
        for layer in llm.decoder_layers(model):
            layer.mlp.down_proj.register_forward_pre_hook(self.hook)
            layer.self_attn.q_proj.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_staged_capture_gives_the_same_weights_with_fewer_forwards(method, tmp_path, caplog):
    path = make_tiny_causal_lm("llama", tmp_path)
    weights, calls = [], []
    for staged in (False, True):
        model, inputs = _model(path)
        counter = _Counter(model)
        cfg = SolverConfig(method=method, bits=4)
        with caplog.at_level(logging.WARNING, logger="common.pipeline.driver"):
            recs = quantize_blocks(llm.decoder_layers(model), inputs.inputs, inputs.run_layer, llm.sublayer_groups,
                                   cfg, prepare_block=llm.make_prepare_layer(llm.ActQuantSettings(bits=4)),
                                   device="cpu", stages=inputs.stages if staged else None)
        assert "do not reproduce" not in caplog.text
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        calls.append(counter.calls)
        assert len(recs) == 2 * 7
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name
    assert calls[1] < calls[0]


def test_stages_that_disagree_fall_back_to_the_whole_block(tmp_path, caplog):
    model, inputs = _model(make_tiny_causal_lm("llama", tmp_path))
    layer = llm.decoder_layers(model)[0]
    good = inputs.stages(layer)
    bad = type(good)(good.groups, lambda blk, s, x: good.run(blk, s, x) * (1.0 if s else 1.5))
    with caplog.at_level(logging.WARNING, logger="common.pipeline.driver"):
        plan = driver._plan(layer, llm.sublayer_groups(layer), lambda blk: bad, inputs.run_layer, inputs.inputs[0],
                            torch.device("cpu"))
    assert len(plan.groups) == 1 and "do not reproduce" in caplog.text
    with pytest.raises(ValueError, match="expected"):
        driver._plan(layer, llm.sublayer_groups(layer)[::-1], inputs.stages, inputs.run_layer, inputs.inputs[0],
                     torch.device("cpu"))


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_stage_entry_gives_the_same_weights_without_running_the_stage(method, tmp_path):
    """Each half's first group (k/v/q, up/gate) formed from the half's norm (BlockStages.entry) instead of a partial
    forward: the same weights bit for bit, and the attention / MLP forwards run fewer times."""
    path = make_tiny_causal_lm("llama", tmp_path)
    weights, calls = [], []
    for use_entry in (False, True):
        model, inputs = _model(path)
        runs = []
        for layer in llm.decoder_layers(model):
            layer.self_attn.register_forward_pre_hook(lambda m, a, k: runs.append(1), with_kwargs=True)
            layer.mlp.register_forward_pre_hook(lambda m, a: runs.append(1))

        def stages(layer, use_entry=use_entry, inputs=inputs):
            plan = inputs.stages(layer)
            return plan if use_entry else type(plan)(plan.groups, plan.run)

        quantize_blocks(llm.decoder_layers(model), inputs.inputs, inputs.run_layer, llm.sublayer_groups,
                        SolverConfig(method=method, bits=4),
                        prepare_block=llm.make_prepare_layer(llm.ActQuantSettings(bits=4)), device="cpu",
                        stages=stages)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        calls.append(len(runs))
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name
    assert calls[1] < calls[0]


def test_a_wrong_stage_entry_is_not_used(tmp_path):
    model, inputs = _model(make_tiny_causal_lm("llama", tmp_path))
    layer = llm.decoder_layers(model)[0]
    llm.make_prepare_layer(llm.ActQuantSettings(bits=4))(layer)
    good = inputs.stages(layer)
    bad = type(good)(good.groups, good.run, lambda blk, s, x: good.entry(blk, s, x) * 1.5)
    plan = driver._plan(layer, llm.sublayer_groups(layer), lambda blk: bad, inputs.run_layer, inputs.inputs[0],
                        torch.device("cpu"))
    assert len(plan.groups) == 2 and plan.entry is None
    assert driver._plan(layer, llm.sublayer_groups(layer), inputs.stages, inputs.run_layer, inputs.inputs[0],
                        torch.device("cpu")).entry is not None
