"""The LLM command line behind fake_quant/main.py and spinquant/main.py: GPTQ / GPTAQ / RTN with W/A/KV fake
quantization, a thin layer over the Python API (`common.api.llm.CausalLM`, `quantize_streamed`, `export_saved`):
flags -> configuration objects -> API calls, plus results.json, the printed table, lm-eval and --resume.

Pipeline: (optional) rotation (QuaRot's random Hadamards, or the learned SpinQuant rotation passed as `rotation`: (norm fusion, R1/R2 folded, online R3 on q/k and R4 on down_proj) ->
KV-cache and per-token activation quantizers on every decoder linear (lm_head stays 16-bit) -> weights solved layer
by layer (common.pipeline.driver): GPTQ min ||W X~ - Q X~||^2, GPTAQ min ||Q X~ - W X||^2 with the full-precision stream X
carried alongside -> activation quantizers on -> evaluation.  --export DIR also writes the weight-only result as a
standard GPTQ checkpoint (common.io.export; --export_dtype scales, rotation without online R3/R4, so it is a plain
model; with --stream layer by layer as each is solved, with --load_qmodel_path from the saved model's grids).
--resume checkpoints after every decoder layer (common.pipeline.resume); under torchrun the calibration batches are sharded
over the processes (common.pipeline.distributed) and rank 0 evaluates and writes the results.  --stream reads, quantizes and
writes one decoder layer at a time and evaluates from the written checkpoint (common.pipeline.streaming).

    python fake_quant/main.py --model meta-llama/Llama-2-7b-hf --rotate --w_bits 4 --a_bits 4 --k_bits 4 \
        --v_bits 4 --w_clip --a_clip_ratio 0.9 --k_clip_ratio 0.95 --v_clip_ratio 0.95 --gptaq
    torchrun --nproc_per_node 2 fake_quant/main.py ...   (same flags; one GPU per process)
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

from common.api import llm as api
from common.api.llm import CausalLM, seed_everything  # noqa: F401 - seed_everything: the benchmarks' import
from common.cli.exits import RunFailed, one_line_errors
from common.cli.llm import SAVED_FLAGS, method_name, run_name, settings, validate_model_config
from common.eval.finite import NonFiniteError, check_metrics
from common.eval.lm_eval_runner import require_chat_template, task_score
from common.io.lock import LockError, RunLock
from common.io.results import PhaseTimer, markdown_table, peak_memory, reset_peak_memory, write_results
from common.models import checkpoint, llm
from common.models.files import FileError, check_output_dir
from common.models.rotation import Rotation
from common.pipeline import distributed

log = logging.getLogger("fake_quant")


def rotation_of(args) -> Rotation | None:
    """QuaRot's rotation of the command line (--rotate, --rotate_mode, --rotation_seed, --fp32_had), or None."""
    if not args.rotate:
        return None
    return Rotation.quarot(llm.read_config(args.model), args.rotate_mode, args.rotation_seed, args.fp32_had)


def resume_fingerprint(args, wcfg, act, kv, rotation: Rotation | None, cal_samples: list[torch.Tensor]) -> dict:
    """What a --resume checkpoint must share with this run: model (path and a digest of its files), dtype,
    calibration tokens and batching, and the configuration objects (solver, activations, KV cache, rotation
    matrices)."""
    local = os.path.isdir(os.path.expanduser(args.model))
    model = os.path.abspath(os.path.expanduser(args.model)) if local else args.model
    tokens = hashlib.sha256(b"".join(t.numpy().tobytes() for t in cal_samples)).hexdigest()
    return {"model": model, "model_files": checkpoint.fingerprint(model) if local else None, "dtype": args.dtype, "seed": args.seed, "seqlen": args.seqlen, "bsz": args.bsz,
            "nsamples": args.nsamples, "cal_dataset": args.cal_dataset, "calibration_sha256": tokens,
            "solver": wcfg.to_dict(), "act_quant": act.to_dict(),
            "kv_quant": dataclasses.asdict(kv), "export": bool(args.export),  # export: no online R3/R4
            "rotation": None if rotation is None else rotation.fingerprint()}


def _export_format(args) -> str | None:
    return args.export_format if args.export else None


