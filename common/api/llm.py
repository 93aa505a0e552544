"""The model-level Python API for decoder LLMs: load or take a model, calibrate, quantize, evaluate, save, export.

`CausalLM` holds a transformers causal LM and its tokenizer; `quantize` runs the pipeline of fake_quant/main.py
(which is a thin command line over this class): optional rotation (QuaRot's `Rotation.quarot`, or any `Rotation`),
KV-cache and per-token activation quantizers, then the layer-by-layer weight solve (GPTQ min ||W X~ - Q X~||^2,
GPTAQ min ||Q X~ - W X||^2), all configured by the library's own objects: `SolverConfig`, `ActQuantSettings`,
`KVQuantConfig`, `Rotation`.  `quantize_streamed` / `export_saved` are the any-size paths (one decoder layer in
host memory; common.pipeline.streaming).

    from common.api import CausalLM, SolverConfig, ActQuantSettings, Rotation
    lm = CausalLM.load("assets/smollm2-135m", dtype="float32")
    cal = lm.calibration("assets/pydoc/cal.txt", nsamples=16, seqlen=256)
    lm.quantize(cal, SolverConfig(method="gptaq", bits=4, mse=True), rotation=Rotation.quarot(lm.config))
    print(lm.perplexity("assets/pydoc/eval.txt", seqlen=256, limit=32))
    lm.save("out/w4_gptaq")
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from typing import Callable, Sequence

import torch
from torch import nn

from common.models import llm
from common.models.kv_quant import KVQuantConfig
from common.models.moe import DEFAULT_MIN_TOKENS, set_min_tokens
from common.models.rotation import Rotation
from common.quant.act_quant import ActQuantSettings
from common.solver import SolverConfig

__all__ = ["CausalLM", "seed_everything", "quant_spec", "quantize_model", "quantize_streamed", "export_saved",
           "calibration_batches"]

log = logging.getLogger("gptaq.api")

CalibrationData = str | Sequence[str] | Sequence[dict] | torch.Tensor | Sequence[torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def calibration_batches(samples: Sequence[torch.Tensor], bsz: int) -> list[torch.Tensor]:
    """Token-id samples [1, seqlen] stacked into batches [bsz, seqlen] (the last may be smaller)."""
    return [torch.cat(list(samples[i:i + bsz]), dim=0) for i in range(0, len(samples), bsz)]


def quant_spec(solver: SolverConfig, act: ActQuantSettings, kv: KVQuantConfig, dtype: str, source: str | None,
               extra: dict | None = None) -> dict:
    """What a saved quantized model records about its quantization (gptaq_quant.json, next to the rotation)."""
    return {"method": solver.label, "dtype": dtype, "source_model": source, "act_quant": act.to_dict(),
            "kv_quant": dataclasses.asdict(kv), "weight_quant": solver.to_dict(), **(extra or {})}


def _check_plain(solver: SolverConfig, act: ActQuantSettings, kv: KVQuantConfig, export_format: str | None) -> None:
    """An exportable run is weight-only: say so before any work."""
    if export_format is None:
        return
    from common.io.export import CHECKPOINT_FORMATS, EXPORT_BITS, ExportError

    if export_format not in CHECKPOINT_FORMATS:
        raise ExportError(f"export_format must be one of {CHECKPOINT_FORMATS}, got {export_format!r}")
    if solver.bits not in EXPORT_BITS or not solver.active:
        raise ExportError(f"export needs weights quantized to {EXPORT_BITS} bits, got {solver.bits}")
    if act.bits < 16 or act.down_proj_bits is not None or kv.k_bits < 16 or kv.v_bits < 16 or kv.rotate_qk:
        raise ExportError("export writes weight-only checkpoints: activation / KV-cache quantization and the "
                          "online R3 cannot be stored in one")


def quantize_model(model: nn.Module, calibration: Sequence[torch.Tensor], solver: SolverConfig,
                   act: ActQuantSettings, kv: KVQuantConfig, rotation: Rotation | None = None, *,
                   device: torch.device | str = "cpu", bsz: int = 1, offload_inputs: bool = False,
                   export_format: str | None = None, on_quantized: Callable | None = None, resume=None,
                   progress: bool = True, moe_min_tokens: int = DEFAULT_MIN_TOKENS,
                   cuda_graphs: bool = False) -> list[dict]:
    """The in-memory pipeline on `model`: rotation (no online R4 when `export_format` is given: a plain model),
    quantizers, then the layer-by-layer weight solve on `calibration` samples [1, seqlen] in batches of `bsz`
    (this rank's share under torchrun; checkpointed into `resume`, a common.pipeline.resume.ResumeState; each
    solved linear passed to `on_quantized`); leaves every quantizer on.  MoE experts routed fewer than
    `moe_min_tokens` calibration tokens are rounded to nearest.  cuda_graphs: see
    `common.pipeline.driver.quantize_blocks`.  Returns the per-linear records."""
    from common.pipeline import distributed, prewarm
    from common.pipeline.driver import quantize_blocks
    from common.quant.act_quant import set_act_quant

    set_min_tokens(model, moe_min_tokens)
    dtype = next(model.parameters()).dtype
    warm = prewarm.start(device, dtype, solver, llm.act_quant_widths(model.config, act, kv))
    if rotation is not None:
        rotation.apply(model, online_r4=export_format is None, progress=progress, device=device)
    llm.install_quantizers(model, act, kv)
    layers: list[dict] = []
    if solver.active:
        inputs = llm.LayerInputs()
        if solver.needs_data:
            if not calibration:
                raise ValueError(f"{solver.method} needs calibration data, got none")
            inputs = llm.capture_layer_inputs(model, distributed.shard(calibration_batches(calibration, bsz)),
                                              torch.device(device))
        warm.wait()  # the kernels compiled while the model was rotated and its first layer's inputs captured
        layers = quantize_blocks(llm.decoder_layers(model), inputs.inputs, inputs.run_layer, llm.sublayer_groups,
                                 solver, prepare_block=llm.make_prepare_layer(act), device=device,
                                 offload_inputs=offload_inputs, desc="layer", resume=resume,
                                 on_quantized=on_quantized, stages=inputs.stages, cuda_graphs=cuda_graphs)
        del inputs
    set_act_quant(model, True)
    return layers


def quantize_streamed(model_dir: str, out_dir: str, calibration: Sequence[torch.Tensor], solver: SolverConfig,
                      act: ActQuantSettings = ActQuantSettings(), kv: KVQuantConfig = KVQuantConfig(),
                      rotation: Rotation | None = None, *, dtype: str = "float16",
                      device: torch.device | str = "cpu", bsz: int = 1, offload_inputs: bool = False,
                      tokenizer=None, extra_spec: dict | None = None, block_times: list[dict] | None = None,
                      setup_times: dict | None = None, export_dir: str | None = None, export_format: str = "gptq",
                      export_dtype: str = "float16", cuda_graphs: bool = False) -> list[dict]:
    """`CausalLM.quantize` + `save` for a safetensors checkpoint of any size: one decoder layer in host memory at
    a time, written to `out_dir` as it is solved (and, with `export_dir`, packed into a GPTQ checkpoint there);
    common.pipeline.streaming.quantize_checkpoint (block_times, setup_times: its phase timings).  Returns the
    per-linear records."""
    from common.pipeline import streaming

    _check_plain(solver, act, kv, export_format if export_dir else None)
    batches = calibration_batches(calibration, bsz) if solver.needs_data else []
    return streaming.quantize_checkpoint(
        model_dir, out_dir, dtype=dtype, wcfg=solver, act=act, kv=kv, calibration=batches, device=device,
        rotation=rotation, offload_inputs=offload_inputs, tokenizer=tokenizer,
        spec=quant_spec(solver, act, kv, dtype, model_dir, extra_spec), block_times=block_times,
        setup_times=setup_times, export_dir=export_dir, export_format=export_format, export_dtype=export_dtype,
        cuda_graphs=cuda_graphs)


def export_saved(path: str, out_dir: str, format: str = "gptq", dtype: str = "float16") -> str:
    """Export a weight-only model saved by `CausalLM.save` / `quantize_streamed` as a GPTQ checkpoint, one layer
    at a time, without quantizing again (common.pipeline.streaming.export_saved)."""
    from common.pipeline import streaming

    return streaming.export_saved(path, out_dir, checkpoint_format=format, dtype=dtype)


class CausalLM:
    """A decoder LLM (Llama, Qwen2/2.5, Qwen3, Mistral) and its tokenizer, quantized in place.

    After `quantize`: `layers` (per-linear records with proxy losses), `spec` (the quantization record `save`
    writes) and `grids` (each linear's grid, what `save` keeps and `export` packs)."""

    def __init__(self, model: nn.Module, tokenizer=None, source: str | None = None,
                 open_layer: Callable | None = None, spec: dict | None = None):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.open_layer = open_layer  # streamed models (load_quantized(stream=True)): reads layer i from disk
        self.spec = spec
        self.layers: list[dict] = []
        self.grids: dict[str, dict[str, torch.Tensor]] = {}
        self.solver: SolverConfig | None = None
        self.export_format: str | None = None

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, name_or_path: str, dtype: str | torch.dtype = "float16") -> "CausalLM":
        """A local model directory or hub id, on CPU in `dtype`, with its tokenizer."""
        return cls(llm.load_model(name_or_path, dtype), llm.load_tokenizer(name_or_path), name_or_path)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer=None) -> "CausalLM":
        """Take a transformers causal LM already in memory (checked to be a supported family; KV cache off)."""
        llm.check_config(model.config)
        model.config.use_cache = False
        return cls(model.eval(), tokenizer, getattr(model.config, "_name_or_path", None) or None)

    @classmethod
    def load_quantized(cls, path: str, dtype: str | None = None, *, stream: bool = False,
                       device: torch.device | str = "cpu") -> "CausalLM":
        """A model written by `save` (or `quantize_streamed`), quantizers rebuilt; stream: only the embedding,
        norm and lm_head are loaded, decoder layers are read one at a time by `perplexity`."""
        open_layer = None
        if stream:
            from common.pipeline import streaming

            model, open_layer, spec = streaming.open_quantized(path, device, dtype)
        else:
            model, spec = llm.load_quantized(path, dtype)
        lm = cls(model, llm.load_tokenizer(path), spec.get("source_model") or path, open_layer, spec)
        return lm

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    # ------------------------------------------------------------------------------------------ data

    def calibration(self, data: CalibrationData, nsamples: int = 128, seqlen: int = 2048,
                    seed: int = 0) -> list[torch.Tensor]:
        """Calibration samples [1, seqlen]: from a dataset name or local file (common.data.text, chat .jsonl
        included), a list of texts, a list of chat rows ({"messages": [...]} or {"prompt", "response"}), token
        ids [n, seqlen] or a list of [1, seqlen] tensors (taken as they are)."""
        from common.data import text

        if isinstance(data, torch.Tensor):
            return [row.unsqueeze(0).long() for row in (data if data.dim() == 2 else data.unsqueeze(0))]
        if isinstance(data, str):
            return text.get_calibration_data(data, self.tokenizer, nsamples, seqlen, seed)
        if data and isinstance(data[0], torch.Tensor):
            return [t.reshape(1, -1).long() for t in data]
        return text.calibration_windows(text.documents_from_rows(data, "calibration"), self.tokenizer, nsamples,
                                        seqlen, seed)

    def eval_windows(self, data: str | Sequence[str] | Sequence[dict] | torch.Tensor, seqlen: int = 2048,
                     limit: int | None = None) -> torch.Tensor:
        """Perplexity windows [n, seqlen] of a dataset name / file, texts or chat rows (or token ids as given)."""
        from common.data import text

        if isinstance(data, torch.Tensor):
            windows = data.long()
        elif isinstance(data, str):
            windows = text.get_eval_data(data, self.tokenizer, seqlen)
        else:
            windows = text.evaluation_windows(text.documents_from_rows(data, "evaluation"), self.tokenizer, seqlen)
        return windows[:limit]

    # ------------------------------------------------------------------------------------------ quantization

    def quantize(self, calibration: Sequence[torch.Tensor], solver: SolverConfig,
                 act: ActQuantSettings = ActQuantSettings(), kv: KVQuantConfig = KVQuantConfig(),
                 rotation: Rotation | None = None, *, device: torch.device | str = "cpu", bsz: int = 1,
                 offload_inputs: bool = False, export_format: str | None = None, keep_grids: bool = True,
                 resume=None, extra_spec: dict | None = None, cuda_graphs: bool = False) -> list[dict]:
        """Quantize in place with `solver` (weights), `act` (per-token activation quantizers), `kv` (KV cache) and
        `rotation` on `calibration` samples (see `calibration`).  export_format "gptq" / "gptq_v2": keep the model
        exportable (weight-only, rotation without online R4) and check every linear against that format as it is
        solved; keep_grids: keep each linear's grid for `save` / `export` (bits/8 bytes per weight).
        resume: a common.pipeline.resume.ResumeState.  cuda_graphs: each layer's per-batch passes replayed from
        CUDA graphs (`common.pipeline.driver.quantize_blocks`; same results).  Returns the per-linear records
        (also in `layers`)."""
        from common.io.export import GPTQCollector
        from common.pipeline.streaming import keeps_grids

        _check_plain(solver, act, kv, export_format)
        collector = None
        if export_format is not None or (keep_grids and keeps_grids(solver, self.config)):
            collector = GPTQCollector(self.model, llm.decoder_layers(self.model), export_format)
        self.layers = quantize_model(self.model, calibration, solver, act, kv, rotation, device=device, bsz=bsz,
                                     offload_inputs=offload_inputs, export_format=export_format,
                                     on_quantized=collector, resume=resume, cuda_graphs=cuda_graphs)
        self.grids = collector.grids if collector is not None else {}
        self.solver, self.export_format = solver, export_format
        self.spec = quant_spec(solver, act, kv, self.dtype, self.source, extra_spec)
        return self.layers

    # ------------------------------------------------------------------------------------------ evaluation

    def perplexity(self, data, seqlen: int = 2048, limit: int | None = None, bsz: int = 1,
                   device: torch.device | str = "cpu", layerwise: bool | None = None) -> float:
        """Perplexity on `data` (see `eval_windows`), layer by layer on a GPU `device` (or, for a streamed model,
        read from disk layer by layer); the whole model at once on CPU."""
        from common.eval.perplexity import perplexity

        windows = self.eval_windows(data, seqlen, limit)
        device = torch.device(device)
        if layerwise is None:
            layerwise = device.type != "cpu"
        return perplexity(self.model, windows, bsz=bsz, device=device, layerwise=layerwise,
                          open_layer=self.open_layer)

    # ------------------------------------------------------------------------------------------ outputs

    def save(self, path: str) -> str:
        """The fake-quantized model (weights, config, tokenizer, gptaq_quant.json, the grids): reload it with
        `load_quantized`, export it later with `export_saved`."""
        if self.spec is None:
            raise ValueError("save: nothing quantized yet (call quantize first)")
        llm.save_quantized(self.model, self.tokenizer, path, self.spec, self.grids)
        log.info("saved the fake-quantized model to %s", path)
        return path

    def export(self, path: str, dtype: str = "float16") -> str:
        """The weight-only model as a GPTQ checkpoint in `export_format` (common.io.export; quantize with
        export_format set).  Scales and non-quantized tensors in `dtype` (float16 / bfloat16); bit-exact with the
        fake-quant weights when the solver rounded its scales to the same dtype (SolverConfig.scale_dtype)."""
        from common.io.export import ExportError, export_gptq

        if self.export_format is None or self.solver is None:
            raise ExportError("export: quantize with export_format='gptq' or 'gptq_v2' first (a plain model)")
        if self.solver.scale_dtype != dtype:
            log.warning("export: scales rounded to %s now (the solve used %s): the checkpoint is within a "
                        "rounding of the fake-quant weights, not bit-exact", dtype, self.solver.scale_dtype)
        out = export_gptq(self.model, self.grids, path, self.solver, checkpoint_format=self.export_format,
                          tokenizer=self.tokenizer, dtype=dtype)
        log.info("exported the %d-bit GPTQ checkpoint (%s format, %s) to %s", self.solver.bits, self.export_format,
                 dtype, out)
        return str(out)
