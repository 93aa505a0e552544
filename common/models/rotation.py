"""QuaRot / SpinQuant rotations folded into a decoder LLM (Llama, Qwen2, Qwen3, Mistral; Mixtral, Qwen2-MoE, Qwen3-MoE
in transformers 5).

Norm fusion: RMSNorm(x) W^T = (x / rms(x)) (W diag(g))^T, so g moves into every linear reading the norm.  Then with
the residual stream x -> x R1 (rms is rotation invariant) and values per head v -> v R2: embedding E R1, input-side
weights (q, k, v, gate, up, lm_head) W R1, output-side weights (o, down) R1^T W and biases R1^T b, v_proj rows per
head R2^T W_v (bias R2^T b_v), o_proj columns per head W_o R2.  R4: down_proj gets W H^T and an online x -> x H^T.
MoE blocks (`common.models.moe`): every weight reading the normed stream (each expert's fused gate/up rows, the
router, the shared expert and its gate) is input-side, every expert's and the shared expert's down_proj output-side
and under R4; the router logits x R1 (W R1)^T = x W^T are unchanged, so is the routing.
The network function is unchanged in exact arithmetic; outliers are spread before quantization.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from common.quant.act_quant import ActQuantLinear
from common.models import moe
from common.models.hadamard import OnlineHadamard, hadamard_transform, random_hadamard_matrix, random_orthogonal_matrix
from common.models.llm import head_dim, install_online_hadamard

__all__ = ["SUPPORTED_ARCHITECTURES", "ROTATION_MODES", "check_supported", "untie_word_embeddings", "fuse_norms",
           "fuse_layer_norms", "fuse_final_norm", "rotate_model", "check_rotations", "rotate_embeddings",
           "rotate_layer", "install_online_hadamards", "quarot_matrices", "quarot_rotate", "Rotation",
           "rotation_record"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                           *moe.MOE_ARCHITECTURES)
ROTATION_MODES = ("hadamard", "random")
CONFIG_KEY = "gptaq_rotation"
ORTHO_TOL = 1e-3  # max |R R^T - I| entry accepted for R1 / R2
_CHUNK = 4096  # rows per float64 chunk, bounds the temporary memory for big embeddings / lm_heads


def check_supported(model: nn.Module) -> None:
    """Raise ValueError unless `model` is one of SUPPORTED_ARCHITECTURES."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"rotation: unsupported model class {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _linear(module: nn.Module) -> nn.Linear:
    return module.linear if isinstance(module, ActQuantLinear) else module


def _layers(model: nn.Module):
    return model.model.layers


def _text_configs(model: nn.Module) -> list:
    cfgs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfgs if text is model.config else cfgs + [text]


@torch.no_grad()
def _transform_rows(W: torch.Tensor, fn) -> None:
    """W[rows] <- fn(W[rows] in float64), in place, chunk by chunk (W may be a transposed view)."""
    for s in range(0, W.shape[0], _CHUNK):
        W[s:s + _CHUNK] = fn(W[s:s + _CHUNK].to(torch.float64)).to(W.dtype)


def _right(W: torch.Tensor, R: torch.Tensor) -> None:
    """W <- W R (input side: rows of W are indexed by outputs, columns by the rotated input)."""
    R = R.to(device=W.device, dtype=torch.float64)
    _transform_rows(W, lambda w: w @ R)


def _left_t(W: torch.Tensor, R: torch.Tensor) -> None:
    """W <- R^T W (output side), computed as (W^T R)^T on column chunks."""
    _right(W.T, R)


def untie_word_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding if they share storage; returns whether it did.  The config is
    updated (tie_word_embeddings=False) so save_pretrained / from_pretrained keep them apart."""
    emb, head = model.get_input_embeddings(), _linear(model.get_output_embeddings())
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in _text_configs(model):
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


@torch.no_grad()
def _fuse(norm: nn.Module, readers: list[nn.Module | torch.Tensor]) -> None:
    """W <- W diag(g) for every reader (a linear, or a weight tensor with input features last, e.g. fused experts
    [E, out, in]), then g <- 1."""
    g = norm.weight.detach().to(torch.float64)
    for r in readers:
        W = r if isinstance(r, torch.Tensor) else _linear(r).weight.data
        W.copy_((W.to(torch.float64) * g.to(W.device)).to(W.dtype))
    norm.weight.data.fill_(1.0)


def _mlp_readers(mlp: nn.Module) -> list[nn.Module | torch.Tensor]:
    """The linears / weights [..., hidden] that read post_attention_layernorm's output."""
    return moe.mlp_readers(mlp) if moe.is_moe_block(mlp) else [mlp.gate_proj, mlp.up_proj]


def _mlp_writers(mlp: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight [hidden, in], bias) of the linears writing the MLP's output (the down_projs, R4 on their inputs)."""
    if moe.is_moe_block(mlp):
        return moe.mlp_writers(mlp)
    lin = _linear(mlp.down_proj)
    return [(lin.weight.data, None if lin.bias is None else lin.bias.data)]


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module) -> None:
    """One decoder layer's part of fuse_norms: input_layernorm -> q, k, v; post_attention_layernorm -> gate, up."""
    attn, mlp = layer.self_attn, layer.mlp
    _fuse(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
    _fuse(layer.post_attention_layernorm, _mlp_readers(mlp))


@torch.no_grad()
def fuse_final_norm(model: nn.Module) -> None:
    """The part of fuse_norms outside the decoder layers: untie the embeddings, final norm -> lm_head."""
    untie_word_embeddings(model)
    _fuse(model.model.norm, [model.get_output_embeddings()])


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Fold every RMSNorm scale into the linears reading it (input_layernorm -> q, k, v; post_attention_layernorm ->
    gate, up; final norm -> lm_head) and set the scales to 1.  Unties tied embeddings first.  Idempotent."""
    check_supported(model)
    fuse_final_norm(model)
    for layer in _layers(model):
        fuse_layer_norms(layer)


def _check_rotation(R: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not isinstance(R, torch.Tensor) or R.shape != (n, n):
        shape = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"rotate_model: {what} must be a [{n}, {n}] tensor, got {shape}")
    R = R.detach().to(device="cpu", dtype=torch.float64)
    err = (R @ R.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if err > ORTHO_TOL:
        raise ValueError(f"rotate_model: {what} is not orthogonal (max |R R^T - I| = {err:.2e} > {ORTHO_TOL})")
    return R


def _head_dim(model: nn.Module) -> int:
    return _layers(model)[0].self_attn.head_dim


@torch.no_grad()
@torch.no_grad()
def install_online_hadamards(model: nn.Module, fp32_had: bool = False) -> None:
    """install_online_hadamard on every decoder layer.

    Touches no weight: use it to rebuild a model whose saved down_proj weights already hold the folded H^T.
    """
    check_supported(model)
    for layer in _layers(model):
        install_online_hadamard(layer, fp32_had=fp32_had)


def check_rotations(model: nn.Module, R1: torch.Tensor, R2: torch.Tensor | list[torch.Tensor] | None
                    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Validate R1 [hidden, hidden] and R2 (one [head_dim, head_dim] for all layers, one per layer, or None) for
    `model` (its weights may still be on the meta device); returns float64 CPU copies, R2 as one entry per layer.
    Raises ValueError for an unsupported or already rotated model, a wrong shape or a non-orthogonal matrix."""
    check_supported(model)
    if getattr(model.config, CONFIG_KEY, None):
        raise ValueError(f"rotate_model: the model is already rotated ({getattr(model.config, CONFIG_KEY)})")
    layers = _layers(model)
    R1 = _check_rotation(R1, model.config.hidden_size, "R1")
    if R2 is None or isinstance(R2, torch.Tensor):
        R2s = [R2] * len(layers)
    else:
        R2s = list(R2)
        if len(R2s) != len(layers):
            raise ValueError(f"rotate_model: R2 list has {len(R2s)} matrices for {len(layers)} layers")
    head_dim = _head_dim(model)
    return R1, [None if r is None else _check_rotation(r, head_dim, f"R2[{i}]") for i, r in enumerate(R2s)]


@torch.no_grad()
def rotate_embeddings(model: nn.Module, R1: torch.Tensor) -> None:
    """The part of the rotation outside the decoder layers: fuse the final norm into lm_head (untying it from the
    embedding), then E <- E R1 and lm_head <- lm_head R1."""
    fuse_final_norm(model)
    _right(model.get_input_embeddings().weight.data, R1)
    _right(_linear(model.get_output_embeddings()).weight.data, R1)


@torch.no_grad()
def rotate_layer(layer: nn.Module, R1: torch.Tensor, R2: torch.Tensor | None, *, online_r4: bool = True,
                 fp32_had: bool = False) -> None:
    """One decoder layer's part of rotate_model: fuse its norms, fold R1 (q, k, v, gate, up: W R1; o, down: R1^T W
    and R1^T b), R2 per value head (R2^T W_v, W_o R2) and, with online_r4, W_down H^T plus the online Hadamard."""
    fuse_layer_norms(layer)
    attn, mlp = layer.self_attn, layer.mlp
    readers = [_linear(m).weight.data for m in (attn.q_proj, attn.k_proj, attn.v_proj)] + [
        r if isinstance(r, torch.Tensor) else _linear(r).weight.data for r in _mlp_readers(mlp)]
    for W in readers:
        _right(W.view(-1, W.shape[-1]), R1)  # fused experts [E, out, in]: all rows at once
    o = _linear(attn.o_proj)
    for W, b in [(o.weight.data, None if o.bias is None else o.bias.data)] + _mlp_writers(mlp):
        _left_t(W, R1)
        if b is not None:
            _left_t(b[:, None], R1)
    if R2 is not None:
        head_dim = attn.head_dim
        v, o = _linear(attn.v_proj), _linear(attn.o_proj)
        _right(v.weight.data.view(-1, head_dim, v.in_features).transpose(1, 2), R2)  # per head R2^T W_i
        if v.bias is not None:
            _right(v.bias.data.view(-1, head_dim), R2)
        _right(o.weight.data.view(-1, head_dim), R2)  # o columns per head: W_o,i R2
    if online_r4:
        for W, _ in _mlp_writers(mlp):
            _transform_rows(W, hadamard_transform)  # W H^T
        install_online_hadamard(layer, fp32_had=fp32_had)


def rotation_record(mode: str, seed: int | None, online_r4: bool, fp32_had: bool) -> dict:
    """What model.config.gptaq_rotation holds after a rotation (saved with the model, read back to rebuild it)."""
    return {"mode": mode, "seed": seed, "online_r4": online_r4, "fp32_had": fp32_had}


@torch.no_grad()
def rotate_model(model: nn.Module, R1: torch.Tensor, R2: torch.Tensor | list[torch.Tensor] | None, *,
                 online_r4: bool = True, fp32_had: bool = False, mode: str = "custom", seed: int | None = None,
                 progress: bool = False, device: torch.device | str | None = None) -> None:
    """Fuse norms, then fold R1 (residual stream), R2 (value heads; one for all layers, one per layer, or None)
    and, with online_r4, the down_proj Hadamard into `model` in place (float64 math, cast back).

    device (a CUDA device): each decoder layer of a model held elsewhere (host memory) is rotated there and moved
    back, as the streamed pipeline rotates (float64 GEMMs on the GPU instead of the CPU).
    mode / seed only go into model.config.gptaq_rotation = {mode, seed, online_r4, fp32_had}.
    """
    R1, R2s = check_rotations(model, R1, R2)
    rotate_embeddings(model, R1)
    gpu = device is not None and torch.device(device).type == "cuda"
    if gpu:
        R1, R2s = R1.to(device), [None if r is None else r.to(device) for r in R2s]
    for i, layer in enumerate(tqdm(_layers(model), desc="rotate", disable=not progress)):
        home = next(layer.parameters()).device
        moved = gpu and home != torch.device(device)
        if moved:
            layer.to(device)
        rotate_layer(layer, R1, R2s[i], online_r4=online_r4, fp32_had=fp32_had)
        if moved:
            layer.to(home)
    setattr(model.config, CONFIG_KEY, rotation_record(mode, seed, online_r4, fp32_had))


def quarot_matrices(config, mode: str = "hadamard", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """QuaRot's R1 [hidden, hidden] and shared R2 [head_dim, head_dim] drawn from `seed` (R2 from seed + 1):
    random Hadamard, or random orthogonal with mode "random".  Needs only the model's config."""
    if mode not in ROTATION_MODES:
        raise ValueError(f"rotation mode must be one of {ROTATION_MODES}, got {mode!r}")
    make = random_hadamard_matrix if mode == "hadamard" else random_orthogonal_matrix
    return make(config.hidden_size, seed), make(head_dim(config), seed + 1)


@dataclass(frozen=True)
class Rotation:
    """The rotation a pipeline folds into the model: R1 [hidden, hidden] and R2 [head_dim, head_dim] (one for all
    layers, one per layer, or None), with the online R3/R4 Hadamards.  mode / seed are what the model records
    (QuaRot: "hadamard" or "random" and the seed R1/R2 were drawn from; SpinQuant: "spinquant", learned)."""

    R1: torch.Tensor
    R2: torch.Tensor | list[torch.Tensor] | None
    mode: str = "custom"
    seed: int | None = None
    fp32_had: bool = False

    @classmethod
    def quarot(cls, config, mode: str = "hadamard", seed: int = 0, fp32_had: bool = False) -> "Rotation":
        """QuaRot's random Hadamard (or random orthogonal) R1 and shared R2 drawn from `seed`."""
        return cls(*quarot_matrices(config, mode, seed), mode=mode, seed=seed, fp32_had=fp32_had)

    def apply(self, model: nn.Module, online_r4: bool = True, progress: bool = False,
              device: torch.device | str | None = None) -> None:
        """Fold into `model` in place (`rotate_model`; online_r4=False: R1/R2 only, a plain architecture, e.g. for
        a weight-only export; device: where the layers are rotated)."""
        check_supported(model)
        rotate_model(model, self.R1, self.R2, online_r4=online_r4, fp32_had=self.fp32_had, mode=self.mode,
                     seed=self.seed, progress=progress, device=device)

    def fingerprint(self) -> dict:
        """What identifies the rotation (for --resume): mode and seed when it is drawn from a seed (QuaRot's,
        rebuilt the same way on any machine up to float rounding), else mode and the sha256 of R1 and R2."""
        if self.seed is not None:
            return {"mode": self.mode, "seed": self.seed}
        h = hashlib.sha256()
        R2 = self.R2 if isinstance(self.R2, (list, tuple)) else [self.R2]
        for r in [self.R1, *R2]:
            h.update(b"-" if r is None else r.detach().double().cpu().contiguous().numpy().tobytes())
        return {"mode": self.mode, "sha256": h.hexdigest()}


def quarot_rotate(model: nn.Module, mode: str = "hadamard", seed: int = 0, fp32_had: bool = False,
                  progress: bool = False, online_r4: bool = True) -> None:
    """QuaRot: `Rotation.quarot(model.config, mode, seed, fp32_had).apply(model, online_r4, progress)`."""
    Rotation.quarot(model.config, mode, seed, fp32_had).apply(model, online_r4=online_r4, progress=progress)