def quantize(model, args, wcfg, act, kv, cal_samples, device: torch.device, rotation: Rotation | None = None,
             resume=None, on_quantized=None) -> list[dict]:
    """`common.api.llm.quantize_model` with the command line's batching, offloading, MoE fallback threshold and
    --export (a plain model)."""
    return api.quantize_model(model, cal_samples, wcfg, act, kv, rotation, device=device, bsz=args.bsz,
                              offload_inputs=args.offload_inputs, export_format=_export_format(args),
                              on_quantized=on_quantized, resume=resume, moe_min_tokens=args.moe_min_tokens,
                              cuda_graphs=args.cuda_graphs)


def _extra_spec(args) -> dict:
    return {"args": vars(args).copy()}


def quantize_streamed(args, wcfg, act, kv, cal_samples, device: torch.device, tokenizer, path: str,
                      rotation: Rotation | None = None, block_times: list[dict] | None = None,
                      setup_times: dict | None = None) -> list[dict]:
    """--stream: `common.api.llm.quantize_streamed` with the command line's settings (and --export written layer by
    layer); the quantized model is written to `path`.  block_times, setup_times: see
    common.pipeline.driver.quantize_blocks and common.pipeline.streaming.quantize_checkpoint."""
    return api.quantize_streamed(
        args.model, path, cal_samples, wcfg, act, kv, rotation, dtype=args.dtype, device=device, bsz=args.bsz,
        offload_inputs=args.offload_inputs, tokenizer=tokenizer, extra_spec=_extra_spec(args),
        block_times=block_times, setup_times=setup_times, export_dir=args.export, export_format=args.export_format,
        export_dtype=args.export_dtype, cuda_graphs=args.cuda_graphs)


def evaluate(model, tokenizer, args, eval_windows, device: torch.device, timer: PhaseTimer,
             open_layer=None) -> tuple[dict, dict]:
    """Perplexity (layer by layer on a GPU `device`, or read from disk layer by layer with `open_layer` (--stream);
    whole model with --distribute or on CPU) and lm-eval (common.eval.lm_eval_runner moves the model to `device`)."""
    from common.eval.perplexity import perplexity

    placed = False
    if args.distribute:
        device = llm.distribute_model(model)
        placed = True
    ppl = {}
    with timer.phase("perplexity"):
        ppl[args.eval_dataset] = perplexity(model, eval_windows, bsz=args.bsz, device=device,
                                            layerwise=not placed and device.type != "cpu", open_layer=open_layer)
    log.info("perplexity (%s, seqlen %d): %.4f", args.eval_dataset, args.seqlen, ppl[args.eval_dataset])
    tasks = {}
    if args.lm_eval:
        from common.eval.lm_eval_runner import run_lm_eval

        with timer.phase("lm_eval"):
            try:
                tasks = run_lm_eval(model, tokenizer, args.tasks, args.lm_eval_batch_size, device,
                                    limit=args.lm_eval_limit, include_path=args.lm_eval_include_path,
                                    num_fewshot=args.lm_eval_num_fewshot, chat_template=args.lm_eval_chat_template)
            except (ValueError, RuntimeError) as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                raise SystemExit(f"error: lm_eval: {str(e).splitlines()[0]}") from None
        for task, scores in tasks.items():
            log.info("lm-eval %s: %s", task, scores)
    return ppl, tasks


def check_chat_template(args, tokenizer) -> None:
    """--lm_eval_chat_template needs a tokenizer with a chat template: say so before any long work."""
    if args.lm_eval_chat_template:
        try:
            require_chat_template(tokenizer)
        except ValueError as e:
            raise SystemExit(f"error: --lm_eval_chat_template: {e} ({args.load_qmodel_path or args.model})") from None


@contextmanager
def _data_errors():
    """Dataset problems (unknown name, offline hub, text too short) become a one-line error."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: data: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _table_row(result: dict) -> dict:
    q = result["quantization"]
    row = {"model": result["model"], "method": q["method"], "rotate": q["rotate"], "W": q["w_bits"],
           "A": q["a_bits"], "K": q["k_bits"], "V": q["v_bits"]}
    for name, value in result["perplexity"].items():
        row[f"ppl {name}"] = value
    for task, value in result["lm_eval"].items():  # acc_norm, else acc, else exact_match (common.eval.lm_eval_runner)
        row[task] = task_score(value) if isinstance(value, dict) else value
    return row


def _experts_entry(layers: list[dict]) -> dict:
    """results.json's "experts" (MoE models): per layer and expert its routed tokens, proxy losses, fallback."""
    from common.models.moe import expert_summary

    summary = expert_summary(layers)
    return {"experts": summary} if summary else {}


def _output_dir(args) -> str:
    return args.output_dir or os.path.join("outputs", "fake_quant", run_name(args))


