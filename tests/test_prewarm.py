"""common.pipeline.prewarm: the warm-up problems are valid for every solver setting (a failure there would only be
logged), nothing runs off CUDA, and a failed warm-up never fails the run; llm.act_quant_widths."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.models import llm
from common.models.kv_quant import KVQuantConfig
from common.pipeline import prewarm
from common.quant.act_quant import ActQuantSettings
from common.solver import SolverConfig
from fixtures import tiny_config


@pytest.mark.parametrize("cfg", [
    SolverConfig(method="gptq", bits=4, mse=True),
    SolverConfig(method="gptaq", bits=4, sym=True, mse=True),
    SolverConfig(method="gptaq", bits=3, group_size=64, act_order=True, static_groups=True),
    SolverConfig(method="gptq", bits=4, group_size=256, blocksize=128),
])
def test_solver_warmup_problem_is_valid(cfg):
    prewarm._solver_call(cfg, torch.device("cpu"))()  # raises if the tiny problem does not suit cfg


def test_nothing_runs_off_cuda():
    warm = prewarm.start("cpu", torch.float16, SolverConfig(method="gptq", bits=4), {(64, False)})
    assert warm._futures == [] and warm.wait() >= 0.0


def test_a_failed_warmup_is_logged_not_raised(caplog):
    def fail():
        raise RuntimeError("no compiler")

    pool = ThreadPoolExecutor(max_workers=1)
    warm = prewarm.Prewarm([pool.submit(fail)], pool)
    with caplog.at_level(logging.DEBUG, logger=prewarm.__name__):
        warm.wait()
    assert "no compiler" in caplog.text and warm.wait() >= 0.0


def test_act_quant_widths():
    config = tiny_config("qwen3", 128)  # hidden 64, intermediate 96, 4 heads of 16: o_proj reads 64
    none = KVQuantConfig()
    assert llm.act_quant_widths(config, ActQuantSettings(), none) == set()
    assert llm.act_quant_widths(config, ActQuantSettings(bits=4), none) == {(64, False), (96, False)}
    assert llm.act_quant_widths(config, ActQuantSettings(bits=4, groupsize=32, sym=True), none) == {(32, True)}
    kv = KVQuantConfig(k_bits=4, k_sym=True, v_bits=4, v_groupsize=8)
    assert llm.act_quant_widths(config, ActQuantSettings(), kv) == {(16, True), (8, False)}
