"""A block as a chain of stages, so that the block driver can capture each group of linears from its own stage's input.

For a pre-norm transformer block the stages are its residual halves: h -> h + attn(norm1(h)) holding the
attention's linears and h -> h + mlp(norm2(h)) holding the MLP's.  `common.pipeline.driver.quantize_blocks` then
captures a group by running only its stage (not the block from its start) and advances the calibration streams
stage by stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["BlockStages"]


@dataclass(frozen=True)
class BlockStages:
    """A block as a chain of stages, block(x) = run(block, S-1, ... run(block, 0, x)), stage s holding the linear
    groups groups[s] (in solve order; all of them together = sublayer_groups(block)).  E.g. a pre-norm transformer
    block: its attention half h -> h + attn(norm1(h)) and its MLP half h -> h + mlp(norm2(h)).

    The driver then captures each group from its stage's input instead of from the block's input, and advances the
    streams stage by stage, so no group's capture re-runs the stages before it.  Exact: the stages compute what
    the block computes, and the driver checks that on the first batch of every block (`_stages_agree`).

    entry(block, s, x), optional: the tensor that the linears of stage s's first group are called with (their
    wrappers' input, e.g. the stage's norm of x), so that this group is captured without running the stage's
    forward up to it; the driver checks it bit for bit against the hooked inputs on the first batch of every block
    and otherwise runs the stage."""

    groups: list[list[list[str]]]
    run: Callable[[nn.Module, int, torch.Tensor], torch.Tensor]
    entry: Callable[[nn.Module, int, torch.Tensor], torch.Tensor] | None = None
