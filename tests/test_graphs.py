"""CUDA-graph replay of the driver's per-batch passes (common.pipeline.graphs.BatchPass): eager on the CPU; on a GPU the
same weights bit for bit as eager passes, a pass with a host synchronisation stays eager, kept outputs are copies.
The GPU tests are skipped without CUDA (CI); bench/RESULTS.md records them run on a lent GPU."""
from __future__ import annotations

import logging

import pytest
import torch

from common.models import llm
from common.pipeline.driver import quantize_blocks
from common.pipeline.graphs import BatchPass
from common.solver import SolverConfig
from fixtures import make_tiny_causal_lm, make_tiny_moe_lm, rotated_quantized_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_pass_on_the_cpu_runs_eagerly_on_every_batch():
    calls = []
    p = BatchPass(lambda x: calls.append(1) or {"y": x * 2}, torch.device("cpu"), graphs=True)
    for i in range(3):
        x = torch.full((4,), float(i))
        assert torch.equal(p(x)["y"], x * 2)
    assert len(calls) == 3 and not p.replaying


@cuda
def test_a_replayed_pass_gives_each_batch_its_own_result_and_kept_outputs_survive(caplog):
    caplog.set_level(logging.INFO, logger="common.pipeline.graphs")
    w = torch.randn(64, 64, device="cuda")
    xs = [torch.randn(8, 64, device="cuda") for _ in range(4)]
    torch.relu(xs[0] @ w) + 1  # first calls (cuBLAS handle, kernel loads) outside the pass
    torch.cuda.synchronize()
    p = BatchPass(lambda x: {"y": torch.relu(x @ w) + 1}, torch.device("cuda"), graphs=True)
    kept = []
    for x in xs:
        kept.append(p.keep(p(x)["y"]))
    assert p.replaying, caplog.text
    for x, y in zip(xs, kept):
        assert torch.equal(y, torch.relu(x @ w) + 1)
    other = p(torch.randn(3, 64, device="cuda"))["y"]  # another shape: eager
    assert other.shape == (3, 64)
    p.close()


@cuda
def test_a_pass_with_a_host_sync_stays_eager(caplog):
    def fn(x):
        n = int((x > 0).sum())  # data-dependent host value: cannot be captured
        return {"y": x[:1] * n}

    p = BatchPass(fn, torch.device("cuda"), graphs=True, label="syncing pass")
    with caplog.at_level(logging.INFO, logger="common.pipeline.graphs"):
        for _ in range(3):
            x = torch.randn(5, 4, device="cuda")
            assert torch.equal(p(x)["y"], x[:1] * int((x > 0).sum()))
    assert not p.replaying and "synchronises with the host" in caplog.text


@cuda
@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_graphed_capture_gives_the_eager_weights_bit_for_bit(method, tmp_path):
    path = make_tiny_causal_lm("llama", tmp_path)
    weights = []
    for graphs in (False, True):
        model, batches = rotated_quantized_model(path, nbatches=4)
        inputs = llm.capture_layer_inputs(model, batches, "cuda")
        quantize_blocks(llm.decoder_layers(model), inputs.inputs, inputs.run_layer, llm.sublayer_groups,
                        SolverConfig(method=method, bits=4),
                        prepare_block=llm.make_prepare_layer(llm.ActQuantSettings(bits=4)), device="cuda",
                        stages=inputs.stages, cuda_graphs=graphs)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


@cuda
@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_routed_experts_with_graphs_give_the_eager_weights(method, tmp_path):
    """An MoE layer (routing computed on the host: its passes cannot be captured) ends with the same weights."""
    path = make_tiny_moe_lm("qwen2_moe", tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 300, (2, 32), generator=g) for _ in range(3)]
    weights = []
    for graphs in (False, True):
        model = llm.load_model(str(path), "float32")
        inputs = llm.capture_layer_inputs(model, batches, "cuda")
        quantize_blocks(llm.decoder_layers(model)[:1], inputs.inputs, inputs.run_layer, llm.sublayer_groups,
                        SolverConfig(method=method, bits=4, group_size=32),
                        prepare_block=llm.make_prepare_layer(llm.ActQuantSettings()), device="cuda",
                        stages=inputs.stages, cuda_graphs=graphs)
        weights.append({n: p.detach().clone() for n, p in llm.decoder_layers(model)[0].named_parameters()})
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


@cuda
def test_graphed_layers_leave_no_memory_behind(tmp_path):
    """A second quantize_blocks run with graphs starts and ends at the same allocated memory (graphs, their
    buffers and the capture stream's library state are freed or made once)."""
    model, batches = rotated_quantized_model(make_tiny_causal_lm("llama", tmp_path), nbatches=3)
    inputs = llm.capture_layer_inputs(model, batches, "cuda")
    allocated = []
    for _ in range(3):
        quantize_blocks(llm.decoder_layers(model), inputs.inputs, inputs.run_layer, llm.sublayer_groups,
                        SolverConfig(method="gptaq", bits=4),
                        prepare_block=llm.make_prepare_layer(llm.ActQuantSettings(bits=4)), device="cuda",
                        stages=inputs.stages, cuda_graphs=True)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[2] <= allocated[1], allocated  # no growth from one run to the next
