"""Perplexity of a causal LM on fixed token windows, as the GPTQ/QuaRot evaluation computes it.

    PPL = exp( (1 / (B (L-1))) * sum_b sum_{t=1}^{L-1} -log p(x_{b,t+1} | x_{b,1..t}) )

over B windows of L tokens, each window scored independently (no context carried across windows).
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

__all__ = ["perplexity", "window_nll", "OpenLayer"]

OpenLayer = Callable[[int, nn.Module], AbstractContextManager]


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float32) of `ids` [b, L] under `logits` [b, L, V]."""
    shift = logits[:, :-1, :].float()
    target = ids[:, 1:].to(shift.device)
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum")


def _check(windows: torch.Tensor, bsz: int) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("windows must be a LongTensor [nwindows, seqlen] (see common.data.text.get_eval_data), got "
                         f"{type(windows).__name__} {getattr(windows, 'shape', '')} {getattr(windows, 'dtype', '')}")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must hold at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    if bsz < 1:
        raise ValueError(f"bsz must be >= 1, got {bsz}")


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


@torch.no_grad()
def _plain(model: nn.Module, batches: list[torch.Tensor], device: torch.device, desc: str) -> float:
    total = 0.0
    for ids in tqdm(batches, desc=desc):
        ids = ids.to(device)
        total += window_nll(_logits(model(input_ids=ids, use_cache=False)), ids).item()
    return total


def _module_device(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model builds for it, passes x through."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)  # read by some models' forward
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _moved(layer: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The layer on `device` for the duration, then back where it was."""
    home = _module_device(layer)
    layer.to(device)
    try:
        yield layer
    finally:
        if home is not None:
            layer.to(home)


@torch.no_grad()
def _layerwise(model: nn.Module, batches: list[torch.Tensor], device: torch.device, desc: str,
               open_layer: OpenLayer | None = None) -> float:
    """Embedding -> each decoder layer on `device` in turn -> norm -> lm_head; the model may live on the CPU.

    The per-layer inputs (causal masks, rotary position embeddings, ...) are built by the installed modeling code
    itself: every decoder layer is temporarily replaced by a recorder and the backbone is run once per batch.
    All batches' hidden states are kept on `device`.  open_layer(i, layer): a context manager giving decoder layer i
    ready to run on `device` (default: the layer itself, moved there and back; common.pipeline.streaming reads it from disk).
    """
    if open_layer is None:
        def open_layer(i: int, layer: nn.Module):
            return _moved(layer, device)
    backbone, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or head is None:
        raise ValueError("layerwise perplexity needs a Llama-like model (model.model.layers, model.model.norm, "
                         f"model.lm_head); got {type(model).__name__}")
    others = {name: child for name, child in backbone.named_children() if name != "layers"}
    homes = {name: _module_device(child) for name, child in others.items()}
    head_home = _module_device(head)
    originals = list(layers)
    records: list[list] = [[] for _ in originals]
    try:
        for child in others.values():
            child.to(device)
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, records[i])
        for ids in batches:
            backbone(input_ids=ids.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden = [r[0] for r in records[0]]
    try:
        for i, layer in enumerate(tqdm(originals, desc=f"{desc} (layers)")):
            with open_layer(i, layer) as live:
                for b, (_, args, kwargs) in enumerate(records[i]):
                    hidden[b] = _layer_out(live(hidden[b], *args, **kwargs))
            records[i] = None  # release this layer's masks / position embeddings
        head.to(device)
        total = 0.0
        for ids, h in zip(batches, hidden):
            total += window_nll(head(backbone.norm(h)), ids).item()
    finally:
        for name, child in others.items():
            if homes[name] is not None:
                child.to(homes[name])
        if head_home is not None:
            head.to(head_home)
    return total


def perplexity(model: nn.Module, windows: torch.Tensor, *, bsz: int = 1, device: torch.device | str = "cpu",
               layerwise: bool = False, desc: str = "ppl", open_layer: OpenLayer | None = None) -> float:
    """exp(mean next-token NLL) over `windows` [nwindows, seqlen] (LongTensor), scored `bsz` windows at a time.

    layerwise=False: the model must already sit on `device` (inputs are moved there).
    layerwise=True: a Llama-like model on any device (e.g. CPU) is run one decoder layer at a time on `device`,
    and left where it was. Wrapped linears (any nn.Module) are fine either way.
    open_layer(i, layer) (implies layerwise): context manager yielding decoder layer i ready to run on `device`,
    for models whose layers are not in memory (`common.pipeline.streaming.open_quantized`).
    """
    _check(windows, bsz)
    device = torch.device(device)
    batches = list(windows.split(bsz))
    was_training = model.training
    model.eval()
    try:
        if layerwise or open_layer is not None:
            total = _layerwise(model, batches, device, desc, open_layer)
        else:
            total = _plain(model, batches, device, desc)
    finally:
        model.train(was_training)
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
