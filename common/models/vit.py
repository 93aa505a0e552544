"""timm vision transformers for block-by-block quantization: loading, stem, blocks, sublayer groups, head.

logits = head(norm(B_L(... B_1(stem(images)) ...))): the stem (patch embedding, class/distillation tokens,
absolute position embedding, EVA's rotary embedding) runs once, each block B_l is quantized in turn by
`common.pipeline.driver.quantize_blocks`, and norm + head stay in full precision (16 bits).  Every nn.Linear inside a block
takes a per-token activation quantizer on its input (`common.quant.act_quant`); the classifier head does not.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch
from torch import nn

from common.models import hub
from common.models.checkpoint import compare_tensors
from common.quant.act_quant import ActQuantizer, ActQuantLinear, wrap_linears

__all__ = [
    "VitModelError", "create_model", "load_checkpoint", "check_supported", "prepare_model", "embed", "head",
    "make_run_block", "sublayer_groups", "block_linears", "make_prepare_block",
]


class VitModelError(ValueError):
    """A model that cannot be built, loaded or quantized; the message names the flag/file and what was expected."""


def _supported_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer, Eva  # VisionTransformerDistilled (DeiT distilled) subclasses VisionTransformer


def check_supported(model: nn.Module) -> None:
    """Raise VitModelError unless `model` is a timm VisionTransformer (incl. DeiT distilled) or Eva."""
    if not isinstance(model, _supported_classes()):
        raise VitModelError(f"--model: unsupported model class {type(model).__name__}; expected a timm "
                            "VisionTransformer (deit_*, vit_*, deit_*_distilled_*) or Eva (eva02_*)")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise VitModelError(f"--checkpoint: file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise VitModelError(f"--checkpoint: cannot read {path} as safetensors or a torch state dict "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("state_dict", "model", "module", "state_dict_ema", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VitModelError(f"--checkpoint: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _mismatch_summary(model: nn.Module, sd: dict[str, torch.Tensor]) -> str:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return compare_tensors(own, {k: tuple(v.shape) for k, v in sd.items()})


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a safetensors / .pth state dict strictly; timm's own checkpoint filter of the model's module
    (e.g. EVA's original-format conversion) is tried when the raw keys do not fit.  Mismatch -> one-line error."""
    sd = _read_state_dict(path)
    problem = _mismatch_summary(model, sd)
    if problem:
        filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                converted = filt(dict(sd), model)
                if not _mismatch_summary(model, converted):
                    sd, problem = converted, ""
            except Exception:  # noqa: BLE001 - the filter does not apply; report the raw mismatch
                pass
    if problem:
        raise VitModelError(f"--checkpoint: {path} does not fit {type(model).__name__} "
                            f"(check --model / --model_kwargs): {problem}")
    model.load_state_dict(sd, strict=True)


