"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5): the routed experts as solvable
linears, their activation quantizers, their place in QuaRot's rotation and in a GPTQ checkpoint.

transformers 5 keeps a sparse MoE block's E experts fused: gate_up_proj [E, 2I, H] (rows :I gate, I: up) and
down_proj [E, H, I]; the router `gate` (weight [E, H]) picks top-k experts per token, and expert e computes
    y_e(x) = W_down,e (act(W_gate,e x) * W_up,e x),   block output sum_{e in topk(x)} p_e(x) y_e(x)
(Qwen2-MoE adds a dense shared expert scaled by sigmoid(shared_expert_gate x)).  `RoutedExperts` replaces the
fused module with the same two parameters (same state-dict names, so save_pretrained / from_pretrained are
unchanged) and the same eager forward, plus: per-token activation quantizers on the expert inputs and on the
down_proj inputs, an optional online Hadamard (QuaRot's R4) before down_proj, one `ExpertSlice` child per expert
linear (`mlp.experts.<e>.gate_proj` ...: a view of its rows of the fused parameter, what the driver solves), and a
`recorder` hook through which `common.pipeline.routed` collects each expert's routed inputs.  Routers
(`mlp.gate`, Qwen2-MoE's `mlp.shared_expert_gate`) are never quantized: weights and inputs stay 16-bit.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from common.quant.act_quant import ActQuantizer, ActQuantLinear, ActQuantSettings

__all__ = ["MOE_MODEL_TYPES", "MOE_ARCHITECTURES", "EXPERT_LINEARS", "DEFAULT_MIN_TOKENS", "is_moe_config",
           "is_moe_block", "ExpertSlice", "RoutedExperts", "convert_experts", "set_min_tokens", "is_router",
           "mlp_groups", "prepare_experts", "mlp_readers", "mlp_writers", "mlp_down_weights",
           "install_down_transform", "linear_in_features", "linear_shapes", "fused_keys",
           "expert_summary"]

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
# Default of --moe_min_tokens: an expert routed fewer calibration tokens than this is rounded to nearest (RTN).
DEFAULT_MIN_TOKENS = 16
ROUTER_SUFFIXES = ("mlp.gate", "mlp.shared_expert_gate")


def is_moe_config(config) -> bool:
    return getattr(config, "model_type", None) in MOE_MODEL_TYPES


def _is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.Tensor) and p.dim() == 3 and getattr(module, "down_proj", None) is not None


def is_moe_block(mlp: nn.Module) -> bool:
    """A sparse MoE block: a router `gate` and fused `experts` (a dense MLP of an MoE model is not one)."""
    return hasattr(mlp, "gate") and _is_fused_experts(getattr(mlp, "experts", None))


class ExpertSlice(nn.Module):
    """One expert linear as a view of its rows of a fused parameter: `weight` is [out, in] and writes go into the
    fused tensor.  It owns no tensor (the state dict is the fused module's) and is never called."""

    def __init__(self, owner: "RoutedExperts", param: str, expert: int, rows: slice):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a child: no module cycle; deepcopy maps it to the copy
        self.param, self.expert, self.rows = param, expert, rows

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._owner, self.param).data[self.expert, self.rows]

    @property
    def bias(self) -> None:
        return None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"{self.param}[{self.expert}, {self.rows.start}:{self.rows.stop}]"


class _ExpertLinears(nn.Module):
    """`experts.<e>`: gate_proj, up_proj and down_proj of expert e as ExpertSlices."""

    def __init__(self, owner: "RoutedExperts", e: int):
        super().__init__()
        inter = owner.intermediate_dim
        self.gate_proj = ExpertSlice(owner, "gate_up_proj", e, slice(0, inter))
        self.up_proj = ExpertSlice(owner, "gate_up_proj", e, slice(inter, 2 * inter))
        self.down_proj = ExpertSlice(owner, "down_proj", e, slice(None))


