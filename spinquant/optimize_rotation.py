"""SpinQuant: learn R1 (residual stream) and R2 (per-layer value heads) by Cayley SGD on the quantized network.

    min_{R1, R2 orthogonal}  CE( f_Q(x; W, R1, R2) )       (next-token cross-entropy on calibration text)
f_Q is the norm-fused model with the rotations applied *functionally*: every weight is recomputed in the forward
from the frozen W (input side W R1, output side R1^T W, v_proj rows per head R2^T W_v, o_proj columns W_o R2),
then RTN fake-quantized at --w_bits; activations and the K/V cache are quantized at --a_bits/--k_bits/--v_bits;
R3 (q/k after RoPE) and R4 (down_proj input) stay online Hadamards.  Rounding uses the straight-through
estimator y = x + (Q(x) - x).detach(), so the gradient reaches R1/R2.  R1, R2 start as random Hadamards and are
updated by `common.models.cayley.CayleySGD` (lr 1.5 with linear decay to 0, 100 iterations, as in the paper).

    python spinquant/optimize_rotation.py --model meta-llama/Llama-2-7b-hf --w_bits 16 --a_bits 4 --k_bits 4 \
        --v_bits 4 --a_asym --k_asym --v_asym --k_groupsize 128 --v_groupsize 128 --output_rotation_path R.bin
(to follow with GPTQ/GPTAQ the SpinQuant authors train with 16-bit weights, W16A4KV4, as above.)

One device holds the whole model (--micro_bsz chunks of each --bsz batch, gradients accumulated; --grad_checkpointing
saves activation memory).  Under torchrun the training is data-parallel (`common.pipeline.distributed`): every rank draws
the same --bsz sample indices, runs its share idx[rank::world_size] and the R1/R2 gradients and the loss are summed
with one all-reduce per step, so every rank takes the same Cayley step and R processes follow the single-process
optimisation (up to float summation order).  The published recipe (8 GPUs, 1 sample each, 100 steps) is
`torchrun --nproc_per_node 8 ... --bsz 8`.
"""
from __future__ import annotations

import argparse
import logging
import math
import os

import torch
from torch import nn
from torch.nn.utils import parametrize

from common.cli import flags, types
from common.cli.device import device_flag
from common.cli.exits import one_line_errors, run_main
from common.models.cayley import CayleySGD, orthogonality_error
from common.pipeline import distributed
from common.quant.act_quant import ActQuantizer, ActQuantLinear
from common.solver import rtn

log = logging.getLogger("spinquant")

__all__ = ["Rotations", "RotatedWeight", "attach_rotations", "install_ste", "quantized_loss",
           "train_rotations", "build_training_model", "build_parser", "parse_args", "run", "main"]


class Rotations(nn.Module):
    """The trainable rotations: R1 [hidden, hidden] and one R2 [head_dim, head_dim] per layer (float32)."""

    def __init__(self, R1: torch.Tensor, R2: list[torch.Tensor]):
        super().__init__()
        self.R1 = nn.Parameter(R1.detach().float().clone())
        self.R2 = nn.ParameterList([nn.Parameter(r.detach().float().clone()) for r in R2])

    @classmethod
    def random_hadamard(cls, hidden_size: int, head_dim: int, num_layers: int, seed: int) -> "Rotations":
        """SpinQuant's initialisation: R1 and every R2 random Hadamard matrices (distinct seeds)."""
        from common.models.hadamard import random_hadamard_matrix

        R1 = random_hadamard_matrix(hidden_size, seed)
        R2 = [random_hadamard_matrix(head_dim, seed + 1 + i) for i in range(num_layers)]
        return cls(R1, R2)

    def max_orthogonality_error(self) -> float:
        return max(orthogonality_error(p) for p in self.parameters())


