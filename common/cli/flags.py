"""Flag groups shared by the three front ends: weights and solver, activations, KV cache.

fake_quant, spinquant and vit_quant add the same groups with the same names, defaults (read from the config
objects, never written here) and checks, and turn them into the same configuration objects:
`solver_config` -> common.solver.SolverConfig, `act_settings` -> common.quant.act_quant.ActQuantSettings,
`kv_config` -> common.models.kv_quant.KVQuantConfig.
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings

from common.cli import types
from common.models.kv_quant import KVQuantConfig
from common.quant.act_quant import ActQuantSettings
from common.solver.config import BACKENDS, GROUP_FITS, QUANT_ORDERS, ConfigError, GPTAQConfig, SolverConfig
from common.solver.config import SYM_GRIDS

__all__ = ["add_weight_flags", "add_act_flags", "add_kv_flags", "check_weight_flags", "check_act_flags",
           "check_kv_flags", "warn_idle", "solver_config", "act_settings", "kv_config", "quant_flag_names"]

_S, _G, _A, _KV = SolverConfig(), GPTAQConfig(), ActQuantSettings(), KVQuantConfig()
# SolverConfig / GPTAQConfig field -> the flag that sets it (error messages name the flag)
_SOLVER_FLAGS = {"bits": "w_bits", "group_size": "w_groupsize", "sym": "w_asym", "mse": "w_clip",
                 "percdamp": "percdamp", "act_order": "act_order", "static_groups": "static_groups", "order": "order",
                 "quant_order": "quant_order", "group_fit": "group_fit", "backend": "solver", "alpha": "alpha",
                 "method": "gptaq", "variant": "gptaq_exact", "sym_grid": "w_sym_grid"}


def _dests(group: argparse._ArgumentGroup) -> list[str]:
    return [a.dest for a in group._group_actions]


def add_weight_flags(p: argparse.ArgumentParser) -> list[str]:
    """The weight grid and solver flags (QuaRot / GPTQv2 names); returns their dest names."""
    g = p.add_argument_group("weights and solver")
    g.add_argument("--w_bits", type=types.bits, default=_S.bits, help="weight bits (2..8, 16 = not quantized)")
    g.add_argument("--w_groupsize", type=types.groupsize, default=_S.group_size,
                   help="weight group size (-1: per output channel; one that does not divide a layer's input "
                        "features leaves a narrower last group)")
    g.add_argument("--w_asym", action="store_true", help="asymmetric weight grid (default symmetric)")
    g.add_argument("--w_sym_grid", choices=SYM_GRIDS, default=_S.sym_grid,
                   help="symmetric weight grid: quarot (QuaRot / paper code: scale = amax / (2^(b-1) - 1)) or gptq "
                        "(IST-DASLab GPTQ / GPTQModel: scale = 2 amax / (2^b - 1)); zero point 2^(b-1) in both")
    g.add_argument("--w_clip", action="store_true", help="MSE search of the weight clipping range")
    g.add_argument("--w_rtn", action="store_true", help="round-to-nearest instead of GPTQ")
    g.add_argument("--percdamp", type=types.nonneg_float, default=_S.percdamp,
                   help=f"GPTQ dampening, fraction of mean diag(H) (default {_S.percdamp}; paper ViT: 0.1)")
    g.add_argument("--act_order", action="store_true", help="GPTQ: process columns by descending diag(H)")
    g.add_argument("--static_groups", action="store_true",
                   help="GPTQ: all group grids from the unquantized weights (needs --w_groupsize)")
    g.add_argument("--group_fit", choices=GROUP_FITS, default=_S.group_fit,
                   help="when a group's grid is fitted: block_start (published: on the weights as they stand when "
                        "the group's lazy block starts) or updated (ours: including the block's earlier columns' "
                        "updates)")
    g.add_argument("--gptaq", "--use_v2", dest="gptaq", action="store_true",
                   help="GPTAQ (GPTQv2): fit Q X~ to the full-precision output W X")
    g.add_argument("--alpha", type=types.nonneg_float, default=_G.alpha,
                   help=f"GPTAQ: weight of the asymmetric term (default {_G.alpha})")
    g.add_argument("--gptaq_exact", action="store_true",
                   help="GPTAQ: exact greedy on the least-squares target instead of the published P form")
    g.add_argument("--gptaq_p_only", action="store_true",
                   help="GPTAQ ablation (paper Table 5): only the asymmetric P term, no GPTQ error feedback")
    g.add_argument("--order", choices=["forward", "reverse"], default=_S.order,
                   help="column processing order (reverse = Babai's nearest plane)")
    g.add_argument("--quant_order", choices=QUANT_ORDERS, default=_S.quant_order,
                   help="activation quantizers off (w_first, W->A) or on (a_first, A->W) during calibration; "
                        "auto: GPTQ w_first, GPTAQ a_first (paper Table 6)")
    g.add_argument("--solver", choices=BACKENDS, default=_S.backend,
                   help="layer solver: reference (the published loops, common/solver/reference.py: edit it for "
                        "ablations), torch (blocked PyTorch), triton (fused column walk, CUDA), auto (triton on CUDA "
                        "when available, else torch)")
    return _dests(g)


def add_act_flags(p: argparse.ArgumentParser, int8_down_proj: bool = False) -> list[str]:
    """Per-token input activation quantizers of every block linear; returns their dest names."""
    g = p.add_argument_group("activations")
    g.add_argument("--a_bits", type=types.bits, default=_A.bits, help="input activation bits of every block linear")
    g.add_argument("--a_groupsize", type=types.groupsize, default=_A.groupsize,
                   help="activation group size (-1: per token)")
    g.add_argument("--a_asym", action="store_true", help="asymmetric activation grid (default symmetric)")
    g.add_argument("--a_clip_ratio", type=types.ratio, default=_A.clip_ratio,
                   help="activation clip ratio in (0, 1] (QuaRot uses 0.9)")
    if int8_down_proj:
        g.add_argument("--int8_down_proj", action="store_true", help="down_proj inputs at 8 bits")
    return _dests(g)


def add_kv_flags(p: argparse.ArgumentParser) -> list[str]:
    """K/V-cache quantizers of decoder LLMs; returns their dest names."""
    g = p.add_argument_group("KV cache")
    for kv, name in (("k", "key"), ("v", "value")):
        g.add_argument(f"--{kv}_bits", type=types.bits, default=getattr(_KV, f"{kv}_bits"), help=f"{name} cache bits")
        g.add_argument(f"--{kv}_groupsize", type=types.groupsize, default=getattr(_KV, f"{kv}_groupsize"),
                       help=f"{name} group size (-1: one group per head; must divide head_dim)")
        g.add_argument(f"--{kv}_asym", action="store_true", help=f"asymmetric {name} grid")
        g.add_argument(f"--{kv}_clip_ratio", type=types.ratio, default=getattr(_KV, f"{kv}_clip_ratio"),
                       help=f"{name} clip ratio")
    g.add_argument("--k_pre_rope", action="store_true", help="quantize keys before RoPE (R3 is then not applied)")
    return _dests(g)


def quant_flag_names(p: argparse.ArgumentParser) -> list[str]:
    """Dest names of every flag in the shared groups a parser has (what a saved model records of its run)."""
    titles = {"weights and solver", "activations", "KV cache"}
    return [a.dest for g in p._action_groups if g.title in titles for a in g._group_actions]


def warn_idle(p: argparse.ArgumentParser, a: argparse.Namespace, names: list[str], why: str) -> None:
    """One warning naming the flags among `names` that are set (differ from their defaults) although `why`
    says they do nothing."""
    idle = [f"--{n}" for n in names if hasattr(a, n) and getattr(a, n) != p.get_default(n)]
    if idle:
        warnings.warn(f"{' '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect {why}", stacklevel=3)


_SOLVE_ONLY = ["percdamp", "act_order", "static_groups", "group_fit", "order", "quant_order", "solver"]
_GPTAQ_ONLY = ["alpha", "gptaq_exact", "gptaq_p_only"]


def check_weight_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> SolverConfig:
    """The combination rules of the weight flags, warnings for flags that do nothing, then the SolverConfig (its
    own range checks, reported by flag)."""
    if a.gptaq and a.w_rtn:
        p.error("--gptaq and --w_rtn are exclusive (GPTAQ is a GPTQ-style solver; RTN uses no calibration)")
    if a.gptaq_exact and not a.gptaq:
        p.error("--gptaq_exact needs --gptaq")
    if a.gptaq_p_only and (not a.gptaq or a.gptaq_exact):
        p.error("--gptaq_p_only needs --gptaq and does not combine with --gptaq_exact")
    if a.static_groups and a.w_groupsize == -1:
        p.error("--static_groups needs --w_groupsize > 0")
    if a.w_asym and a.w_sym_grid != _S.sym_grid:
        p.error(f"--w_sym_grid {a.w_sym_grid} sets the symmetric grid; it does not combine with --w_asym")
    if a.w_bits == 16:
        warn_idle(p, a, ["w_groupsize", "w_asym", "w_clip", "w_rtn", "gptaq", *_GPTAQ_ONLY, *_SOLVE_ONLY],
                  "with --w_bits 16 (weights are not quantized)")
    elif a.w_rtn:
        warn_idle(p, a, _SOLVE_ONLY, "with --w_rtn (round to nearest: no calibration, no solver)")
    elif not a.gptaq:
        warn_idle(p, a, ["alpha"], "without --gptaq")
    try:
        return solver_config(a)
    except ConfigError as e:
        p.error(f"--{_SOLVER_FLAGS.get(e.field, e.field)}: {e.reason}")


def check_act_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Warn for activation flags that do nothing at --a_bits 16."""
    if a.a_bits == 16:
        warn_idle(p, a, ["a_groupsize", "a_asym", "a_clip_ratio"], "with --a_bits 16 (activations are not quantized)")


