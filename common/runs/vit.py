"""The ViT pipeline behind vit_quant/main.py: GPTQ / GPTAQ / RTN on timm vision transformers, top-1/top-5.

Per block l (common.pipeline.driver): the linears get per-token activation quantizers, and each group of linears is solved
with H = (2/N) X~ X~^T (GPTQ: min ||W X~ - Q X~||) or additionally dXXT = (2/N)(X - X~) X~^T (GPTAQ:
min ||Q X~ - W X||); the stem, final norm and classifier head stay in full precision.

    python vit_quant/main.py --model deit_small_patch16_224 --w_bits 4 --a_bits 4 --w_asym --a_asym --w_clip \
        --act_order --percdamp 0.1 --nsamples 128 --gptaq --data_path /data/imagenet
"""
from __future__ import annotations

import os
from contextlib import ExitStack

import torch
from torch import nn
from tqdm import tqdm

from common.cli.exits import RunFailed, one_line_errors
from common.cli.vit import method_name, settings
from common.data.imagefolder import DataError, calibration_images, check_imagefolder, eval_loader, model_transform
from common.eval.finite import NonFiniteError, check_metrics
from common.io.lock import LockError, RunLock
from common.io.results import PhaseTimer, markdown_table, reset_peak_memory, write_results
from common.models import vit
from common.models.files import FileError, check_output_dir
from common.pipeline.driver import quantize_blocks
from common.quant.act_quant import set_act_quant
from common.solver import ConfigError, SolverError

__all__ = ["run", "run_cli", "evaluate", "quantize", "load"]


def run_name(args) -> str:
    wa = f"w{args.w_bits}a{args.a_bits}"
    return f"{args.model}_{wa}_{method_name(args)}" if args.w_bits < 16 else f"{args.model}_{wa}"


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of `model` over `loader` (NaN when any image's logits are not finite: an
    accuracy over NaN logits would be a number that means nothing)."""
    correct1 = correct5 = total = bad = 0
    for images, labels in tqdm(loader, desc="eval", unit="batch"):
        logits = model(images.to(device, non_blocking=True)).float()
        labels = labels.to(device)
        bad += int((~torch.isfinite(logits).all(dim=-1)).sum())
        topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (topk[:, 0] == labels).sum().item()
        correct5 += (topk == labels[:, None]).any(dim=-1).sum().item()
        total += labels.numel()
    if bad:
        return {"top1": float("nan"), "top5": float("nan"), "n_val": total, "n_non_finite": bad}
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "n_val": total}


def quantize(model: nn.Module, args, transform, device: torch.device) -> list[dict]:
    """Wrap every block linear with its activation quantizer, solve the weights block by block (w_bits < 16) and
    switch the activation quantizers on; returns the driver's per-linear records (none when w_bits = 16)."""
    prepare_block = vit.make_prepare_block(args.a_bits, sym=not args.a_asym, clip_ratio=args.a_clip_ratio,
                                           groupsize=args.a_groupsize)
    cfg = settings(args)
    inputs, rope = [], None
    if cfg.needs_data:  # RTN runs no block forward and needs no calibration data
        for images in calibration_images(args.data_path, transform, args.nsamples, args.seed, args.bsz):
            x, rope = vit.embed(model, images.to(device))
            inputs.append(x)
    layers = quantize_blocks(list(model.blocks), inputs, vit.make_run_block(model, rope), vit.sublayer_groups, cfg,
                             prepare_block=prepare_block, device=device, desc="blocks",
                             cuda_graphs=args.cuda_graphs)
    set_act_quant(model, True)
    return layers


def load(args) -> tuple[nn.Module, object, torch.device]:
    """Check the data folder, then build the model (weights loaded, on its device) and its eval transform."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_imagefolder(args.data_path)
    model = vit.create_model(args.model, args.checkpoint, args.model_kwargs)
    vit.prepare_model(model)
    for block in model.blocks:  # fail on an unsupported block type or group size before any long work
        for group in vit.sublayer_groups(block):
            for name in group:
                cols = block.get_submodule(name).in_features
                if args.a_groupsize > 0 and cols % args.a_groupsize:  # weight groups need not divide
                    raise vit.VitModelError(f"--a_groupsize {args.a_groupsize} does not divide the {cols} input "
                                            f"features of blocks.*.{name}")
    return model.to(device), model_transform(model), device


def _output_dir(args) -> str:
    return args.output_dir or os.path.join("outputs", "vit_quant", run_name(args))


def run(args) -> dict:
    """Load, quantize, evaluate and write results.json; the output directory is checked first and locked for the
    run's life; a non-finite accuracy is recorded in results.json and raised as RunFailed."""
    torch.manual_seed(args.seed)
    timer = PhaseTimer()
    out = _output_dir(args)
    check_output_dir(out, "--output_dir")
    with ExitStack() as outputs:
        outputs.enter_context(RunLock(out))
        with timer.phase("load"):
            model, transform, device = load(args)
        reset_peak_memory()  # after the model is on its device: resetting an uninitialised CUDA context fails
        with timer.phase("quantize"):
            layers = quantize(model, args, transform, device)
        with timer.phase("eval"):
            loader = eval_loader(args.data_path, transform, args.bsz, args.val_limit, args.seed, args.workers,
                                 pin_memory=device.type == "cuda")
            metrics = evaluate(model, loader, device)
        row = {"model": args.model, "method": method_name(args), "w_bits": args.w_bits, "a_bits": args.a_bits,
               **metrics}
        record = {**row, "seconds": timer.summary(), "args": vars(args), "solver": settings(args).to_dict(),
                  "layers": layers}
        try:
            check_metrics({k: metrics[k] for k in ("top1", "top5")}, model, layers,
                          lambda: model(next(iter(loader))[0][:1].to(device)))
        except NonFiniteError as e:
            record.update(status="failed", error=str(e))
        path = write_results(out, record)
    print(markdown_table([row]))
    print(f"wrote {path}")
    if "error" in record:
        raise RunFailed(f"error: {record['error']} (recorded in {path})")
    return {**row, "results_path": str(path)}


def run_cli(args) -> dict:
    """`run` with the library's errors as one line on stderr and Ctrl-C as one line and exit status 130."""
    errors = (vit.VitModelError, DataError, SolverError, ConfigError, FileError, LockError)
    with one_line_errors(errors, lambda: "nothing was kept (results.json is written at the end of a run)"):
        return run(args)
