"""Command line of the LLM front ends (fake_quant/main.py, spinquant/main.py; QuaRot / GPTQv2 flag names).

Everything that can be checked without the weights is checked here, before any model loads: flag values,
paths, dataset names, and (from config.json only) the architecture and that activation group sizes divide the layer
widths.
Each problem is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch

from common.cli import flags, types
from common.models.kv_quant import KVQuantConfig
from common.quant.act_quant import ActQuantSettings
from common.solver import SolverConfig

__all__ = ["parse_args", "build_parser", "check_args", "settings", "validate_model_config", "warn_long_seqlen",
           "method_name", "run_name", "SAVED_FLAGS"]

QUANT_FILE = "gptaq_quant.json"
DEFAULT_TASKS = ["piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada_openai"]


def build_parser(prog: str = "fake_quant/main.py") -> argparse.ArgumentParser:
    p = types.OneLineParser(prog=prog, description=(
        "QuaRot rotation + GPTQ / GPTAQ (GPTQv2) / RTN weight quantization with per-token activation and KV-cache "
        "fake quantization of decoder LLMs (Llama, Qwen2/2.5, Qwen3, Mistral; MoE: Mixtral, Qwen2-MoE, Qwen3-MoE); "
        "WikiText-2 perplexity and "
        "lm-eval zero-shot tasks."))
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id or local directory (AutoModelForCausalLM); optional with "
                                    "--load_qmodel_path")
    g.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weights and activations dtype (default float16; with --load_qmodel_path: the saved dtype)")
    g.add_argument("--device", default=None, help="device for the layer being processed and for evaluation "
                                                  "(default: cuda if available, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling and torch")
    g.add_argument("--stream", action="store_true",
                   help="read the decoder layers one at a time from the safetensors checkpoint, write each quantized "
                        "layer to --save_qmodel_path (default: <output_dir>/stream_qmodel, deleted after the "
                        "evaluation) and evaluate streaming from there: host memory holds about one layer; "
                        "with --load_qmodel_path: evaluate the saved model streaming")
    g.add_argument("--distribute", action="store_true",
                   help="spread the model over all visible GPUs (accelerate device_map) for evaluation; "
                        "no-op with a warning on CPU or with a single GPU")

    flags.add_weight_flags(p)
    flags.add_act_flags(p, int8_down_proj=True)
    flags.add_kv_flags(p)

    from common.models.moe import DEFAULT_MIN_TOKENS

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--moe_min_tokens", type=types.nonneg_int, default=DEFAULT_MIN_TOKENS,
                   help="MoE models: an expert routed fewer calibration tokens than this is rounded to nearest (RTN "
                        "on the same grid, logged, 'fallback' in results.json) instead of solved from them")

    g = p.add_argument_group("rotation")
    g.add_argument("--rotate", action="store_true", help="QuaRot: fuse norms, fold R1/R2, online R4 Hadamard (and R3 with --k_bits < 16)")
    g.add_argument("--rotate_mode", choices=["hadamard", "random"], default="hadamard",
                   help="R1/R2: random Hadamard or random orthogonal")
    g.add_argument("--rotation_seed", type=int, default=0, help="seed of R1/R2")
    g.add_argument("--fp32_had", action="store_true", help="online Hadamards in float32")

    g = p.add_argument_group("data")
    g.add_argument("--nsamples", type=types.positive, default=128, help="calibration sequences")
    g.add_argument("--seqlen", type=types.positive, default=2048, help="calibration / evaluation sequence length")
    g.add_argument("--cal_dataset", default="wikitext2", help="calibration data: a dataset name or a local file")
    g.add_argument("--eval_dataset", default="wikitext2", help="perplexity data: a dataset name or a local file")
    g.add_argument("--eval_limit", type=types.positive, default=None,
                   help="perplexity on the first N evaluation windows only (default: all; for quick runs)")
    g.add_argument("--bsz", type=types.positive, default=1, help="batch size of calibration forwards and perplexity")
    g.add_argument("--offload_inputs", action="store_true",
                   help="keep the calibration streams on CPU between layers (saves GPU memory)")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="on CUDA, capture each layer group's per-batch passes once as CUDA graphs and replay them on "
                        "the other batches (the same results, checked bit for bit; pays off where the host, not the "
                        "GPU, limits the calibration forwards)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--lm_eval", action="store_true", help="run lm-eval zero-shot tasks")
    g.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, help="lm-eval task names")
    g.add_argument("--lm_eval_batch_size", type=types.positive, default=32, help="lm-eval batch size")
    g.add_argument("--lm_eval_include_path", default=None,
                   help="directory of custom lm-eval task YAMLs (e.g. tasks over local files, for offline use)")
    g.add_argument("--lm_eval_limit", type=types.positive, default=None, help="lm-eval: at most this many examples per task")
    g.add_argument("--lm_eval_num_fewshot", type=types.nonneg_int, default=None,
                   help="lm-eval: examples in each prompt (default: each task's own, 0 for the zero-shot tasks)")
    g.add_argument("--lm_eval_chat_template", action="store_true",
                   help="lm-eval: format prompts with the tokenizer's chat template, few-shot examples as turns")

    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default=None, help="where results.json goes (default outputs/fake_quant/<run>)")
    g.add_argument("--save_qmodel_path", default=None,
                   help="save the fake-quantized model (weights, config, rotation/quantization settings) here")
    g.add_argument("--load_qmodel_path", default=None,
                   help="evaluate a model saved with --save_qmodel_path without re-quantizing "
                        "(quantization flags come from the saved settings)")
    g.add_argument("--resume", action="store_true",
                   help="checkpoint after every decoder layer in <output_dir>/resume and continue from the last "
                        "finished layer when a checkpoint of the same configuration is there")
    from common.io.export import CHECKPOINT_FORMATS, EXPORT_DTYPES

    g.add_argument("--export", default=None, metavar="DIR",
                   help="also write the weight-only quantized model here as a standard GPTQ checkpoint (qweight, "
                        "qzeros, scales, g_idx; --w_bits 2/3/4/8, no activation/KV quantization; with --rotate "
                        "R1/R2 are folded into the weights and no online Hadamard is used); with --stream layer "
                        "by layer as each is solved; with --load_qmodel_path from the saved model, not quantizing "
                        "again")
    g.add_argument("--export_format", choices=CHECKPOINT_FORMATS, default="gptq",
                   help="--export zero points: gptq (v1, stores zero - 1; most loaders) or gptq_v2 (stores zero)")
    g.add_argument("--export_dtype", choices=EXPORT_DTYPES, default="float16",
                   help="--export: dtype of the scales and of every non-quantized tensor (embeddings, norms, "
                        "lm_head, biases); the solve rounds its scales to it")
    return p


def method_name(args: argparse.Namespace) -> str:
    """none, rtn, gptq, gptaq, gptaq_exact or gptaq_p_term_only (`SolverConfig.label`)."""
    return flags.solver_config(args).label


def settings(args: argparse.Namespace) -> tuple[SolverConfig, ActQuantSettings, KVQuantConfig]:
    """The configuration objects of the command line.  --export: scales rounded to --export_dtype as the checkpoint
    stores them (bit-exact) and no online R3 (a plain model).  R3 (the Hadamard on queries and keys after RoPE) is
    installed with --rotate only when keys are quantized (--k_bits < 16), as in the published QuaRot / GPTAQ code:
    without a key quantizer it leaves q k^T unchanged."""
    wcfg = flags.solver_config(args, scale_dtype=args.export_dtype if args.export else None)
    kv = flags.kv_config(args, rotate_qk=args.rotate and args.k_bits < 16 and not args.export,
                         fp32_had=args.fp32_had)
    return wcfg, flags.act_settings(args), kv


def run_name(args: argparse.Namespace) -> str:
    src = args.load_qmodel_path or args.model
    base = os.path.basename(os.path.normpath(os.path.expanduser(src)))
    kv = f"kv{args.k_bits}" if args.k_bits == args.v_bits else f"k{args.k_bits}v{args.v_bits}"
    name = f"{base}_w{args.w_bits}a{args.a_bits}{kv}_{method_name(args)}"
    return name + ("_rot" if args.rotate else "")


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Every check that needs no model file beyond config.json; errors through p.error (one line, exit 2)."""
    from common.data.text import check_dataset_arg
    from common.cli.device import device_flag
    from common.models.llm import looks_like_path

    if a.load_qmodel_path is not None:
        path = os.path.expanduser(a.load_qmodel_path)
        if not os.path.isdir(path):
            p.error(f"--load_qmodel_path: directory {a.load_qmodel_path} does not exist")
        if not os.path.isfile(os.path.join(path, QUANT_FILE)):
            p.error(f"--load_qmodel_path: {a.load_qmodel_path} has no {QUANT_FILE} (not saved with --save_qmodel_path)")
        if a.save_qmodel_path is not None:
            p.error("--save_qmodel_path and --load_qmodel_path cannot be combined")
        if a.resume:
            p.error("--resume continues a quantization run; it cannot be combined with --load_qmodel_path")
    elif a.model is None:
        p.error("--model is required (a hub id or a local model directory)")
    if a.model is not None:
        path = os.path.expanduser(a.model)
        if os.path.exists(path):
            if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
                p.error(f"--model: {a.model} is not a model directory (no config.json)")
        elif looks_like_path(a.model):
            p.error(f"--model: local model directory {a.model} does not exist")
    flags.check_weight_flags(p, a)
    flags.check_act_flags(p, a)
    flags.check_kv_flags(p, a)
    if not a.rotate:
        flags.warn_idle(p, a, ["rotate_mode", "rotation_seed", "fp32_had"], "without --rotate")
    _check_stream(p, a)
    for flag in ("lm_eval_num_fewshot", "lm_eval_chat_template"):
        if getattr(a, flag) not in (None, False) and not a.lm_eval:
            p.error(f"--{flag} needs --lm_eval")
    if a.lm_eval:
        from common.eval.lm_eval_runner import validate_tasks

        try:
            validate_tasks(a.tasks, a.lm_eval_include_path)
        except ValueError as e:
            p.error(f"--tasks: {str(e).splitlines()[0]}")
    for flag in ("cal_dataset", "eval_dataset"):
        try:
            check_dataset_arg(getattr(a, flag), f"--{flag}")
        except ValueError as e:
            p.error(str(e).splitlines()[0])
    dev = device_flag(p, a)
    _check_torchrun(p, a)
    _check_export(p, a)
    if a.distribute and (dev.type != "cuda" or torch.cuda.device_count() < 2):
        warnings.warn("--distribute needs at least two visible GPUs; evaluating on a single device instead")
        a.distribute = False


