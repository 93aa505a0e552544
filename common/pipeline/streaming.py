"""Layer streaming: quantize and evaluate safetensors checkpoints that do not fit in host memory.

The model skeleton is built on the meta device; the parts outside the decoder layers (embedding, final norm,
lm_head) are loaded once, and decoder layer l is read from its safetensors shard only when its turn comes, moved to
the device, rotated (R1, R2 are fixed up front: W R1 on q/k/v/gate/up, R1^T W on o/down, R2 per value head,
W_down H^T), quantized by
`common.pipeline.driver.quantize_blocks`, written as its own shard of the output checkpoint and sent back to the meta device.
Host memory then holds about one decoder layer (two for GPTAQ, which keeps a full-precision copy) plus the
embedding, lm_head and the calibration streams, instead of the whole model.  Perplexity streams the same way from
the written checkpoint (`open_quantized` + `common.eval.perplexity.perplexity(open_layer=...)`).
The output is a plain sharded transformers checkpoint plus `gptaq_quant.json`, so `--load_qmodel_path` reads it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from common.models import checkpoint, llm
from common.models.files import FileError, ordinary_permissions
from common.models.rotation import Rotation
from common.quant.act_quant import ActQuantLinear

__all__ = ["SafetensorsCheckpoint", "CheckpointWriter", "build_skeleton", "checkpoint_names",
           "load_module", "release_module", "LayerStream", "quantize_checkpoint", "open_quantized"]

SINGLE_FILE, INDEX_FILE = checkpoint.SINGLE_FILE, checkpoint.INDEX_FILE
LAYERS_PREFIX = "model.layers."


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory: one `model.safetensors`, or shards listed by
    `model.safetensors.index.json`.  `read` opens only the shards it needs and closes (unmaps) them again, so no
    more than the requested tensors stay resident."""

    def __init__(self, directory: str, flag: str = "--model"):
        self.directory = os.path.expanduser(directory)
        if not os.path.isdir(self.directory):
            raise llm.LLMError(f"{flag}: streaming needs a local model directory, {directory} is none")
        if not any(os.path.isfile(os.path.join(self.directory, f)) for f in (INDEX_FILE, SINGLE_FILE)):
            raise llm.LLMError(f"{flag}: {directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; streaming reads "
                               "safetensors checkpoints only")
        self.files: dict[str, str] = {}  # tensor name -> shard file name
        self.shapes: dict[str, tuple[int, ...]] = {}
        try:
            for path in checkpoint.weight_files(self.directory, flag):
                for name, entry in checkpoint.safetensors_header(path).items():
                    self.files[name], self.shapes[name] = path.name, tuple(entry["shape"])
        except FileError as e:
            raise llm.as_llm_error(e, flag) from None
        self.flag = flag

    def check_fits(self, model: nn.Module) -> None:
        """LLMError unless the checkpoint holds exactly the tensors (names and shapes) of the skeleton `model`
        (an lm_head tied to the embedding may be absent)."""
        params = dict(model.named_parameters())
        expected = {k: tuple(params[n].shape) for n, k in checkpoint_names(model).items()}
        head = model.get_output_embeddings()
        head_key = next(n for n, m in model.named_modules() if m is head) + ".weight"
        expected.setdefault(head_key, tuple(head.weight.shape))  # a tied lm_head is named once, as the embedding
        tied = {head_key} if getattr(model.config, "tie_word_embeddings", False) else set()
        try:
            checkpoint.check_tensors(expected, self.shapes, f"{self.flag}: the checkpoint in {self.directory}",
                                     optional=tied)
        except FileError as e:
            raise llm.LLMError(str(e)) from None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{name: tensor} on the CPU, floating tensors cast to `dtype`."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise llm.LLMError(f"{self.directory}: the checkpoint has no tensor {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with _open_shard(os.path.join(self.directory, file)) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        return out


def _open_shard(path: str):
    """safe_open reading tensor bytes with pread(2) into private memory where this safetensors has that backend
    (the default memory map would keep the touched file pages of the shard in the process's resident set)."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.8: no backend argument
        return safe_open(path, framework="pt", device="cpu")


class CheckpointWriter:
    """A sharded safetensors checkpoint written shard by shard into a hidden sibling of `path`; `finish` adds the
    index, config, tokenizer and quantization record and renames it into place, `abort` deletes it."""

    def __init__(self, path: str, nshards: int):
        self.path = os.path.abspath(os.path.expanduser(path))
        llm.check_save_target(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", dir=os.path.dirname(self.path))
        self.nshards, self.weight_map, self.total_size = nshards, {}, 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        k = len(set(self.weight_map.values())) + 1
        if k > self.nshards:
            raise RuntimeError(f"CheckpointWriter: more than the {self.nshards} announced shards")
        name = f"model-{k:05d}-of-{self.nshards:05d}.safetensors"
        tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        save_file(tensors, os.path.join(self.tmp, name), metadata={"format": "pt"})
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total_size += t.numel() * t.element_size()

    def finish(self, config, tokenizer=None, spec: dict | None = None) -> str:
        """Publish the checkpoint (spec None: a plain checkpoint without gptaq_quant.json); returns its path."""
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        config.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        if spec is not None:
            llm.write_quant_file(self.tmp, config, spec)
        ordinary_permissions(self.tmp)
        llm.publish_directory(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device (buffers such as the rotary inverse
    frequencies are real), eval mode, no KV cache."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    llm.check_config(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model.eval()


def checkpoint_names(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """{parameter name in `module`: its name in a plain checkpoint}: `prefix` prepended and the ActQuantLinear
    level (".linear") dropped, so wrapped and unwrapped modules map to the same checkpoint keys."""
    wrappers = {n for n, m in module.named_modules() if isinstance(m, ActQuantLinear)}
    out = {}
    for name, _ in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith("linear") and owner.removesuffix("linear").removesuffix(".") in wrappers:
            owner = owner.removesuffix("linear").removesuffix(".")
        out[name] = prefix + (f"{owner}.{leaf}" if owner else leaf)
    return out


def load_module(module: nn.Module, prefix: str, ckpt: SafetensorsCheckpoint, dtype: torch.dtype) -> None:
    """Give every parameter of `module` (e.g. on the meta device) its tensor from `ckpt` (CPU, `dtype`)."""
    names = checkpoint_names(module, prefix)
    tensors = ckpt.read(list(names.values()), dtype)
    module.load_state_dict({n: tensors[k] for n, k in names.items()}, strict=False, assign=True)


def release_module(module: nn.Module) -> None:
    """Free the module's tensors (back to the meta device) and hand the freed heap back to the OS."""
    module.to("meta")
    _trim_heap()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None


def _trim_heap() -> None:
    """glibc malloc_trim(0): tensors below the mmap threshold (32 MiB at most) are freed into the heap, which the
    mixed sizes of successive layers fragment so that the process grows by a few MiB per layer; trimming after
    each layer keeps it flat.  No-op where malloc_trim does not exist."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _load_outer(model: nn.Module, ckpt: SafetensorsCheckpoint, dtype: torch.dtype) -> None:
    """Embedding, final norm and lm_head (tied to the embedding when the checkpoint has no lm_head)."""
    head = model.get_output_embeddings()
    head_key = next(n for n, m in model.named_modules() if m is head) + ".weight"
    tie = head_key not in ckpt and getattr(model.config, "tie_word_embeddings", False)
    names = {n: k for n, k in checkpoint_names(model).items() if not k.startswith(LAYERS_PREFIX)
             and not (tie and k == head_key)}
    tensors = ckpt.read(list(names.values()), dtype)
    model.load_state_dict({n: tensors[k] for n, k in names.items()}, strict=False, assign=True)
    if tie:
        head.weight = model.get_input_embeddings().weight


def _outer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors outside the decoder layers (lm_head left out while it is tied to the embedding)."""
    params = dict(model.named_parameters())  # shared parameters appear once, under their first name
    return {k: params[n] for n, k in checkpoint_names(model).items() if not k.startswith(LAYERS_PREFIX)}


class LayerStream:
    """The decoder layers of a skeleton model, one at a time: iterating yields layer i read from `ckpt` (CPU) and
    passed through `prepare(i, layer)`; when the consumer asks for layer i + 1, `finish(i, layer)` runs and layer i
    is released.  For a consumer that is done with a layer when it asks for the next (`quantize_blocks`)."""

    def __init__(self, model: nn.Module, ckpt: SafetensorsCheckpoint, dtype: torch.dtype,
                 prepare: Callable[[int, nn.Module], None], finish: Callable[[int, nn.Module], None]):
        self.layers, self.ckpt, self.dtype = llm.decoder_layers(model), ckpt, dtype
        self.prepare, self.finish = prepare, finish

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[nn.Module]:
        for i, layer in enumerate(self.layers):
            load_module(layer, f"{LAYERS_PREFIX}{i}.", self.ckpt, self.dtype)
            self.prepare(i, layer)
            yield layer
            self.finish(i, layer)
            release_module(layer)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return llm.DTYPES[dtype] if isinstance(dtype, str) else dtype


def quantize_checkpoint(model_dir: str, out_dir: str, *, dtype: str | torch.dtype, wcfg, act: llm.ActQuantSettings,
                        kv, calibration: list[torch.Tensor], device: torch.device | str,
                        rotation: Rotation | None = None, offload_inputs: bool = False, tokenizer=None,
                        spec: dict | None = None, block_times: list[dict] | None = None) -> list[dict]:
    """fake_quant's pipeline (rotation, KV / activation quantizers, layer-by-layer weight solve) on the safetensors
    checkpoint in `model_dir`, one decoder layer in host memory at a time; the quantized model is written to
    `out_dir` (sharded safetensors + config + tokenizer + gptaq_quant.json holding `spec`).

    wcfg: `common.solver.SolverConfig`; kv: `common.models.kv_quant.KVQuantConfig`; calibration: token-id batches
    [bsz, seqlen] (may be empty when the method needs no data).  block_times: see `quantize_blocks`.
    Returns the per-linear records of `quantize_blocks`.
    """
    from common.pipeline.driver import quantize_blocks
    from common.models.rotation import check_rotations, rotate_embeddings, rotate_layer, rotation_record

    dtype = _dtype(dtype)
    device = torch.device(device)
    config = llm.read_config(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)
    model = build_skeleton(config, dtype)
    ckpt.check_fits(model)
    R1 = R2s = None
    if rotation is not None:
        try:
            R1, R2s = check_rotations(model, rotation.R1, rotation.R2)
        except ValueError as e:
            raise llm.LLMError(str(e)) from None
        R1, R2s = R1.to(device), [None if r is None else r.to(device) for r in R2s]  # float64 math on `device`
    writer = CheckpointWriter(out_dir, nshards=1 + len(llm.decoder_layers(model)))
    try:
        _load_outer(model, ckpt, dtype)
        if rotation is not None:
            outer = [model.get_input_embeddings(), model.get_output_embeddings(), model.model.norm]
            for m in outer:
                m.to(device)
            rotate_embeddings(model, R1)
            for m in outer:
                m.to("cpu")
        writer.write(_outer_state(model))

        def prepare(i: int, layer: nn.Module) -> None:
            layer.to(device)
            if rotation is not None:
                rotate_layer(layer, R1, R2s[i], online_r4=True, fp32_had=rotation.fp32_had)
            llm.install_layer_quantizers(layer, act, kv)

        def finish(i: int, layer: nn.Module) -> None:
            params = dict(layer.named_parameters())
            writer.write({k: params[n] for n, k in checkpoint_names(layer, f"{LAYERS_PREFIX}{i}.").items()})

        inputs = llm.LayerInputs()
        if wcfg.needs_data:
            inputs = llm.capture_layer_inputs(model, calibration, device)
        records = quantize_blocks(LayerStream(model, ckpt, dtype, prepare, finish), inputs.inputs, inputs.run_layer,
                                  llm.sublayer_groups, wcfg, prepare_block=llm.make_prepare_layer(act),
                                  device=device, offload_inputs=offload_inputs, desc="layer",
                                  block_times=block_times)
        del inputs
        if rotation is not None:
            setattr(model.config, "gptaq_rotation",
                    rotation_record(rotation.mode, rotation.seed, True, rotation.fp32_had))
        model.config.dtype = dtype
        writer.finish(model.config, tokenizer, dict(spec or {}))
    except BaseException:
        writer.abort()
        raise
    return records


def open_quantized(path: str, device: torch.device | str, dtype: str | torch.dtype | None = None,
                   flag: str = "--load_qmodel_path") -> tuple[nn.Module, Callable, dict]:
    """A model saved by `quantize_checkpoint` or `llm.save_quantized` (safetensors), for streamed evaluation:
    (skeleton with embedding / norm / lm_head loaded, open_layer, spec).  `open_layer(i, layer)` is a context
    manager that reads decoder layer i, rebuilds its online Hadamard and quantizers (`llm.make_rebuild_layer`),
    yields it on `device` and releases it on exit: `perplexity(model, windows, device=device, open_layer=...)`.
    dtype None = the saved dtype."""
    spec = llm.read_quant_spec(path)
    dtype = _dtype(dtype or spec.get("dtype") or "float16")
    ckpt = SafetensorsCheckpoint(path, flag)
    model = build_skeleton(llm.read_config(path, flag), dtype)
    ckpt.check_fits(model)
    _load_outer(model, ckpt, dtype)
    rebuild = llm.make_rebuild_layer(spec)

    @contextmanager
    def open_layer(i: int, layer: nn.Module) -> Iterator[nn.Module]:
        load_module(layer, f"{LAYERS_PREFIX}{i}.", ckpt, dtype)
        rebuild(layer)
        try:
            yield layer.to(device)
        finally:
            release_module(layer)

    return model, open_layer, spec