def check_kv_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Warn for key / value flags that do nothing while that cache is not quantized."""
    for kv, name in (("k", "keys"), ("v", "values")):
        if getattr(a, f"{kv}_bits") == 16:
            names = [f"{kv}_groupsize", f"{kv}_asym", f"{kv}_clip_ratio"] + (["k_pre_rope"] if kv == "k" else [])
            warn_idle(p, a, names, f"with --{kv}_bits 16 ({name} are not quantized)")


def solver_config(a: argparse.Namespace, **changes) -> SolverConfig:
    """The SolverConfig of the weight flags (`changes`: fields the front end sets itself, e.g. scale_dtype)."""
    method = "none" if a.w_bits == 16 else "rtn" if a.w_rtn else "gptaq" if a.gptaq else "gptq"
    variant = "exact" if a.gptaq_exact else "p_term_only" if a.gptaq_p_only else _G.variant
    cfg = SolverConfig(method=method, bits=a.w_bits, sym=not a.w_asym, mse=a.w_clip, group_size=a.w_groupsize,
                       act_order=a.act_order, static_groups=a.static_groups, percdamp=a.percdamp, order=a.order,
                       quant_order=a.quant_order, group_fit=a.group_fit, backend=a.solver,
                       gptaq=GPTAQConfig(alpha=a.alpha, variant=variant), sym_grid=a.w_sym_grid)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def act_settings(a: argparse.Namespace) -> ActQuantSettings:
    return ActQuantSettings(bits=a.a_bits, groupsize=a.a_groupsize, sym=not a.a_asym, clip_ratio=a.a_clip_ratio,
                            down_proj_bits=8 if getattr(a, "int8_down_proj", False) else None)


def kv_config(a: argparse.Namespace, rotate_qk: bool = False, fp32_had: bool = False) -> KVQuantConfig:
    return KVQuantConfig(k_bits=a.k_bits, k_groupsize=a.k_groupsize, k_sym=not a.k_asym, k_clip_ratio=a.k_clip_ratio,
                         k_pre_rope=a.k_pre_rope, v_bits=a.v_bits, v_groupsize=a.v_groupsize, v_sym=not a.v_asym,
                         v_clip_ratio=a.v_clip_ratio, rotate_qk=rotate_qk, fp32_had=fp32_had)
