"""Streaming calibration statistics for one linear layer.

With X~ the inputs the (partly) quantized model feeds the layer and X the full-precision model's inputs
(columns are tokens), both accumulated in float32 and rescaled so that after N tokens
    H     = (2/N) * sum_t x~_t x~_t^T            (the GPTQ Hessian of ||W X~ - Q X~||^2)
    dXXT  = (2/N) * sum_t (x_t - x~_t) x~_t^T    (GPTAQ's asymmetric term, dX X~^T).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["HessianAccumulator", "capture_inputs"]


class HessianAccumulator:
    """Accumulates H (and, when given the full-precision inputs, dXXT) over batches of any leading shape."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", asymmetric: bool = False):
        self.columns = columns
        self.nsamples = 0
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.dXXT = torch.zeros(columns, columns, dtype=torch.float32, device=device) if asymmetric else None

    @property
    def asymmetric(self) -> bool:
        return self.dXXT is not None

    @torch.no_grad()
    def add(self, x_tilde: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Add a batch: x_tilde (quantized-model inputs) and, for GPTAQ, x (full-precision inputs), shape [..., columns]."""
        if x_tilde.shape[-1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got shape {tuple(x_tilde.shape)}")
        xt = x_tilde.reshape(-1, self.columns).to(self.H.device, torch.float32)
        n = xt.shape[0]
        total = self.nsamples + n
        self.H.mul_(self.nsamples / total)
        xs = xt * (2.0 / total) ** 0.5
        self.H.addmm_(xs.t(), xs)
        if self.dXXT is not None:
            if x is None or x.shape != x_tilde.shape:
                raise ValueError("GPTAQ statistics need the full-precision input x with the same shape as x_tilde")
            dx = x.reshape(-1, self.columns).to(self.H.device, torch.float32) - xt
            self.dXXT.mul_(self.nsamples / total)
            self.dXXT.addmm_(dx.t(), xt, alpha=2.0 / total)
        self.nsamples = total


class capture_inputs:
    """Context manager: record the input of every listed linear layer into a HessianAccumulator via forward hooks.

    `modules` maps names to nn.Linear (or any module whose forward input is the linear's input).
    With `fp_inputs` (name -> list of tensors, one per forward call, in call order) the accumulators are
    asymmetric and pair the i-th captured call with the i-th full-precision tensor.
    Use `input_fn` to map a module's raw input to what its weight sees (e.g. ActQuantLinear.quantized_input).
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device | str = "cpu",
                 asymmetric: bool = False, input_fn=None):
        self.modules = modules
        self.stats = {n: HessianAccumulator(self._columns(m), device, asymmetric) for n, m in modules.items()}
        self.asymmetric = asymmetric
        self.input_fn = input_fn
        self.fp_inputs: dict[str, list[torch.Tensor]] = {}
        self._calls = {n: 0 for n in modules}
        self._handles: list = []

    @staticmethod
    def _columns(m: nn.Module) -> int:
        w = m.weight
        return w.shape[1]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self.input_fn is not None:
                x = self.input_fn(module, x)
            fp = None
            if self.asymmetric:
                fp = self.fp_inputs[name][self._calls[name]]
            self.stats[name].add(x, fp)
            self._calls[name] += 1
        return hook

    def __enter__(self) -> dict[str, HessianAccumulator]:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self.stats

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
