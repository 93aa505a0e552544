"""Export weight-only quantized linears in the standard GPTQ checkpoint layout.

For a linear W [out, in] quantized to b bits with groups of g input columns (codes c, scales s, zero points z,
group index g_idx; W^ = s[g_idx] * (c - z[g_idx])):
    qweight  int32 [in * b / 32, out]     codes packed along the input dim,
    qzeros   int32 [groups, out * b / 32]  zero points packed along the output dim (format "gptq" stores z - 1,
                                           "gptq_v2" stores z),
    scales   float16 [groups, out],   g_idx int32 [in],   bias float16 [out] where present.
Packing: every run of 32 consecutive codes forms a little-endian bit stream of 32*b bits cut into b int32 words
(code k occupies bits [k*b, (k+1)*b)); for b = 2, 4, 8 that is plain nibble/byte packing, for b = 3 codes straddle words.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .solvers import QuantResult

__all__ = ["EXPORT_BITS", "CHECKPOINT_FORMATS", "pack_codes", "pack_linear", "check_exportable", "export_gptq"]

EXPORT_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [K, N] along dim 0 into int32 [K * bits / 32, N] (K a multiple of 32)."""
    if bits not in EXPORT_BITS:
        raise ValueError(f"export supports bits {EXPORT_BITS}, got {bits}")
    K, N = codes.shape
    if K % 32:
        raise ValueError(f"cannot pack {K} rows: the packed dimension must be a multiple of 32")
    c = codes.to(torch.int64).reshape(K // 32, 32, N)
    if c.min() < 0 or c.max() >= 2**bits:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}]")
    words = torch.zeros(K // 32, bits, N, dtype=torch.int64)
    for k in range(32):
        offset = k * bits
        word, shift = divmod(offset, 32)
        words[:, word] |= (c[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code straddles two words (3 bits only)
            words[:, word + 1] |= c[:, k] >> (32 - shift)
    words = words.reshape(K // 32 * bits, N)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def check_exportable(name: str, result: QuantResult, checkpoint_format: str) -> None:
    """Raise a ValueError naming the layer if `result` cannot be written in the requested GPTQ layout."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"--export_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if result.codes is None or result.bits not in EXPORT_BITS:
        raise ValueError(f"{name}: export needs weights quantized to {EXPORT_BITS} bits, got {result.bits}")
    out, inp = result.codes.shape
    if inp % 32 or out % 32:
        raise ValueError(f"{name}: export packs 32 codes at a time; in_features {inp} and out_features {out} "
                         "must be multiples of 32")
    if checkpoint_format == "gptq" and bool((result.zeros == 0).any()):
        raise ValueError(f"{name}: a zero point of 0 cannot be stored in the 'gptq' (v1, zero - 1) format; "
                         "use --export_format gptq_v2 or symmetric weights (drop --w_asym)")


def pack_linear(result: QuantResult, bias: torch.Tensor | None, checkpoint_format: str = "gptq",
                name: str = "layer") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear layer: qweight, qzeros, scales, g_idx (and bias)."""
    check_exportable(name, result, checkpoint_format)
    zeros = result.zeros.round().to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = zeros - 1
    tensors = {
        "qweight": pack_codes(result.codes.t().contiguous(), result.bits),
        "qzeros": pack_codes(zeros.contiguous(), result.bits).t().contiguous(),
        "scales": result.scales.t().contiguous().to(torch.float16),
        "g_idx": result.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16).contiguous()
    return tensors


def export_gptq(model: nn.Module, results: dict[str, QuantResult], out_dir: str | os.PathLike, *, bits: int,
                group_size: int, sym: bool, desc_act: bool, static_groups: bool = False, damp_percent: float = 0.01,
                checkpoint_format: str = "gptq", tokenizer=None, method: str = "gptq") -> Path:
    """Write `model` with the linears named in `results` (module names) packed as GPTQ tensors.

    Everything else of the model is stored as is in float16.  Writes model.safetensors, config.json with a
    `quantization_config` block, quantize_config.json and the tokenizer files into a temporary folder first and
    renames it to `out_dir` at the end, so a failed export leaves nothing half-written.
    """
    from safetensors.torch import save_file

    for name, res in results.items():
        check_exportable(name, res, checkpoint_format)
    modules = dict(model.named_modules())
    missing = [n for n in results if n not in modules]
    if missing:
        raise ValueError(f"export: no module named {missing[0]!r} in the model")
    state = {}
    for key, value in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in results and leaf in ("weight", "bias"):
            continue
        state[key] = value.detach().to(torch.float16) if value.is_floating_point() else value.detach()
    for name, res in results.items():
        bias = getattr(modules[name], "bias", None)
        for leaf, tensor in pack_linear(res, bias, checkpoint_format, name).items():
            state[f"{name}.{leaf}"] = tensor
    # tied weights are stored once by save_pretrained; a GPTQ export keeps them as separate tensors
    state = {k: v.contiguous().clone() for k, v in state.items()}

    qcfg = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "static_groups": static_groups, "true_sequential": True, "damp_percent": damp_percent,
        "checkpoint_format": checkpoint_format, "format": checkpoint_format, "pack_dtype": "int32",
        "lm_head": False, "meta": {"quantizer": [f"gptaq:{method}"]},
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("gptaq_rotation", None)
        config["quantization_config"] = qcfg
        config["dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