class RotatedWeight(nn.Module):
    """Parametrization W -> fake-quantized rotated W (see the module docstring for the four kinds).

    kind: "in" (W R1), "out" (R1^T W), "v" (R2^T W_v R1 per head), "o" (R1^T W_o R2 per head), "bias_out"
    (R1^T b), "bias_v" (R2^T b per head).  quant: None, or dict(bits, sym, mse, group_size) for RTN with STE.
    """

    def __init__(self, rot: Rotations, kind: str, layer: int | None = None, quant: dict | None = None):
        super().__init__()
        self.kind, self.layer, self.quant = kind, layer, quant
        object.__setattr__(self, "rot", rot)  # shared, not a submodule (its parameters are not the model's)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        R1 = self.rot.R1.to(device=W.device, dtype=W.dtype)
        k = self.kind
        if k == "in":
            W = W @ R1
        elif k in ("out", "bias_out"):
            W = R1.T @ W
        elif k == "v":
            R2 = self.rot.R2[self.layer].to(device=W.device, dtype=W.dtype)
            h = R2.shape[0]
            W = (R2.T @ W.reshape(-1, h, W.shape[-1]) @ R1).reshape(W.shape)
        elif k == "bias_v":
            R2 = self.rot.R2[self.layer].to(device=W.device, dtype=W.dtype)
            W = (W.reshape(-1, R2.shape[0]) @ R2).reshape(W.shape)
        elif k == "o":
            R2 = self.rot.R2[self.layer].to(device=W.device, dtype=W.dtype)
            h = R2.shape[0]
            W = (R1.T @ W).reshape(W.shape[0], -1, h) @ R2
            W = W.reshape(W.shape[0], -1)
        else:
            raise ValueError(f"unknown rotation kind {k!r}")
        if self.quant is not None:
            with torch.no_grad():
                Q = rtn(W.detach(), **self.quant).to(W.dtype)
            W = W + (Q - W).detach()
        return W

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer}, quant={self.quant}"


def _base_linear(module: nn.Module) -> nn.Linear:
    return module.linear if isinstance(module, ActQuantLinear) else module


def _decoder(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "model") else model


def attach_rotations(model: nn.Module, rot: Rotations, quant: dict | None = None,
                     quant_lm_head: dict | None = None) -> None:
    """Register `RotatedWeight` parametrizations on a norm-fused (Llama-style) model, in place.

    quant: RTN settings for the decoder-layer linears (None = 16-bit); quant_lm_head: for lm_head.
    The embedding and lm_head get W R1; layer i's q/k/gate/up W R1, o R1^T W R2, v R2^T W R1, down R1^T W.
    """
    dec = _decoder(model)
    lm_head = model.get_output_embeddings()
    emb = dec.embed_tokens
    if _base_linear(lm_head).weight is emb.weight:
        _base_linear(lm_head).weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    parametrize.register_parametrization(emb, "weight", RotatedWeight(rot, "in"))
    parametrize.register_parametrization(_base_linear(lm_head), "weight", RotatedWeight(rot, "in", quant=quant_lm_head))
    for i, layer in enumerate(dec.layers):
        attn, mlp = layer.self_attn, layer.mlp
        spec = [(attn.q_proj, "in", None), (attn.k_proj, "in", None), (attn.v_proj, "v", "bias_v"),
                (attn.o_proj, "o", "bias_out"), (mlp.gate_proj, "in", None), (mlp.up_proj, "in", None),
                (mlp.down_proj, "out", "bias_out")]
        for mod, kind, bias_kind in spec:
            lin = _base_linear(mod)
            parametrize.register_parametrization(lin, "weight", RotatedWeight(rot, kind, i, quant))
            if lin.bias is not None and bias_kind is not None:
                parametrize.register_parametrization(lin, "bias", RotatedWeight(rot, bias_kind, i))
    for p in model.parameters():
        p.requires_grad_(False)


def _ste_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    return x + (output - x).detach()


def install_ste(model: nn.Module) -> list:
    """Straight-through gradients for every ActQuantizer (activations, K, V): y = x + (Q(x) - x).detach()."""
    return [m.register_forward_hook(_ste_hook) for m in model.modules() if isinstance(m, ActQuantizer)]


def quantized_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on input_ids [batch, seqlen]."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def _lr_factor(schedule: str, iters: int):
    if schedule == "linear":
        return lambda s: max(0.0, 1.0 - s / iters)
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, iters) / iters))
    raise ValueError(f"lr schedule must be 'linear' or 'cosine', got {schedule!r}")


