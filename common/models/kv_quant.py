"""KV-cache quantization and QuaRot's R3 (online Hadamard on queries and keys after RoPE).

R3:  q' = RoPE(q) H,  k' = RoPE(k) H  with H the orthonormal head_dim x head_dim Hadamard matrix, so
     q' k'^T = RoPE(q) RoPE(k)^T exactly, while the rotated keys have no outlier channels.
K/V: k^ = Q_b(k') and v^ = Q_b(v) per head and token (group = head_dim, or a smaller group size), on the
     `common.quant.grid` grid via `ActQuantizer`; the cache stores k^, v^ and the attention reads exactly those.

How it is installed (transformers 5 Llama / Qwen2 / Qwen3 / Mistral attention): the attention forward calls the
module-level `apply_rotary_pos_emb(q, k, cos, sin)` and then `past_key_values.update(k, v, ...)`.  Each
attention instance's class becomes a subclass (same name) whose forward runs the class's forward code with globals
in which `apply_rotary_pos_emb` is replaced by: original RoPE -> R3 on q and k (if `rotate_qk`) -> key quantizer
(a class rather than a bound method in the instance: the module does not refer to itself, so a dropped copy of it
is freed at once, not at the next garbage collection; a deep copy keeps the class).  So
keys are quantized before they reach the cache, with or without a cache, for eager and sdpa attention and
during generation.  Values never see RoPE: a forward hook quantizes the v_proj output per head and token.

`k_pre_rope=True` quantizes keys just before RoPE instead (the k_proj output; for Qwen3 after its k_norm);
R3 is then not applied (it only matters for quantizing post-RoPE keys), and the cache holds RoPE(k^).
"""
from __future__ import annotations

import functools
import types
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from common.quant.act_quant import ActQuantizer
from common.models.hadamard import hadamard_transform

__all__ = ["KVQuantConfig", "KVCacheQuantizer", "add_kv_quantization", "remove_kv_quantization",
           "kv_quantizers", "kv_group"]

ROPE_FN = "apply_rotary_pos_emb"


@dataclass
class KVQuantConfig:
    """K/V cache quantization and R3 settings (QuaRot flags: --k_bits, --k_groupsize, --k_asym, ...).

    bits 16 = not quantized.  groupsize -1 = one group per head and token (head_dim channels); a positive
    group size must divide head_dim.  sym=False is the asymmetric grid (QuaRot's --k_asym / --v_asym).
    """

    k_bits: int = 16
    k_groupsize: int = -1
    k_sym: bool = False
    k_clip_ratio: float = 1.0
    k_pre_rope: bool = False
    v_bits: int = 16
    v_groupsize: int = -1
    v_sym: bool = False
    v_clip_ratio: float = 1.0
    rotate_qk: bool = False
    fp32_had: bool = False

    def __post_init__(self) -> None:
        for kv in ("k", "v"):
            bits, gs, clip = (getattr(self, f"{kv}_{f}") for f in ("bits", "groupsize", "clip_ratio"))
            if isinstance(bits, bool) or not isinstance(bits, int) or not (bits == 16 or 2 <= bits <= 8):
                raise ValueError(f"--{kv}_bits must be 16 (off) or an integer in 2..8, got {bits!r}")
            if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs > 0):
                raise ValueError(f"--{kv}_groupsize must be -1 (per head) or a positive integer, got {gs!r}")
            if not 0.0 < float(clip) <= 1.0:
                raise ValueError(f"--{kv}_clip_ratio must be in (0, 1], got {clip!r}")

    @property
    def active(self) -> bool:
        """True when installing it changes anything."""
        return self.k_bits < 16 or self.v_bits < 16 or self.rotate_qk


def kv_group(groupsize: int, head_dim: int) -> int:
    """The channels a K/V quantizer's row holds: the group size, or the whole head (-1 or >= head_dim)."""
    return groupsize if 0 < groupsize < head_dim else head_dim