@contextmanager
def claim_outputs(args) -> Iterator[None]:
    """Before any long work: every output location of the run (--output_dir, --save_qmodel_path, --export) can be
    written; then, for the block, the lock of the output directory (held by rank 0; every rank stops when another
    run holds it)."""
    for flag, path in (("--output_dir", _output_dir(args)), ("--save_qmodel_path", args.save_qmodel_path),
                       ("--export", args.export)):
        if path is not None:
            check_output_dir(path, flag)
    lock, problem = RunLock(_output_dir(args)), None
    if distributed.is_main():
        try:
            lock.acquire()
        except LockError as e:
            problem = str(e)
    problem = next((p for p in distributed.all_gather_object(problem) if p), None)
    try:
        if problem:
            raise LockError(problem)
        yield
    finally:
        lock.release()


def _locate_forward(model, eval_windows, open_layer):
    """A forward of the first evaluation window's first 128 tokens (for locating non-finite outputs), or None
    when the layers are not in memory (--stream)."""
    if open_layer is not None:
        return None
    ids = eval_windows[:1, :128]
    return lambda: model(input_ids=ids.to(model.get_input_embeddings().weight.device))


def run(args, rotation: Rotation | None = None, extra: dict | None = None) -> dict:
    """The whole run of the parsed command line: quantize (or load with --load_qmodel_path), save / export,
    evaluate, write results.json.  rotation: the rotation to fold (default: QuaRot's from the flags when --rotate);
    extra: more top-level entries of results.json (e.g. SpinQuant's rotation record).  The output directory is
    locked for the run's life; a non-finite metric is recorded in results.json and raised as RunFailed."""
    with ExitStack() as outputs:
        return _run(args, rotation, extra, outputs)


