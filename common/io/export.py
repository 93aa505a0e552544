"""Export weight-only quantized linears in the standard GPTQ checkpoint layout.

For a linear W [out, in] quantized to b bits with groups of g input columns (codes c, scales s, zero points z,
group index g_idx; W^ = s[g_idx] * (c - z[g_idx])):
    qweight  int32 [in * b / 32, out]     codes packed along the input dim,
    qzeros   int32 [groups, out * b / 32]  zero points packed along the output dim (format "gptq" stores z - 1,
                                           "gptq_v2" stores z),
    scales   float16 or bfloat16 [groups, out] (the export dtype, as every non-quantized tensor),
    g_idx    int32 [in],   bias [out] where present.
Packing: every run of 32 consecutive codes forms a little-endian bit stream of 32*b bits cut into b int32 words
(code k occupies bits [k*b, (k+1)*b)); for b = 2, 4, 8 that is plain nibble/byte packing, for b = 3 codes straddle
words.  The exported model must be a plain architecture: weight-only quantization, no online transform (rotations
folded).  `GPTQCollector` keeps each linear's grid (`grid_tensors`: the gptq_v2 tensors with float32 scales, format-
and dtype-independent) as the driver solves it; `repack` turns a grid into the tensors of a format and dtype;
`export_gptq` writes the checkpoint directory, `write_export_files` its config / tokenizer files (also used by the
sharded writers of common.pipeline.streaming).
MoE models (`common.models.moe`): every expert's gate/up/down is its own packed linear,
mlp.experts.<e>.gate_proj / up_proj / down_proj (the per-expert layout GPTQModel loads for Mixtral and the Qwen MoEs),
the fused expert tensors are not written, the routers stay unquantized, and quantization_config lists the packed
linears (`modules_in_block_to_quantize`, so that loaders leave the routers alone).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from common.models import moe
from common.models.files import ordinary_permissions
from common.quant.act_quant import ActQuantLinear
from common.solver import QuantResult, SolverConfig

__all__ = ["ExportError", "EXPORT_BITS", "CHECKPOINT_FORMATS", "EXPORT_DTYPES", "PACK", "pack_codes", "unpack_codes",
           "pack_linear", "grid_tensors", "repack", "check_exportable", "check_export_config", "check_export_target",
           "GPTQCollector", "plain_tensor", "quantization_config", "write_export_files", "export_gptq"]

EXPORT_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
EXPORT_DTYPES = ("float16", "bfloat16")  # scales and every non-quantized tensor (--export_dtype)
GRID_FORMAT = "gptq_v2"  # grid_tensors: zero points stored as they are (any zero point, 0 included)
PACK = 32  # codes per run of `bits` int32 words: every packed dimension must be a multiple of it
LINEAR_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class ExportError(ValueError):
    """What cannot be written as a GPTQ checkpoint (bits, shapes, zero points, online transforms, target dir)."""


_PACK_COLUMNS = 1024  # columns packed at a time


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [K, N] along dim 0 into int32 [K * bits / 32, N] (K a multiple of 32), on the codes'
    device (a solve's codes are packed on the GPU: bits/8 bytes per weight cross to the host, not 4)."""
    if bits not in EXPORT_BITS:
        raise ExportError(f"export supports bits {EXPORT_BITS}, got {bits}")
    K, N = codes.shape
    if K % PACK:
        raise ExportError(f"cannot pack {K} rows: the packed dimension must be a multiple of {PACK}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ExportError(f"codes must lie in [0, {2**bits - 1}]")
    out = torch.empty(K // PACK * bits, N, dtype=torch.int32, device=codes.device)
    for n1 in range(0, N, _PACK_COLUMNS):  # column chunks bound the int64 temporaries
        n2 = min(n1 + _PACK_COLUMNS, N)
        c = codes[:, n1:n2].to(torch.int64).reshape(K // PACK, PACK, n2 - n1)
        words = torch.zeros(K // PACK, bits, n2 - n1, dtype=torch.int64, device=codes.device)
        for k in range(PACK):
            word, shift = divmod(k * bits, 32)
            words[:, word] |= (c[:, k] << shift) & 0xFFFFFFFF
            if shift + bits > 32:  # the code straddles two words (3 bits only)
                words[:, word + 1] |= c[:, k] >> (32 - shift)
        words = words.reshape(K // PACK * bits, n2 - n1)
        out[:, n1:n2] = torch.where(words >= 2**31, words - 2**32, words)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: int32 [K * bits / 32, N] -> int64 codes [K, N]."""
    rows, N = packed.shape
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows // bits, bits, N)
    codes = torch.zeros(rows // bits, PACK, N, dtype=torch.int64)
    mask = 2**bits - 1
    for k in range(PACK):
        word, shift = divmod(k * bits, 32)
        c = words[:, word] >> shift
        if shift + bits > 32:
            c = c | (words[:, word + 1] << (32 - shift))
        codes[:, k] = c & mask
    return codes.reshape(rows // bits * PACK, N)


def check_exportable(name: str, result: QuantResult, checkpoint_format: str) -> None:
    """Raise an ExportError naming the layer if `result` cannot be written in the requested GPTQ layout."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportError(f"--export_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if result.codes is None or result.bits not in EXPORT_BITS:
        raise ExportError(f"{name}: export needs weights quantized to {EXPORT_BITS} bits, got {result.bits}")
    out, inp = result.codes.shape
    if inp % PACK or out % PACK:
        raise ExportError(f"{name}: export packs {PACK} codes at a time; in_features {inp} and out_features {out} "
                          f"must be multiples of {PACK}")
    if checkpoint_format == "gptq" and bool((result.zeros == 0).any()):
        raise ExportError(f"{name}: a zero point of 0 cannot be stored in the 'gptq' (v1, zero - 1) format; "
                          "use --export_format gptq_v2 or symmetric weights (drop --w_asym)")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def pack_linear(result: QuantResult, bias: torch.Tensor | None, checkpoint_format: str = "gptq",
                name: str = "layer", dtype: str | torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear layer: qweight, qzeros, scales, g_idx (and bias); scales and bias in
    `dtype`."""
    dtype = _torch_dtype(dtype)
    check_exportable(name, result, checkpoint_format)
    zeros = result.zeros.round().to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = zeros - 1
    tensors = {
        "qweight": pack_codes(result.codes.t().contiguous(), result.bits).cpu(),
        "qzeros": pack_codes(zeros.contiguous(), result.bits).cpu().t().contiguous(),
        "scales": result.scales.cpu().t().contiguous().to(dtype),
        "g_idx": result.g_idx.cpu().to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().to(dtype).contiguous()
    return tensors


def grid_tensors(result: QuantResult, name: str = "layer") -> dict[str, torch.Tensor]:
    """What a linear's export needs, independent of format and dtype: its gptq_v2 tensors with float32 scales
    (bits/8 bytes per weight).  A saved fake-quant model keeps them (common.models.llm.GRID_DIR) for a later export."""
    return pack_linear(result, None, GRID_FORMAT, name, torch.float32)


def repack(grid: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq", name: str = "layer",
           dtype: str | torch.dtype = torch.float16, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The GPTQ tensors in `checkpoint_format` and `dtype` of a linear kept as `grid_tensors`."""
    codes = unpack_codes(grid["qweight"], bits).t()
    zeros = unpack_codes(grid["qzeros"].t().contiguous(), bits).float()
    result = QuantResult(weight=None, codes=codes, scales=grid["scales"].float().t(), zeros=zeros,
                         g_idx=grid["g_idx"], perm=None, bits=bits, sym=False, group_size=-1)
    return pack_linear(result, bias, checkpoint_format, name, dtype)

def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each decoder linear of a Llama-style config."""
    from common.models.llm import head_dim

    hd, hidden, inter = head_dim(config), config.hidden_size, config.intermediate_size
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * hd
    q = config.num_attention_heads * hd
    shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
    dense = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    if not moe.is_moe_config(config):
        return {**shapes, **dense}
    if "down_proj (dense layers)" in moe.linear_in_features(config):
        shapes.update(dense)
    return {**shapes, **moe.linear_shapes(config)}


def check_export_config(config) -> None:
    """Raise an ExportError unless every decoder linear of `config` (config.json only) has in and out features that
    are multiples of 32, as GPTQ packing needs."""
    for name, (out, inp) in _linear_shapes(config).items():
        if out % PACK or inp % PACK:
            raise ExportError(f"--export: {name} is [{out} x {inp}] ({config.model_type}, hidden_size "
                              f"{config.hidden_size}, intermediate_size {_inter(config)}); GPTQ packing "
                              f"needs in and out features that are multiples of {PACK}")


def _inter(config) -> str:
    moe_inter = getattr(config, "moe_intermediate_size", None)
    return f"{config.intermediate_size}" + (f", moe_intermediate_size {moe_inter}" if moe_inter else "")


def check_export_target(path: str | os.PathLike, flag: str = "--export") -> None:
    """Raise an ExportError if `path` is a file or a non-empty directory (an export never overwrites anything)."""
    path = Path(os.path.expanduser(path))
    if path.is_file():
        raise ExportError(f"{flag}: {path} is a file; expected a new or empty directory")
    if path.is_dir() and any(path.iterdir()):
        raise ExportError(f"{flag}: {path} exists and is not empty; refusing to overwrite it")


class GPTQCollector:
    """`on_quantized` callback of `common.pipeline.driver.quantize_blocks`: keeps every solved linear's grid
    (`grid_tensors`, bits/8 bytes per weight) and, given a `checkpoint_format`, checks at once that it can be
    written in it (a bad layer stops the run at its first block).

    `grids` maps the full module name (`prefix`.block.name) to its grid tensors; `block(i)` those of block i."""

    def __init__(self, model: nn.Module, blocks: nn.Module, checkpoint_format: str | None = None):
        self.prefix = next(n for n, m in model.named_modules() if m is blocks)
        self.checkpoint_format = checkpoint_format
        self.grids: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, block: int, name: str, result: QuantResult) -> None:
        full = f"{self.prefix}.{block}.{name}"
        if self.checkpoint_format is not None:
            check_exportable(full, result, self.checkpoint_format)
        self.grids[full] = grid_tensors(result, full)

    def block(self, i: int, pop: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """{full name: grid} of block i's linears (pop: and forget them, for layer-by-layer writers)."""
        names = [n for n in self.grids if n.startswith(f"{self.prefix}.{i}.")]
        return {n: (self.grids.pop(n) if pop else self.grids[n]) for n in names}


def _check_plain(model: nn.Module) -> None:
    """Refuse models that need more than their weights: online transforms, activation or KV-cache quantizers."""
    from common.models.kv_quant import kv_quantizers

    for name, m in model.named_modules():
        if isinstance(m, ActQuantLinear) and (m.pre_transform is not None or m.quantizer.bits < 16):
            raise ExportError(f"export: {name} has an online transform or an activation quantizer; a GPTQ checkpoint "
                              "holds weight-only models (no --a_bits, no online R4 Hadamard)")
    if kv_quantizers(model):
        raise ExportError("export: the model has KV-cache quantizers or the online R3 Hadamard; a GPTQ checkpoint "
                          "holds weight-only models")


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with the ActQuantLinear wrappers removed from the names (N.linear.weight -> N.weight)."""
    wrappers = {n for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    state = {}
    for key, value in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod.endswith(".linear") and mod[:-len(".linear")] in wrappers:
            mod = mod[:-len(".linear")]
        state[f"{mod}.{leaf}" if mod else leaf] = value
    return state


def plain_tensor(value: torch.Tensor, dtype: str | torch.dtype) -> torch.Tensor:
    """A non-quantized tensor as the export stores it: floating tensors in the export dtype, on the CPU."""
    value = value.detach().cpu()
    return value.to(_torch_dtype(dtype)) if value.is_floating_point() else value


def quantization_config(cfg: SolverConfig, checkpoint_format: str) -> dict:
    """The `quantization_config` block of config.json (and quantize_config.json) for weights quantized by `cfg`."""
    return {
        "quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
        "desc_act": cfg.act_order and cfg.method != "rtn", "sym": cfg.sym, "static_groups": cfg.static_groups,
        "true_sequential": True, "damp_percent": cfg.percdamp,
        "checkpoint_format": checkpoint_format, "format": checkpoint_format, "pack_dtype": "int32",
        "lm_head": False, "meta": {"quantizer": [f"gptaq:{cfg.label}"]},
    }


def write_export_files(directory: str | os.PathLike, config, qcfg: dict, dtype: str | torch.dtype,
                       tokenizer=None, generation_config=None) -> None:
    """config.json (a plain architecture: no gptaq_rotation; `quantization_config` = qcfg, dtype the export dtype),
    quantize_config.json, the tokenizer and generation config into `directory` (where the weights already are),
    readable as save_pretrained's files are."""
    directory = Path(directory)
    config = config.to_dict()
    config.pop("gptaq_rotation", None)  # rotations are folded into the weights: a plain model
    config["quantization_config"] = qcfg
    config["dtype"] = str(_torch_dtype(dtype)).removeprefix("torch.")
    config["use_cache"] = True
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if generation_config is not None:
        generation_config.save_pretrained(str(directory))
    ordinary_permissions(directory)  # mkdtemp and safetensors make them private


def export_gptq(model: nn.Module, results: Mapping[str, QuantResult | dict[str, torch.Tensor]],
                out_dir: str | os.PathLike, cfg: SolverConfig, *, checkpoint_format: str = "gptq",
                tokenizer=None, dtype: str | torch.dtype = "float16") -> Path:
    """Write `model` with every decoder linear packed as GPTQ tensors: `results` maps each module name (as in
    model.named_modules(), wrappers included) to its QuantResult or to its grid (`grid_tensors`, as `GPTQCollector`
    keeps them); `cfg` is the solver configuration they were quantized with (quantize_config.json records it).

    Everything else of the model (embeddings, norms, lm_head) and the scales are stored in `dtype` (float16 or
    bfloat16).  Writes model.safetensors, config.json with a `quantization_config` block, quantize_config.json and
    the tokenizer files into a temporary sibling folder, renamed to `out_dir` at the end, so a failed export leaves
    nothing half-written.  `out_dir` must not exist or be empty.
    """
    from safetensors.torch import save_file

    bits = cfg.bits
    check_export_target(out_dir, "export")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportError(f"--export_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if str(_torch_dtype(dtype)).removeprefix("torch.") not in EXPORT_DTYPES:
        raise ExportError(f"--export_dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    _check_plain(model)
    modules = dict(model.named_modules())
    missing = [n for n in results if n not in modules]
    if missing:
        raise ExportError(f"export: no module named {missing[0]!r} in the model")
    head = model.get_output_embeddings()
    head_name = next((n for n, m in modules.items() if m is head), None)
    for name, m in modules.items():
        owner = name.removesuffix(".linear") if isinstance(modules.get(name.removesuffix(".linear")),
                                                            ActQuantLinear) else name
        if isinstance(m, nn.Linear) and owner != head_name and owner not in results and not moe.is_router(owner):
            raise ExportError(f"export: linear {owner} was not quantized; every decoder linear must be")
    tensors = {}
    for name, res in results.items():
        if isinstance(res, QuantResult):
            packed = pack_linear(res, None, checkpoint_format, name, dtype)
        else:
            if res["g_idx"].numel() != res["qweight"].shape[0] * 32 // bits:
                raise ExportError(f"export: {name} was packed with other bits than {bits}")
            packed = repack(res, bits, checkpoint_format, name, dtype)
        bias = getattr(modules[name], "bias", None)
        tensors[name] = {k: packed[k] for k in LINEAR_TENSORS}
        if bias is not None:
            tensors[name]["bias"] = plain_tensor(bias, dtype)

    fused = moe.fused_keys(model)  # fused expert tensors: written as their experts' packed linears instead
    for key, names in fused.items():
        if any(n not in tensors for n in names):
            raise ExportError(f"export: the experts of {key} were not all quantized; every expert must be")
    state = {}
    for key, value in _plain_state(model).items():
        if key.rpartition(".")[0] in tensors or key in fused:
            continue
        state[key] = plain_tensor(value, dtype)
    emb = model.get_input_embeddings()
    if head_name is not None and getattr(model.config, "tie_word_embeddings", False) and \
            head.weight.data_ptr() == emb.weight.data_ptr():
        state.pop(f"{head_name}.weight", None)  # tied: loaders rebuild lm_head from the embedding
    for name, linear in tensors.items():
        state.update({f"{name}.{k}": v for k, v in linear.items()})
    state = {k: v.contiguous().clone() for k, v in state.items()}  # no shared storage in safetensors

    out_dir = Path(os.path.expanduser(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        qcfg = quantization_config(cfg, checkpoint_format)
        if fused:  # MoE: which linears of a decoder layer are packed (the routers are not)
            qcfg["modules_in_block_to_quantize"] = [sorted({n.split(".", 3)[3] for n in tensors})]
        write_export_files(tmp, model.config, qcfg, dtype, tokenizer,
                           getattr(model, "generation_config", None))
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