def _quantizer(bits: int, sym: bool, clip: float, groupsize: int, head_dim: int, flag: str) -> ActQuantizer:
    if groupsize > 0 and head_dim % groupsize:
        raise ValueError(f"--{flag} {groupsize} must divide head_dim {head_dim}")
    return ActQuantizer(bits=bits, sym=sym, clip_ratio=clip, groupsize=kv_group(groupsize, head_dim))


class KVCacheQuantizer(nn.Module):
    """Per-attention-module state: R3 switch, key quantizer (on [..., head_dim] rows) and value quantizer.

    Stored as the `kv_quantizer` submodule of the attention module it serves.
    """

    def __init__(self, cfg: KVQuantConfig, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.k_pre_rope = cfg.k_pre_rope
        self.rotate_qk = cfg.rotate_qk and not cfg.k_pre_rope
        self.fp32_had = cfg.fp32_had
        self.k_quantizer = _quantizer(cfg.k_bits, cfg.k_sym, cfg.k_clip_ratio, cfg.k_groupsize, head_dim,
                                      "k_groupsize")
        self.v_quantizer = _quantizer(cfg.v_bits, cfg.v_sym, cfg.v_clip_ratio, cfg.v_groupsize, head_dim,
                                      "v_groupsize")

    def hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """x H over the last (head_dim) dimension, in float32 when fp32_had."""
        if self.fp32_had:
            return hadamard_transform(x.float()).to(x.dtype)
        return hadamard_transform(x)

    def rope(self, rope_fn: Callable, q: torch.Tensor, k: torch.Tensor, *args, **kwargs):
        """Replacement for apply_rotary_pos_emb(q, k, cos, sin, ...): RoPE, then R3, then the key quantizer."""
        if self.k_pre_rope:
            return rope_fn(q, self.k_quantizer(k), *args, **kwargs)
        q, k = rope_fn(q, k, *args, **kwargs)
        if self.rotate_qk:
            q, k = self.hadamard(q), self.hadamard(k)
        return q, self.k_quantizer(k)

    def value_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on v_proj: output [..., kv_heads * head_dim] quantized per head (group) and token."""
        return self.v_quantizer(output)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotate_qk={self.rotate_qk}, k_pre_rope={self.k_pre_rope}"


# The attention module whose patched forward is running (set around the call, read by the RoPE replacement).
_ACTIVE: ContextVar[KVCacheQuantizer | None] = ContextVar("kv_quant_active", default=None)


def _rope_dispatch(rope_fn: Callable, q: torch.Tensor, k: torch.Tensor, *args, **kwargs):
    kvq = _ACTIVE.get()
    if kvq is None:
        return rope_fn(q, k, *args, **kwargs)
    return kvq.rope(rope_fn, q, k, *args, **kwargs)


def _with_rope_dispatch(fn: types.FunctionType) -> types.FunctionType | None:
    """fn's code with `apply_rotary_pos_emb` resolved to `_rope_dispatch`; None when fn does not call it.

    A decorated forward (functools.wraps-style wrappers, e.g. transformers' deprecate_kwarg) is rebuilt around the
    patched inner function, so the decorator's behaviour stays."""
    inner = getattr(fn, "__wrapped__", None)
    if isinstance(inner, types.FunctionType):
        cells = fn.__closure__ or ()
        new_inner = _with_rope_dispatch(inner)
        if new_inner is None or not any(c.cell_contents is inner for c in cells):
            return None
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in cells)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        new.__dict__.update(fn.__dict__)
        new.__wrapped__ = new_inner
    elif ROPE_FN in fn.__code__.co_names and ROPE_FN in fn.__globals__:
        scope = dict(fn.__globals__)
        scope[ROPE_FN] = functools.partial(_rope_dispatch, fn.__globals__[ROPE_FN])
        new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        return None
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


@functools.cache
def _patched_forward(cls: type) -> types.FunctionType:
    """cls.forward's code with `apply_rotary_pos_emb` resolved to `_rope_dispatch` (one per attention class)."""
    fn = cls.forward
    new = _with_rope_dispatch(fn) if isinstance(fn, types.FunctionType) else None
    if new is None:
        raise ValueError(f"{cls.__name__}.forward does not call the module-level {ROPE_FN}; "
                         "KV-cache quantization supports Llama/Qwen2/Qwen3/Mistral-style attention")
    return new


def _base_class(attn: nn.Module) -> type:
    """The attention module's own class (the one `add_kv_quantization` subclassed, if installed)."""
    return getattr(type(attn), "_kv_quant_base", type(attn))


@functools.cache
def _kv_quant_class(cls: type) -> type:
    """A subclass of the attention class `cls` (same name and module) whose forward runs `_patched_forward(cls)`
    with the instance's `kv_quantizer` active."""
    patched = _patched_forward(cls)

    def forward(self, *args, **kwargs):
        token = _ACTIVE.set(self.kv_quantizer)
        try:
            return patched(self, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    forward.__qualname__ = f"{cls.__qualname__}.forward"
    return type(cls.__name__, (cls,), {"forward": forward, "_kv_quant_base": cls, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _forward_attr(attn: nn.Module) -> str:
    # accelerate's hooks (device_map) call module._old_forward; patch that one when present.
    return "_old_forward" if hasattr(attn, "_hf_hook") and hasattr(attn, "_old_forward") else "forward"


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules()
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim", "layer_idx"))]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no Llama-style attention modules (q_proj/k_proj/v_proj)")
    return mods


def _remove(attn: nn.Module) -> None:
    kvq = attn.kv_quantizer
    for m in attn.modules():
        for key, hook in list(m._forward_hooks.items()):
            if getattr(hook, "__self__", None) is kvq:
                del m._forward_hooks[key]
    attn.__class__ = _base_class(attn)
    if _forward_attr(attn) == "_old_forward":
        attn._old_forward = types.MethodType(type(attn).forward, attn)
    del attn.kv_quantizer


def add_kv_quantization(model: nn.Module, cfg: KVQuantConfig) -> None:
    """Install R3 and K/V quantization on every attention module of `model` (idempotent: re-installing
    replaces the previous settings).  A config with nothing to do removes any installed quantization."""
    attns = _attention_modules(model)
    if cfg.k_pre_rope and cfg.rotate_qk:
        warnings.warn("k_pre_rope=True: keys are quantized before RoPE, so R3 (rotate_qk) is not applied")
    for attn in attns:  # validate everything before touching the model
        _kv_quant_class(_base_class(attn))
        KVCacheQuantizer(cfg, attn.head_dim)
        if cfg.rotate_qk and not cfg.k_pre_rope:
            hadamard_transform(torch.zeros(1, attn.head_dim))
    remove_kv_quantization(model)
    if not cfg.active:
        return
    for attn in attns:
        kvq = KVCacheQuantizer(cfg, attn.head_dim)
        attn.kv_quantizer = kvq
        attn.v_proj.register_forward_hook(kvq.value_hook)
        attn.__class__ = _kv_quant_class(type(attn))
        if _forward_attr(attn) == "_old_forward":  # accelerate's hook calls the bound method it saved
            attn._old_forward = types.MethodType(type(attn).forward, attn)


def remove_kv_quantization(model: nn.Module) -> None:
    """Undo add_kv_quantization (no-op where nothing is installed)."""
    for attn in list(model.modules()):
        if isinstance(getattr(attn, "kv_quantizer", None), KVCacheQuantizer):
            _remove(attn)


def kv_quantizers(model: nn.Module) -> dict[str, KVCacheQuantizer]:
    """{attention module name: its KVCacheQuantizer} for the installed ones."""
    return {name: m.kv_quantizer for name, m in model.named_modules()
            if isinstance(getattr(m, "kv_quantizer", None), KVCacheQuantizer)}