def train_rotations(model: nn.Module, rot: Rotations, samples: torch.Tensor, *, iters: int, lr: float,
                    bsz: int = 1, micro_bsz: int = 1, momentum: float = 0.0, schedule: str = "linear",
                    seed: int = 0, progress: bool = True) -> list[dict]:
    """Cayley SGD on R1/R2 for `iters` steps of `bsz` samples (gradients accumulated over micro-batches).

    samples: [n, seqlen] token ids, visited in a seeded random order (reshuffled each epoch).
    lr decays from `lr` to 0 (linear, or cosine as in the published script).  Returns the per-step history
    [{step, loss, lr}] (the last entry also has ortho_err, max ||R^T R - I||_F).
    """
    from tqdm import tqdm

    if samples.dim() != 2 or samples.shape[0] < 1:
        raise ValueError(f"samples must be [n, seqlen] token ids, got shape {tuple(samples.shape)}")
    device = rot.R1.device
    opt = CayleySGD(rot.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(schedule, iters))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(samples.shape[0], generator=gen), 0
    history: list[dict] = []
    if bsz < distributed.world_size():
        raise ValueError(f"bsz {bsz} is smaller than the {distributed.world_size()} processes: each needs a sample")
    bar = tqdm(range(iters), desc="rotation training", disable=not progress or not distributed.is_main())
    for step in bar:
        cur_lr = opt.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        idx = []
        for _ in range(bsz):
            if pos == len(order):
                order, pos = torch.randperm(samples.shape[0], generator=gen), 0
            idx.append(order[pos].item())
            pos += 1
        mine = distributed.shard(idx)  # this rank's share of the step's samples (all of them in one process)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for j in range(0, len(mine), micro_bsz):
            batch = samples[mine[j:j + micro_bsz]].to(device)
            loss = quantized_loss(model, batch)
            (loss * batch.shape[0] / bsz).backward()
            total += loss.detach().double() * batch.shape[0] / bsz
        distributed.all_reduce_sum_([total, *(p.grad for p in rot.parameters())])
        total = total.item()
        if not math.isfinite(total):
            raise FloatingPointError(f"rotation training: loss became {total} at step {step}")
        opt.step()
        sched.step()
        rec = {"step": step, "loss": total, "lr": cur_lr}
        history.append(rec)
        bar.set_postfix(loss=f"{total:.4f}")
        if distributed.is_main():
            log.info("step %d/%d loss %.5f lr %.4g", step + 1, iters, total, cur_lr)
    history[-1]["ortho_err"] = rot.max_orthogonality_error()
    return history


def build_training_model(model: nn.Module, rot: Rotations, *, weight_quant: dict | None, act, kv,
                         fp32_had: bool = False) -> list:
    """Turn a freshly loaded model into the training network f_Q, in place; returns the STE hook handles.

    Norms fused and R4 folded/installed by `rotate_model` with R1 = I and no R2 (the learned R1/R2 are applied
    functionally on top: (R1^T W) H^T is what rotate_model(R1, R2) folds), then the K/V quantizers with R3 and
    the activation quantizers of the fake_quant pipeline (`llm.install_quantizers`), then the parametrizations.
    """
    from common.models.llm import install_quantizers
    from common.models.rotation import rotate_model

    eye = torch.eye(model.config.hidden_size, dtype=torch.float64)
    rotate_model(model, eye, None, online_r4=True, fp32_had=fp32_had, mode="spinquant-train")
    install_quantizers(model, act, kv)
    attach_rotations(model, rot, quant=weight_quant)
    return install_ste(model)


