"""fake_quant: QuaRot + GPTQ / GPTAQ / RTN with W/A/KV fake quantization of decoder LLMs; perplexity and lm-eval.

Pipeline: (optional) QuaRot rotation (norm fusion, R1/R2 folded, online R3 on q/k and R4 on down_proj) ->
KV-cache and per-token activation quantizers on every decoder linear (lm_head stays 16-bit) -> weights solved layer
by layer (common.driver): GPTQ min ||W X~ - Q X~||^2, GPTAQ min ||Q X~ - W X||^2 with the full-precision stream X
carried alongside -> activation quantizers on -> evaluation.

    python fake_quant/main.py --model meta-llama/Llama-2-7b-hf --rotate --w_bits 4 --a_bits 4 --k_bits 4 \
        --v_bits 4 --w_clip --a_clip_ratio 0.9 --k_clip_ratio 0.95 --v_clip_ratio 0.95 --gptaq
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import llm  # noqa: E402
from common.results import PhaseTimer, markdown_table, peak_memory, reset_peak_memory, write_results  # noqa: E402
from fake_quant.args import method_name, parse_args, run_name, validate_model_config  # noqa: E402

log = logging.getLogger("fake_quant")

SAVED_FLAGS = ("w_bits", "w_groupsize", "w_asym", "w_clip", "w_rtn", "gptaq", "gptaq_exact", "alpha", "order",
               "act_order", "static_groups", "percdamp", "nsamples", "cal_dataset", "a_bits", "a_groupsize", "a_asym",
               "a_clip_ratio", "int8_down_proj", "k_bits", "k_groupsize", "k_asym", "k_clip_ratio", "k_pre_rope",
               "v_bits", "v_groupsize", "v_asym", "v_clip_ratio", "rotate", "rotate_mode", "rotation_seed", "fp32_had")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def settings_from_args(args):
    """(WeightQuantConfig, ActQuantSettings, KVQuantConfig) of the command line."""
    from common.driver import WeightQuantConfig
    from common.kv_quant import KVQuantConfig

    method = method_name(args).removesuffix("_exact")
    wcfg = WeightQuantConfig(method=method, bits=args.w_bits, sym=not args.w_asym, mse=args.w_clip,
                             group_size=args.w_groupsize, act_order=args.act_order, static_groups=args.static_groups,
                             percdamp=args.percdamp, alpha=args.alpha, exact=args.gptaq_exact, order=args.order)
    act = llm.ActQuantSettings(bits=args.a_bits, groupsize=args.a_groupsize, sym=not args.a_asym,
                               clip_ratio=args.a_clip_ratio, down_proj_bits=8 if args.int8_down_proj else None)
    kv = KVQuantConfig(k_bits=args.k_bits, k_groupsize=args.k_groupsize, k_sym=not args.k_asym,
                       k_clip_ratio=args.k_clip_ratio, k_pre_rope=args.k_pre_rope, v_bits=args.v_bits,
                       v_groupsize=args.v_groupsize, v_sym=not args.v_asym, v_clip_ratio=args.v_clip_ratio,
                       rotate_qk=args.rotate, fp32_had=args.fp32_had)
    return wcfg, act, kv


def _batches(samples: list[torch.Tensor], bsz: int) -> list[torch.Tensor]:
    return [torch.cat(samples[i:i + bsz], dim=0) for i in range(0, len(samples), bsz)]


def quantize(model, args, wcfg, act, kv, cal_samples, device: torch.device) -> list[dict]:
    """Rotation, quantizers, then the layer-by-layer weight solve; leaves every quantizer on."""
    from common.act_quant import set_act_quant
    from common.driver import quantize_blocks

    if args.rotate:
        from common.rotation import quarot_rotate

        quarot_rotate(model, mode=args.rotate_mode, seed=args.rotation_seed, fp32_had=args.fp32_had, progress=True)
    llm.install_quantizers(model, act, kv)
    layers: list[dict] = []
    if wcfg.active:
        inputs = llm.LayerInputs()
        if wcfg.needs_data:
            inputs = llm.capture_layer_inputs(model, _batches(cal_samples, args.bsz), device)
        layers = quantize_blocks(llm.decoder_layers(model), inputs.inputs, inputs.run_layer, llm.sublayer_groups,
                                 wcfg, prepare_block=llm.make_prepare_layer(act), device=device,
                                 offload_inputs=args.offload_inputs, desc="layer")
        del inputs
    set_act_quant(model, True)
    return layers


def evaluate(model, tokenizer, args, eval_windows, device: torch.device, timer: PhaseTimer) -> tuple[dict, dict]:
    """Perplexity (layer by layer on a GPU `device`; whole model with --distribute or on CPU) and lm-eval
    (common.lm_eval_runner moves the model to `device` for the run)."""
    from common.perplexity import perplexity

    placed = False
    if args.distribute:
        device = llm.distribute_model(model)
        placed = True
    ppl = {}
    with timer.phase("perplexity"):
        ppl[args.eval_dataset] = perplexity(model, eval_windows, bsz=args.bsz, device=device,
                                            layerwise=not placed and device.type != "cpu")
    log.info("perplexity (%s, seqlen %d): %.4f", args.eval_dataset, args.seqlen, ppl[args.eval_dataset])
    tasks = {}
    if args.lm_eval:
        from common.lm_eval_runner import run_lm_eval

        with timer.phase("lm_eval"):
            try:
                tasks = run_lm_eval(model, tokenizer, args.tasks, args.lm_eval_batch_size, device,
                                    limit=args.lm_eval_limit, include_path=args.lm_eval_include_path)
            except (ValueError, RuntimeError) as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                raise SystemExit(f"error: lm_eval: {str(e).splitlines()[0]}") from None
        for task, scores in tasks.items():
            log.info("lm-eval %s: %s", task, scores)
    return ppl, tasks


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
    for task, value in result["lm_eval"].items():  # acc_norm where the task reports it (QuaRot convention)
        row[task] = value.get("acc_norm", next(iter(value.values()), None)) if isinstance(value, dict) else value
    return row


def run(args) -> dict:
    from common.data import get_calibration_data, get_eval_data

    timer = PhaseTimer()
    reset_peak_memory()
    seed_everything(args.seed)
    device = torch.device(args.device)
    wcfg, act, kv = settings_from_args(args)
    layers: list[dict] = []

    if args.load_qmodel_path:
        src = args.load_qmodel_path
        validate_model_config(args, llm.read_config(src, "--load_qmodel_path"))
        spec = llm.read_quant_spec(src)
        saved = spec.get("args", {})
        for key in SAVED_FLAGS:  # the quantization the loaded model carries, for the record and the run name
            if key in saved:
                setattr(args, key, saved[key])
        tokenizer = llm.load_tokenizer(src)
        with timer.phase("data"), _data_errors():
            eval_windows = get_eval_data(args.eval_dataset, tokenizer, args.seqlen)
        with timer.phase("load"):
            model, spec = llm.load_quantized(src, args.dtype)
        args.dtype = str(model.dtype).removeprefix("torch.")
        quant = {"method": spec.get("method"), **{k: getattr(args, k) for k in ("w_bits", "a_bits", "k_bits",
                                                                                   "v_bits", "rotate")}}
        model_name = saved.get("model") or src
    else:
        args.dtype = args.dtype or "float16"
        if args.save_qmodel_path:
            llm.check_save_target(args.save_qmodel_path)
        validate_model_config(args, llm.read_config(args.model))
        tokenizer = llm.load_tokenizer(args.model)
        with timer.phase("data"), _data_errors():
            cal = get_calibration_data(args.cal_dataset, tokenizer, args.nsamples, args.seqlen, args.seed) \
                if wcfg.needs_data else []
            eval_windows = get_eval_data(args.eval_dataset, tokenizer, args.seqlen)
        with timer.phase("load"):
            model = llm.load_model(args.model, args.dtype)
        with timer.phase("quantize"):
            layers = quantize(model, args, wcfg, act, kv, cal, device)
        del cal
        quant = {"method": method_name(args), "w_bits": args.w_bits, "a_bits": args.a_bits, "k_bits": args.k_bits,
                 "v_bits": args.v_bits, "rotate": args.rotate}
        if args.save_qmodel_path:
            with timer.phase("save"):
                spec = {"method": method_name(args), "dtype": args.dtype, "source_model": args.model,
                        "act_quant": act.to_dict(), "kv_quant": vars(kv).copy(), "weight_quant": vars(wcfg).copy(),
                        "args": vars(args).copy()}
                llm.save_quantized(model, tokenizer, args.save_qmodel_path, spec)
            log.info("saved the fake-quantized model to %s", args.save_qmodel_path)
        model_name = args.model

    ppl, tasks = evaluate(model, tokenizer, args, eval_windows, device, timer)
    result = {
        "model": model_name, "run": run_name(args), "config": vars(args).copy(), "quantization": quant,
        "seeds": {"seed": args.seed, "rotation_seed": args.rotation_seed},
        "perplexity": ppl, "lm_eval": tasks, "layers": layers,
        "time_s": timer.summary(), "peak_memory": peak_memory(), "device": str(device),
    }
    out_dir = args.output_dir or os.path.join("outputs", "fake_quant", run_name(args))
    path = write_results(out_dir, result)
    print(markdown_table([_table_row(result)], digits=3))
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from common.solvers import SolverError

    errors = (llm.LLMError, SolverError)
    try:
        return run(args)
    except errors as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    t0 = time.time()
    main()
    log.info("done in %.1f s", time.time() - t0)