def _run(args, rotation: Rotation | None, extra: dict | None, outputs: ExitStack) -> dict:
    from common.data.text import get_calibration_data, get_eval_data

    timer = PhaseTimer()
    reset_peak_memory()
    seed_everything(args.seed)
    device = torch.device(args.device)
    wcfg, act, kv = settings(args)
    layers: list[dict] = []
    scratch = resume = None  # --stream: the temporary checkpoint evaluated from

    if args.load_qmodel_path:
        src = args.load_qmodel_path
        validate_model_config(args, llm.read_config(src, "--load_qmodel_path"))
        saved = llm.read_quant_spec(src).get("args", {})
        for key in SAVED_FLAGS:  # the quantization the loaded model carries, for the record and the run name
            if key in saved:
                setattr(args, key, saved[key])
        outputs.enter_context(claim_outputs(args))
        llm.check_weight_files(src, "--load_qmodel_path")
        tokenizer = llm.load_tokenizer(src, "--load_qmodel_path")
        check_chat_template(args, tokenizer)
        with timer.phase("data"), _data_errors():
            eval_windows = get_eval_data(args.eval_dataset, tokenizer, args.seqlen)[:args.eval_limit]
        if args.export:
            with timer.phase("export"):
                path = api.export_saved(src, args.export, args.export_format, args.export_dtype)
            log.info("exported the saved model as a %s GPTQ checkpoint (%s) to %s", args.export_format,
                     args.export_dtype, path)
        with timer.phase("load"):
            lm = CausalLM.load_quantized(src, args.dtype, stream=args.stream, device=device)
        args.dtype = lm.dtype
        quant = {"method": lm.spec.get("method"), **{k: getattr(args, k) for k in ("w_bits", "a_bits", "k_bits",
                                                                                      "v_bits", "rotate")}}
        model_name = saved.get("model") or src
    else:
        args.dtype = args.dtype or "float16"
        outputs.enter_context(claim_outputs(args))
        if rotation is None:
            rotation = rotation_of(args)
        if args.save_qmodel_path:
            llm.check_save_target(args.save_qmodel_path)
        validate_model_config(args, llm.read_config(args.model))
        if os.path.isdir(os.path.expanduser(args.model)):
            llm.check_weight_files(args.model)
        tokenizer = llm.load_tokenizer(args.model)
        check_chat_template(args, tokenizer)
        with timer.phase("data"), _data_errors():
            cal = get_calibration_data(args.cal_dataset, tokenizer, args.nsamples, args.seqlen, args.seed) \
                if wcfg.needs_data else []
            eval_windows = get_eval_data(args.eval_dataset, tokenizer, args.seqlen)[:args.eval_limit]
        if args.resume:
            from common.pipeline.resume import ResumeState

            resume = ResumeState(os.path.join(_output_dir(args), "resume"), resume_fingerprint(args, wcfg, act, kv, rotation, cal))
            log.info("--resume: %d layer(s) already done in %s", resume.check(), resume.directory)
        if args.stream:
            scratch = None if args.save_qmodel_path else os.path.join(_output_dir(args), "stream_qmodel")
            if scratch is not None:  # deleted after the evaluation, or when the run stops before
                outputs.callback(shutil.rmtree, scratch, ignore_errors=True)
            target = args.save_qmodel_path or scratch
            with timer.phase("quantize"):
                layers = quantize_streamed(args, wcfg, act, kv, cal, device, tokenizer, target, rotation)
            with timer.phase("load"):
                lm = CausalLM.load_quantized(target, args.dtype, stream=True, device=device)
        else:
            with timer.phase("load"):
                lm = CausalLM(llm.load_model(args.model, args.dtype), tokenizer, args.model)
            with timer.phase("quantize"):
                layers = lm.quantize(cal, wcfg, act, kv, rotation, device=device, bsz=args.bsz,
                                     offload_inputs=args.offload_inputs, export_format=_export_format(args),
                                     keep_grids=bool(args.save_qmodel_path), resume=resume,
                                     extra_spec=_extra_spec(args), cuda_graphs=args.cuda_graphs)
        del cal
        if not distributed.is_main():  # rank 0 saves, evaluates and writes the results
            return {"rank": distributed.rank(), "layers": layers}
        quant = {"method": method_name(args), "w_bits": args.w_bits, "a_bits": args.a_bits, "k_bits": args.k_bits,
                 "v_bits": args.v_bits, "rotate": args.rotate}
        if args.save_qmodel_path and not args.stream:
            with timer.phase("save"):
                lm.save(args.save_qmodel_path)
        if args.save_qmodel_path:
            log.info("saved the fake-quantized model to %s", args.save_qmodel_path)
        if args.export and not args.stream:
            with timer.phase("export"):
                lm.export(args.export, args.export_dtype)
        model_name = args.model

    ppl, tasks = evaluate(lm.model, tokenizer, args, eval_windows, device, timer, lm.open_layer)
    result = {
        "model": model_name, "run": run_name(args), "config": vars(args).copy(), "quantization": quant,
        "seeds": {"seed": args.seed, "rotation_seed": args.rotation_seed},
        "perplexity": ppl, "lm_eval": tasks, "layers": layers, **_experts_entry(layers),
        "time_s": timer.summary(), "peak_memory": peak_memory(), "device": str(device),
        "world_size": distributed.world_size(), **(extra or {}),
    }
    metrics = {**{f"perplexity {k}": v for k, v in ppl.items()},
               **{f"lm_eval {t}": task_score(v) for t, v in tasks.items() if isinstance(v, dict)}}
    try:
        check_metrics(metrics, lm.model, layers, _locate_forward(lm.model, eval_windows, lm.open_layer))
    except NonFiniteError as e:
        result.update(status="failed", error=str(e))
    path = write_results(_output_dir(args), result)
    print(markdown_table([_table_row(result)], digits=3))
    print(f"wrote {path}")
    if "error" in result:
        raise RunFailed(f"error: {result['error']} (recorded in {path})")
    if resume is not None:
        resume.finish()
    return result


def _kept(args) -> str:
    """What an interrupted run leaves to continue from (the one line printed on Ctrl-C)."""
    from common.pipeline.resume import saved_blocks

    if not getattr(args, "resume", False):
        return "nothing was kept (with --resume every finished decoder layer is checkpointed)"
    directory = os.path.join(_output_dir(args), "resume")
    return (f"{saved_blocks(directory)} finished decoder layer(s) are checkpointed in {directory}; run the same "
            "command (with --resume) to continue from there")


def run_cli(args, rotation: Rotation | None = None, extra: dict | None = None) -> dict:
    """`run` as a front end calls it: logging, the torchrun process group (one process without torchrun), the
    library's errors as one line on stderr and Ctrl-C as one line (what was kept) and exit status 130."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from common.io.export import ExportError
    from common.pipeline.resume import ResumeError
    from common.solver import SolverError

    errors = (llm.LLMError, SolverError, ResumeError, ExportError, FileError, LockError)
    try:
        with one_line_errors(errors, lambda: _kept(args)):
            args.device = str(distributed.init(args.device))
            if not distributed.is_main():
                logging.getLogger().setLevel(logging.WARNING)
            return run(args, rotation, extra)
    finally:
        distributed.shutdown()