def _check_torchrun(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1) every rank needs a calibration batch, uses cuda:LOCAL_RANK, and evaluates on
    rank 0 only (no --distribute)."""
    from common.pipeline import distributed

    if not distributed.launched():
        return
    world = int(os.environ["WORLD_SIZE"])
    if a.distribute:
        p.error("--distribute (one process over several GPUs) cannot be combined with a torchrun launch")
    if a.load_qmodel_path is not None:
        p.error("--load_qmodel_path only evaluates (one process); run it without torchrun")
    if a.device.startswith("cuda:"):
        p.error(f"--device {a.device}: with torchrun pass --device cuda (rank r uses cuda:LOCAL_RANK)")
    batches = -(-a.nsamples // a.bsz)
    if a.w_bits < 16 and not a.w_rtn and batches < world:
        p.error(f"--nsamples {a.nsamples} with --bsz {a.bsz} gives {batches} calibration batches, fewer than the "
                f"{world} torchrun processes")


def _check_stream(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--stream keeps no whole model in memory: perplexity only, one process."""
    if not a.stream:
        return
    from common.pipeline import distributed

    if a.lm_eval or a.distribute:
        p.error(f"--stream evaluates perplexity only (it never holds the whole model); for --"
                f"{'lm_eval' if a.lm_eval else 'distribute'} save it with --save_qmodel_path and load that without "
                "--stream")
    if a.resume:
        p.error("--stream cannot be combined with --resume")
    if distributed.launched():
        p.error("--stream runs in one process; it cannot be launched with torchrun")


