"""Non-finite results are failures, never numbers: `check_metrics` raises `NonFiniteError` for a NaN / inf
metric and names where the non-finite values come from, found in this order: a parameter or buffer of the model
that is not finite, the first solved linear whose proxy loss is not finite, or the first module whose output is
not finite in a forward of (the start of) one evaluation input.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["NonFiniteError", "non_finite_tensor", "non_finite_layer", "non_finite_module", "check_metrics"]


class NonFiniteError(ValueError):
    """A metric came out NaN or infinite; the message says which and where the non-finite values start."""


def _finite(value: Any) -> bool:
    return not isinstance(value, (int, float)) or isinstance(value, bool) or math.isfinite(value)


def non_finite_tensor(model: nn.Module) -> str | None:
    """'name (n of m values)' of the first parameter or buffer holding NaN / inf (meta tensors are skipped)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta or not t.is_floating_point():
            continue
        bad = int((~torch.isfinite(t.detach())).sum())
        if bad:
            return f"{name} ({bad} of {t.numel()} values)"
    return None


def non_finite_layer(layers: list[dict]) -> str | None:
    """'block b, linear n' of the first per-linear record (common.pipeline.driver) whose proxy loss is not finite."""
    for rec in layers:
        if not all(_finite(rec.get(k)) for k in ("loss", "asym_loss")):
            return f"block {rec.get('block')}, linear {rec.get('name')} (proxy loss {rec.get('loss')})"
    return None


@torch.no_grad()
def non_finite_module(model: nn.Module, forward: Callable[[], Any]) -> str | None:
    """Name of the first module (in call order) whose output holds NaN / inf during `forward()`."""
    found: list[str] = []

    def hook(name):
        def check(module, args, out):
            t = out[0] if isinstance(out, (tuple, list)) and out else out
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        forward()
    except Exception:  # noqa: BLE001 - a diagnosis only: whatever it found before failing is kept
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def check_metrics(metrics: dict[str, Any], model: nn.Module | None = None, layers: list[dict] | None = None,
                  forward: Callable[[], Any] | None = None) -> None:
    """Raise NonFiniteError when a value of `metrics` ({name: number}) is NaN / inf, naming the first of: a
    non-finite tensor of `model`, a non-finite proxy loss in `layers`, the first module whose output is not
    finite in `forward()` (a forward of one evaluation input through `model`)."""
    bad = {k: v for k, v in metrics.items() if not _finite(v)}
    if not bad:
        return
    where = (non_finite_tensor(model) if model is not None else None) or \
        (non_finite_layer(layers) if layers else None) or \
        (non_finite_module(model, forward) if model is not None and forward is not None else None)
    names = ", ".join(f"{k} = {v}" for k, v in bad.items())
    hint = f"the first non-finite values are in {where}" if where else "no non-finite weight or output was located"
    raise NonFiniteError(f"non-finite result: {names}; {hint}")