# ------------------------------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    p = types.OneLineParser(prog="spinquant/optimize_rotation.py", description=(
        "SpinQuant: learn R1/R2 by Cayley SGD on the W/A/KV fake-quantized model (straight-through estimator); "
        "writes a rotation file for spinquant/main.py --optimized_rotation_path."))
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="hub id or local directory (Llama, Qwen2/2.5, Qwen3, Mistral)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype during training (default bfloat16 on CUDA, float32 on CPU); R1/R2 stay float32")
    g.add_argument("--device", default=None, help="training device (default cuda if available, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling and the batch order")
    g.add_argument("--rotation_seed", type=int, default=0, help="seed of the random Hadamard initialisation")
    g = p.add_argument_group("quantization during training (RTN weights, straight-through estimator)")
    g.add_argument("--w_bits", type=types.bits, default=16,
                   help="weight bits (16 = unquantized; use 16 before GPTQ/GPTAQ)")
    g.add_argument("--w_groupsize", type=types.groupsize, default=-1, help="weight group size (-1: per channel)")
    g.add_argument("--w_asym", action="store_true", help="asymmetric weight grid (default symmetric)")
    g.add_argument("--w_clip", action="store_true", help="MSE search of the weight clipping range")
    g.add_argument("--fp32_had", action="store_true", help="online Hadamards in float32")
    flags.add_act_flags(p, int8_down_proj=True)
    flags.add_kv_flags(p)
    g = p.add_argument_group("training")
    g.add_argument("--cal_dataset", default="wikitext2", help="training text: a dataset name or a local file")
    g.add_argument("--nsamples", type=types.positive, default=800, help="training sequences (paper: 800)")
    g.add_argument("--seqlen", type=types.positive, default=2048, help="sequence length (paper: 2048)")
    g.add_argument("--iters", type=types.positive, default=100, help="optimizer steps (paper: 100)")
    g.add_argument("--bsz", type=types.positive, default=8, help="sequences per step (published: 8 GPUs x 1)")
    g.add_argument("--micro_bsz", type=types.positive, default=1, help="sequences per forward/backward (memory)")
    g.add_argument("--lr", type=float, default=1.5, help="Cayley SGD learning rate (paper: 1.5)")
    g.add_argument("--lr_schedule", choices=["linear", "cosine"], default="linear",
                   help="decay to 0 (paper: linear; the published script: cosine)")
    g.add_argument("--momentum", type=float, default=0.0, help="Cayley SGD momentum")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute decoder layers in the backward")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_rotation_path", required=True, help="rotation file to write (torch.save dict)")
    g.add_argument("--output_dir", default=None,
                   help="where results.json with the training curve goes (default outputs/spinquant/<run>)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate everything checkable before loading weights; errors are one line, exit status 2."""
    from common.cli.llm import warn_long_seqlen
    from common.data.text import check_dataset_arg
    from common.models.files import check_output_dir, check_output_file
    from common.models.llm import LLMError, check_config, read_config

    p = build_parser()
    a = p.parse_args(argv)
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    if not 0.0 <= a.momentum < 1.0:
        p.error(f"--momentum must be in [0, 1), got {a.momentum}")
    if a.micro_bsz > a.bsz:
        p.error(f"--micro_bsz {a.micro_bsz} exceeds --bsz {a.bsz}")
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    if a.bsz < procs:
        p.error(f"--bsz {a.bsz} is smaller than the {procs} torchrun processes (each needs a sample per step)")
    if a.w_bits == a.a_bits == a.k_bits == a.v_bits == 16:
        p.error("nothing is quantized (--w_bits/--a_bits/--k_bits/--v_bits all 16): no rotation to learn")
    flags.check_act_flags(p, a)
    flags.check_kv_flags(p, a)
    try:
        check_output_file(a.output_rotation_path, "--output_rotation_path")
        check_output_dir(_output_dir(a), "--output_dir")
        check_dataset_arg(a.cal_dataset, "--cal_dataset")
        config = read_config(a.model)
        check_config(config)
    except (ValueError, LLMError) as e:
        p.error(str(e).splitlines()[0])
    from common.models.moe import is_moe_config

    if is_moe_config(config):
        p.error(f"--model: rotation training does not support mixture-of-experts models ({config.model_type}) yet; "
                "QuaRot's --rotate in fake_quant/main.py does")
    warn_long_seqlen(a.seqlen, config)
    dev = device_flag(p, a)
    a.dtype = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    _check_group_sizes(p, a, config)
    return a


def _check_group_sizes(p: argparse.ArgumentParser, a: argparse.Namespace, config) -> None:
    from common.models.llm import head_dim, linear_in_features

    for what, cols in linear_in_features(config).items():  # weight groups need not divide (narrower last group)
        if a.a_groupsize > 0 and cols % a.a_groupsize:
            p.error(f"--a_groupsize {a.a_groupsize} does not divide the {cols} input features of {what}")
    for flag in ("k_groupsize", "v_groupsize"):
        size = getattr(a, flag)
        if size > 0 and head_dim(config) % size:
            p.error(f"--{flag} {size} does not divide head_dim {head_dim(config)}")


def _settings(a: argparse.Namespace):
    wq = None if a.w_bits == 16 else dict(bits=a.w_bits, sym=not a.w_asym, mse=a.w_clip, group_size=a.w_groupsize)
    return wq, flags.act_settings(a), flags.kv_config(a, rotate_qk=True, fp32_had=a.fp32_had)


def run_name(a: argparse.Namespace) -> str:
    base = os.path.basename(os.path.normpath(os.path.expanduser(a.model)))
    return f"{base}_w{a.w_bits}a{a.a_bits}k{a.k_bits}v{a.v_bits}_rotation"


def _output_dir(a: argparse.Namespace) -> str:
    return a.output_dir or os.path.join("outputs", "spinquant", run_name(a))


def run(a: argparse.Namespace) -> dict:
    """Load, build f_Q, train R1/R2, write the rotation file and results.json; returns the results record."""
    from common.models import llm
    from common.data.text import get_calibration_data
    from common.io.results import PhaseTimer, reset_peak_memory, write_results
    from common.models.rotation_io import model_dims, save_rotations

    timer = PhaseTimer()
    torch.manual_seed(a.seed)
    try:
        device = distributed.init(a.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    wq, act, kv = _settings(a)
    tokenizer = llm.load_tokenizer(a.model)
    with timer.phase("data"):
        try:
            samples = torch.cat(get_calibration_data(a.cal_dataset, tokenizer, a.nsamples, a.seqlen, a.seed))
        except (ValueError, RuntimeError, OSError) as e:
            raise SystemExit(f"error: data: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    with timer.phase("load"):
        model = llm.load_model(a.model, a.dtype)
        hidden, head_dim, layers = model_dims(model.config)
        rot = Rotations.random_hadamard(hidden, head_dim, layers, a.rotation_seed)
        hooks = build_training_model(model, rot, weight_quant=wq, act=act, kv=kv, fp32_had=a.fp32_had)
        model.to(device)
        rot.to(device)
        reset_peak_memory()  # after CUDA is initialised (resetting before the first allocation can fail)
        if a.grad_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; older: gradient_...
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # HF checkpoints only in training mode; these families have no active dropout
    with timer.phase("train"):
        history = train_rotations(model, rot, samples, iters=a.iters, lr=a.lr, bsz=a.bsz, micro_bsz=a.micro_bsz,
                                  momentum=a.momentum, schedule=a.lr_schedule, seed=a.seed)
    for h in hooks:
        h.remove()
    if not distributed.is_main():  # every rank holds the same rotations; rank 0 writes them
        return {}
    bits = {k: getattr(a, k) for k in ("w_bits", "a_bits", "k_bits", "v_bits")}
    path = save_rotations(os.path.expanduser(a.output_rotation_path), rot.R1, list(rot.R2), model=a.model, bits=bits,
                          extra={"iters": a.iters, "lr": a.lr, "nsamples": a.nsamples, "seqlen": a.seqlen,
                                 "cal_dataset": a.cal_dataset, "seed": a.seed, "rotation_seed": a.rotation_seed,
                                 "final_loss": history[-1]["loss"]})
    log.info("wrote %s", path)
    result = {"model": a.model, "run": run_name(a), "config": vars(a).copy(), "rotation_path": str(path),
              "initial_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
              "ortho_err": history[-1]["ortho_err"], "history": history, "time_s": timer.summary(),
              "device": str(device), "world_size": distributed.world_size()}
    out = write_results(_output_dir(a), result)
    print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; wrote {path} and {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from common.models.files import FileError
    from common.models.llm import LLMError

    try:
        with one_line_errors((LLMError, FileError), lambda: "nothing was written (the rotation file and "
                                                            "results.json are written at the end)"):
            return run(a)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run_main(main)