def create_model(name: str, checkpoint: str | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """timm.create_model(name, **model_kwargs) in eval mode, weights from `checkpoint` or else from the hub."""
    import timm
    if not timm.is_model(name):
        raise VitModelError(f"--model: unknown timm model name {name!r} (see timm.list_models('deit*'), "
                            "'vit_*', 'eva02_*')")
    kwargs = dict(model_kwargs or {})
    try:
        with hub.offline_unless_reachable() if checkpoint is None else contextlib.nullcontext():
            model = timm.create_model(name, pretrained=checkpoint is None, **kwargs)
    except TypeError as e:
        raise VitModelError(f"--model_kwargs: timm rejected {kwargs} for {name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - hub download failures come in many types
        if checkpoint is None:
            where = "the Hub is not reachable and they are not in the local cache" if not hub.reachable() else \
                f"fetching them from the Hugging Face Hub failed ({type(e).__name__})"
            raise VitModelError(f"--model: no pretrained weights for {name}: {where}; offline, pass "
                                "--checkpoint <file.safetensors|.pth>") from None
        raise VitModelError(f"--model: timm could not build {name} with {kwargs}: {e}") from None
    check_supported(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def prepare_model(model: nn.Module) -> None:
    """Make every block linear reachable through its module call: EVA's fused qkv with q/v biases otherwise
    calls F.linear on `qkv.weight` directly; qkv_bias_separate computes the same qkv(x) + bias."""
    for m in model.modules():
        if hasattr(m, "qkv_bias_separate") and getattr(m, "q_bias", None) is not None:
            m.qkv_bias_separate = True


# ----------------------------------------------------------------------------------------------- forward pieces


def _is_eva(model: nn.Module) -> bool:
    from timm.models.eva import Eva
    return isinstance(model, Eva)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stem: images [B, 3, H, W] -> (block-0 tokens [B, N, D], EVA rotary embedding or None)."""
    x = model.patch_embed(images)
    if _is_eva(model):
        x, rope = model._pos_embed(x)
    else:
        x, rope = model._pos_embed(x), None
        x = model.patch_drop(x)
    return model.norm_pre(x), rope


def make_run_block(model: nn.Module, rope: torch.Tensor | None) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """run_block(block, x) for the driver; EVA blocks get `rope` (per block when the model mixes rope by depth)."""
    if rope is None:
        return lambda block, x: block(x)
    if getattr(model, "rope_mixed", False):
        index = {id(b): i for i, b in enumerate(model.blocks)}
        return lambda block, x: block(x, rope=rope[index[id(block)]])
    return lambda block, x: block(x, rope=rope)


@torch.no_grad()
def head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final norm, pooling and classifier head(s) (DeiT distilled averages its two heads in eval mode)."""
    return model.forward_head(model.norm(x))


# ----------------------------------------------------------------------------------------------- blocks


def _linear(block: nn.Module, name: str) -> bool:
    try:
        m = block.get_submodule(name)
    except AttributeError:
        return False
    return isinstance(m, (nn.Linear, ActQuantLinear))


def block_linears(block: nn.Module) -> list[str]:
    """Names (relative to the block) of its linear layers; a wrapped one counts once, by the wrapper's name."""
    wrapped = {n for n, m in block.named_modules() if isinstance(m, ActQuantLinear)}
    return [n for n, m in block.named_modules()
            if isinstance(m, (nn.Linear, ActQuantLinear)) and n.rpartition(".")[0] not in wrapped]


_GROUPS = (
    ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.gate"),  # attention inputs (one shared X)
    ("attn.proj",),
    ("mlp.fc1_g", "mlp.fc1_x", "mlp.fc1"),                                     # SwiGLU pair or plain / GLU fc1
    ("mlp.fc2",),
)


def sublayer_groups(block: nn.Module) -> list[list[str]]:
    """Solve order: [attention in-projections] -> [attn.proj] -> [mlp.fc1(_g, _x)] -> [mlp.fc2].

    Raises VitModelError when the block has a linear outside these groups (an unsupported block type)."""
    groups = [[n for n in group if _linear(block, n)] for group in _GROUPS]
    groups = [g for g in groups if g]
    covered = {n for g in groups for n in g}
    extra = [n for n in block_linears(block) if n not in covered]
    if extra:
        raise VitModelError(f"--model: block type {type(block).__name__} has linear layers {extra} outside the "
                            "supported groups (attn.qkv|q/k/v_proj, attn.proj, mlp.fc1(_g/_x), mlp.fc2)")
    return groups


def make_prepare_block(bits: int = 16, sym: bool = False, clip_ratio: float = 1.0,
                       groupsize: int = -1) -> Callable[[nn.Module], None]:
    """prepare_block(block): wrap every block linear in ActQuantLinear with a fresh per-token ActQuantizer."""
    def prepare(block: nn.Module) -> None:
        for wrapper in wrap_linears(block).values():
            wrapper.quantizer = ActQuantizer(bits=bits, sym=sym, clip_ratio=clip_ratio, groupsize=groupsize)
    return prepare