def _check_export(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--export writes a weight-only GPTQ checkpoint: 2/3/4/8-bit weights, nothing quantized online, a new or empty
    target directory."""
    if a.export is None:
        for flag, default in (("export_format", "gptq"), ("export_dtype", "float16")):
            if getattr(a, flag) != default:
                p.error(f"--{flag} needs --export")
        return
    from common.io.export import EXPORT_BITS, ExportError, check_export_target

    if a.load_qmodel_path is not None:
        from common.models.llm import LLMError
        from common.pipeline.streaming import check_saved_exportable

        try:
            check_saved_exportable(a.load_qmodel_path)
            check_export_target(a.export)
        except (LLMError, ExportError) as e:
            p.error(str(e))
        return
    if a.w_bits not in EXPORT_BITS:
        p.error(f"--export needs --w_bits in {', '.join(map(str, EXPORT_BITS))}, got {a.w_bits}")
    online = [f"--{f} {getattr(a, f)}" for f in ("a_bits", "k_bits", "v_bits") if getattr(a, f) < 16]
    online += ["--int8_down_proj"] if a.int8_down_proj else []
    if online and a.rotate:
        p.error(f"--export with --rotate and {' '.join(online)}: activation / KV-cache quantization needs the "
                "online R3/R4 Hadamards, which a GPTQ checkpoint cannot hold; export is weight-only (--rotate alone "
                "folds R1/R2 into the weights)")
    if online:
        p.error(f"--export writes weight-only checkpoints; {' '.join(online)} (activation / KV-cache quantization) "
                "cannot be stored in one")
    try:
        check_export_target(a.export)
    except ExportError as e:
        p.error(str(e))


def validate_model_config(args: argparse.Namespace, config) -> None:
    """Checks that need only config.json: supported architecture and activation / KV group sizes dividing the
    widths (a weight group size need not: the last group is narrower); a warning for a --seqlen beyond the model's
    positions.  Raises SystemExit with a one-line message."""
    from common.models import moe
    from common.models.llm import LLMError, check_config, head_dim, linear_in_features

    try:
        check_config(config)
    except LLMError as e:
        raise SystemExit(f"error: {e}") from None
    widths = linear_in_features(config)
    size = args.a_groupsize
    for what, cols in widths.items():
        if size > 0 and cols % size:
            raise SystemExit(f"error: --a_groupsize {size} does not divide the {cols} input features of {what} "
                             f"({config.model_type}, hidden_size {config.hidden_size})")
    if moe.is_moe_config(config):
        _check_moe(args)
    hd = head_dim(config)
    for flag in ("k_groupsize", "v_groupsize"):
        size = getattr(args, flag)
        if size > 0 and hd % size:
            raise SystemExit(f"error: --{flag} {size} does not divide head_dim {hd}")
    warn_long_seqlen(args.seqlen, config)
    if getattr(args, "export", None):
        from common.io.export import ExportError, check_export_config

        try:
            check_export_config(config)
        except ExportError as e:
            raise SystemExit(f"error: {e}") from None


def _check_moe(args: argparse.Namespace) -> None:
    """What MoE models do not support yet: --stream (per-layer checkpoint reading of fused experts), --resume and
    torchrun."""
    from common.pipeline import distributed

    for flag in ("stream", "resume"):
        if getattr(args, flag, False):
            raise SystemExit(f"error: --{flag} does not support mixture-of-experts models yet; run without it")
    if distributed.launched():
        raise SystemExit("error: mixture-of-experts models run in one process; launch without torchrun")


def warn_long_seqlen(seqlen: int, config) -> None:
    """Warn when --seqlen exceeds the positions the model was trained for (config.max_position_embeddings)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        warnings.warn(f"--seqlen {seqlen} exceeds the model's max_position_embeddings {limit}: the windows are "
                      "longer than any sequence it was trained on", stacklevel=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate everything that needs no model file beyond config.json (which main reads next)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def _saved_flags() -> tuple[str, ...]:
    p = build_parser()
    rotation = next(g for g in p._action_groups if g.title == "rotation")
    return tuple(flags.quant_flag_names(p) + [a.dest for a in rotation._group_actions] + ["nsamples", "cal_dataset"])


# What a saved quantized model records of its run and --load_qmodel_path restores (the shared quantization groups,
# the rotation, the calibration data).
SAVED_FLAGS = _saved_flags()