class RoutedExperts(nn.Module):
    """The fused experts of one MoE block with activation quantizers: expert e on its routed tokens x computes
    W_down,e q_d(T(act(W_gate,e q(x)) * W_up,e q(x))), q / q_d per-token quantizers, T the optional online
    Hadamard (R4).  Same parameters and forward as transformers' eager experts otherwise.

    recorder: None, or an object whose `record(experts, x, top_k_index)` is called with the quantized expert input
    x [tokens, H] and the routing [tokens, k] before the experts run (common.pipeline.routed); it may raise to stop
    the forward.  min_tokens: experts routed fewer calibration tokens are rounded to nearest (`routed`).
    """

    def __init__(self, experts: nn.Module, min_tokens: int = DEFAULT_MIN_TOKENS):
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.hidden_dim = experts.gate_up_proj.shape[2]
        self.intermediate_dim = experts.down_proj.shape[2]
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn
        self.input_quantizer = ActQuantizer()
        self.down_quantizer = ActQuantizer()
        self.down_transform: nn.Module | None = None
        self.recorder = None
        self.min_tokens = min_tokens
        for e in range(self.num_experts):
            self.add_module(str(e), _ExpertLinears(self, e))

    def down_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """What expert e's down_proj weight sees for quantized expert inputs x [n, H]."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        a = self.act_fn(gate) * up
        if self.down_transform is not None:
            a = self.down_transform(a)
        return self.down_quantizer(a)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        x = self.input_quantizer(hidden_states)
        if self.recorder is not None:
            self.recorder.record(self, x, top_k_index)
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token, pos = torch.where(top_k_index == e)
            y = F.linear(self.down_input(e, x[token]), self.down_proj[e]) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def convert_experts(model_or_layer: nn.Module, min_tokens: int = DEFAULT_MIN_TOKENS) -> int:
    """Replace every fused experts module of the MoE blocks below `model_or_layer` by a RoutedExperts holding the
    same parameters (idempotent); returns how many blocks were converted."""
    n = 0
    for mlp in [m for m in model_or_layer.modules() if is_moe_block(m)]:
        if not isinstance(mlp.experts, RoutedExperts):
            mlp.experts = RoutedExperts(mlp.experts, min_tokens)
            n += 1
    return n


def set_min_tokens(model: nn.Module, min_tokens: int) -> None:
    """Set the RTN-fallback threshold (routed calibration tokens) of every RoutedExperts below `model`."""
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            m.min_tokens = min_tokens


def is_router(name: str) -> bool:
    """Router linears (name relative to a decoder layer or the model): kept 16-bit, inputs unquantized."""
    return name.endswith(ROUTER_SUFFIXES)


def _experts(layer: nn.Module) -> RoutedExperts:
    experts = layer.mlp.experts
    if not isinstance(experts, RoutedExperts):
        raise TypeError("MoE layer not converted: call common.models.moe.convert_experts first")
    return experts


def mlp_groups(layer: nn.Module) -> list[list[str]]:
    """The MLP part of a decoder layer's solve order for an MoE block: [shared up, gate] -> [every expert's up,
    gate] -> [shared down] -> [every expert's down] (names relative to the layer; no shared group without one)."""
    experts = _experts(layer)
    shared = getattr(layer.mlp, "shared_expert", None)
    ids = range(experts.num_experts)
    groups = [["mlp.shared_expert.up_proj", "mlp.shared_expert.gate_proj"]] if shared is not None else []
    groups.append([f"mlp.experts.{e}.{n}" for e in ids for n in ("up_proj", "gate_proj")])
    if shared is not None:
        groups.append(["mlp.shared_expert.down_proj"])
    groups.append([f"mlp.experts.{e}.down_proj" for e in ids])
    return groups


def prepare_experts(layer: nn.Module, settings: ActQuantSettings) -> None:
    """Fresh activation quantizers on an MoE layer's expert inputs and down_proj inputs (down_proj_bits there)."""
    experts = _experts(layer)
    make = lambda bits: ActQuantizer(bits=bits, sym=settings.sym, clip_ratio=settings.clip_ratio,  # noqa: E731
                                     groupsize=settings.groupsize)
    experts.input_quantizer = make(settings.bits)
    experts.down_quantizer = make(settings.down_proj_bits if settings.down_proj_bits is not None else settings.bits)


def _w(module: nn.Module) -> torch.Tensor:
    return (module.linear if isinstance(module, ActQuantLinear) else module).weight.data


def mlp_readers(mlp: nn.Module) -> list[torch.Tensor]:
    """Every weight of an MoE block that reads the (normed) residual stream, input features last: the fused
    gate_up_proj [E, 2I, H], the router [E, H], the shared expert's gate/up and its gate [1, H]."""
    out = [mlp.experts.gate_up_proj.data, mlp.gate.weight.data]
    if getattr(mlp, "shared_expert", None) is not None:
        out += [_w(mlp.shared_expert.gate_proj), _w(mlp.shared_expert.up_proj), _w(mlp.shared_expert_gate)]
    return out


def mlp_writers(mlp: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight [H, in], bias) of every linear writing an MoE block's output: each expert's down_proj, the shared
    expert's down_proj."""
    out = [(mlp.experts.down_proj.data[e], None) for e in range(mlp.experts.down_proj.shape[0])]
    if getattr(mlp, "shared_expert", None) is not None:
        lin = mlp.shared_expert.down_proj
        lin = lin.linear if isinstance(lin, ActQuantLinear) else lin
        out.append((lin.weight.data, None if lin.bias is None else lin.bias.data))
    return out


def mlp_down_weights(mlp: nn.Module) -> list[torch.Tensor]:
    """The down_proj weights [H, I] whose inputs QuaRot's R4 rotates (each expert's, the shared expert's)."""
    return [w for w, _ in mlp_writers(mlp)]


def install_down_transform(layer: nn.Module, make: Callable[[int], nn.Module]) -> None:
    """Put `make(in_features)` (the online R4 Hadamard) in front of every down_proj of an MoE layer."""
    experts = _experts(layer)
    experts.down_transform = make(experts.intermediate_dim)
    shared = getattr(layer.mlp, "shared_expert", None)
    if shared is not None:
        down = shared.down_proj
        if isinstance(down, ActQuantLinear):
            down.pre_transform = make(down.in_features)
        else:
            shared.down_proj = ActQuantLinear(down, pre_transform=make(down.in_features))


# ------------------------------------------------------------------------------------- config-level facts

def _expert_inter(config) -> int:
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def linear_in_features(config) -> dict[str, int]:
    """Input features of the MoE linears (what a weight / activation group size must divide)."""
    widths = {"experts' down_proj": _expert_inter(config)}
    if getattr(config, "shared_expert_intermediate_size", 0):
        widths["shared_expert.down_proj"] = config.shared_expert_intermediate_size
    if config.model_type != "mixtral" and (getattr(config, "mlp_only_layers", None)
                                           or getattr(config, "decoder_sparse_step", 1) > 1):
        widths["down_proj (dense layers)"] = config.intermediate_size
    return widths


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every MoE linear an export packs."""
    hidden, inter = config.hidden_size, _expert_inter(config)
    shapes = {"experts' gate_proj": (inter, hidden), "experts' up_proj": (inter, hidden),
              "experts' down_proj": (hidden, inter)}
    shared = getattr(config, "shared_expert_intermediate_size", 0)
    if shared:
        shapes.update({"shared_expert.gate_proj": (shared, hidden), "shared_expert.up_proj": (shared, hidden),
                       "shared_expert.down_proj": (hidden, shared)})
    return shapes


def fused_keys(model: nn.Module) -> dict[str, list[str]]:
    """{state-dict key of a fused expert parameter: the module names of the expert linears it holds}."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            ids = range(m.num_experts)
            out[f"{name}.gate_up_proj"] = [f"{name}.{e}.{n}" for e in ids for n in ("gate_proj", "up_proj")]
            out[f"{name}.down_proj"] = [f"{name}.{e}.down_proj" for e in ids]
    return out


def expert_summary(records: list[dict]) -> dict[str, dict[str, dict]]:
    """Per layer and expert, from the driver's records: routed tokens, the sum of its linears' proxy losses
    (loss, asym_loss) and the fallback, if any: {"<layer>": {"<expert>": {...}}}."""
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        parts = r["name"].split(".")
        if len(parts) != 4 or parts[:2] != ["mlp", "experts"]:
            continue
        entry = out.setdefault(str(r["block"]), {}).setdefault(parts[2], {"tokens": r.get("tokens", 0)})
        for key in ("loss", "asym_loss"):
            if key in r:
                entry[key] = entry.get(key, 0.0) + r[key]
        if r.get("fallback"):
            entry["fallback"] = r["fallback"]
    return out
