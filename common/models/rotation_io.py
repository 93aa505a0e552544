"""Rotation files: the learned SpinQuant rotations R1 (hidden x hidden) and R2 (head_dim x head_dim per layer).

The file is a `torch.save` dict in the published SpinQuant layout, so either code base reads the other's files:
    {"R1": [d, d], "model.layers.{i}.self_attn.R2": [h, h] for each layer i, "meta": {...}}
`meta` (ours only) records model, hidden_size, head_dim, num_layers, bits and training settings.
Convention (same as SpinQuant): residual stream x -> x R1, values per head v -> v R2, so an input-side
weight becomes W R1, an output-side weight R1^T W, v_proj's rows per head R2^T W_v, o_proj's columns W_o R2.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.models.files import atomic_write

__all__ = ["RotationSet", "model_dims", "save_rotations", "load_rotations", "check_against_model", "r2_key"]

FORMAT = "gptaq-spinquant-rotations"
VERSION = 1
ORTHO_TOL = 1e-3  # max |R^T R - I| entry accepted on load (files may be stored in float16/bfloat16)
_R2_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.R2(?:\.weight)?$")


def r2_key(layer: int) -> str:
    """The published key of layer `layer`'s R2."""
    return f"model.layers.{layer}.self_attn.R2"


@dataclass
class RotationSet:
    """R1 [hidden, hidden], R2: one [head_dim, head_dim] per layer (None = the file has no R2), meta dict."""

    R1: torch.Tensor
    R2: list[torch.Tensor] | None
    meta: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.R1.shape[0]

    @property
    def head_dim(self) -> int | None:
        return None if self.R2 is None else self.R2[0].shape[0]

    @property
    def num_layers(self) -> int | None:
        return None if self.R2 is None else len(self.R2)


def model_dims(config) -> tuple[int, int, int]:
    """(hidden_size, head_dim, num_layers) of a transformers config (text config for multimodal ones)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.hidden_size, head_dim, config.num_hidden_layers


def save_rotations(path: str | os.PathLike, R1: torch.Tensor, R2: list[torch.Tensor], *, model: str,
                   bits: dict[str, int] | None = None, extra: dict | None = None) -> Path:
    """Write the rotation file atomically (temp file + os.replace).  Tensors are stored as float32 on CPU."""
    path = Path(path)
    _check_shapes(R1, R2, str(path))
    meta = {"format": FORMAT, "version": VERSION, "model": str(model), "hidden_size": R1.shape[0],
            "head_dim": R2[0].shape[0] if R2 else None, "num_layers": len(R2), "bits": dict(bits or {}),
            **(extra or {})}
    state: dict = {"R1": R1.detach().float().cpu().contiguous()}
    for i, r in enumerate(R2):
        state[r2_key(i)] = r.detach().float().cpu().contiguous()
    state["meta"] = meta
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_rotations(path: str | os.PathLike, config=None) -> RotationSet:
    """Read a rotation file (ours or the published SpinQuant R.bin); a directory means `<dir>/R.bin`.

    With `config` (a transformers config) the dims are checked against the model: any mismatch is a
    ValueError naming the file, what it holds and what the model needs.  Missing R2 for every layer is
    allowed (R2 = None: the caller then uses random Hadamards); missing it for only some layers is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "R.bin"
    if not path.is_file():
        raise FileNotFoundError(f"rotation file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a rotation file"
        raise ValueError(f"rotation file {path} could not be read as a torch.save dict: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"rotation file {path} holds a {type(state).__name__}, expected a dict with key 'R1'")
    R1 = state.get("R1", state.get("model.R1", state.get("R1.weight")))
    if not isinstance(R1, torch.Tensor):
        raise ValueError(f"rotation file {path} has no tensor 'R1' (keys: {sorted(state)[:6]}...)")
    r2: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        m = _R2_RE.match(key)
        if m and isinstance(value, torch.Tensor):
            r2[int(m.group(1))] = value
    R2 = None
    if r2:
        missing = sorted(set(range(max(r2) + 1)) - set(r2))
        if missing:
            raise ValueError(f"rotation file {path} lacks R2 for layers {missing}")
        R2 = [r2[i].float() for i in range(len(r2))]
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    rot = RotationSet(R1=R1.float(), R2=R2, meta=dict(meta))
    _check_shapes(rot.R1, rot.R2 or [], str(path))
    if config is not None:
        check_against_model(rot, config, str(path))
    return rot


def check_against_model(rot: RotationSet, config, source: str = "rotations") -> None:
    """ValueError unless rot fits a model with `config`'s hidden size, head_dim and layer count."""
    hidden, head_dim, layers = model_dims(config)
    have = f"hidden_size {rot.hidden_size}"
    if rot.R2 is not None:
        have += f", head_dim {rot.head_dim}, {rot.num_layers} layers"
    if rot.meta.get("model"):
        have += f" (made for {rot.meta['model']})"
    need = f"hidden_size {hidden}, head_dim {head_dim}, {layers} layers"
    if rot.hidden_size != hidden or (rot.R2 is not None and (rot.head_dim != head_dim or rot.num_layers != layers)):
        raise ValueError(f"rotation file {source} does not fit the model: it has {have}, the model needs {need}")


def _check_shapes(R1: torch.Tensor, R2: list[torch.Tensor], source: str) -> None:
    if R1.dim() != 2 or R1.shape[0] != R1.shape[1]:
        raise ValueError(f"{source}: R1 must be a square matrix, got shape {tuple(R1.shape)}")
    mats = [("R1", R1)] + [(f"R2 of layer {i}", r) for i, r in enumerate(R2)]
    for i, r in enumerate(R2):
        if r.dim() != 2 or r.shape[0] != r.shape[1] or r.shape != R2[0].shape:
            raise ValueError(f"{source}: R2 of layer {i} has shape {tuple(r.shape)}, expected square "
                             f"{tuple(R2[0].shape)} like layer 0")
    for name, r in mats:
        r = r.detach().double()
        err = (r.T @ r - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).abs().max().item()
        if not err < ORTHO_TOL:
            raise ValueError(f"{source}: {name} is not orthogonal (max |R^T R - I| = {err:.2e} > {ORTHO_TOL})")
