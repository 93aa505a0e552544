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
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from common.models import llm
from common.models.rotation import Rotation
from common.quant.act_quant import ActQuantLinear

__all__ = ["SafetensorsCheckpoint", "CheckpointWriter", "build_skeleton", "checkpoint_names",
           "load_module", "release_module", "LayerStream", "quantize_checkpoint", "open_quantized"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LAYERS_PREFIX = "model.layers."


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory: one `model.safetensors`, or shards listed by
    `model.safetensors.index.json`.  `read` opens only the shards it needs and closes (unmaps) them again, so no
    more than the requested tensors stay resident."""

    def __init__(self, directory: str, flag: str = "--model"):
        self.directory = os.path.expanduser(directory)
        if not os.path.isdir(self.directory):
            raise llm.LLMError(f"{flag}: streaming needs a local model directory, {directory} is none")
        index, single = (os.path.join(self.directory, f) for f in (INDEX_FILE, SINGLE_FILE))
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.files = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise llm.LLMError(f"{flag}: cannot read {index}: {e}") from None
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.files = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise llm.LLMError(f"{flag}: {directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; streaming reads "
                               "safetensors checkpoints only")
        for name in sorted(set(self.files.values())):
            if not os.path.isfile(os.path.join(self.directory, name)):
                raise llm.LLMError(f"{flag}: shard {name} listed in {INDEX_FILE} is missing from {directory}")

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
            path = os.path.join(self.directory, file)
            tensors = _read_shard(path, keys)
            if tensors is None:  # a dtype _read_shard does not know: safetensors' own reader
                with _open_shard(path) as f:
                    tensors = {k: f.get_tensor(k) for k in keys}
            for k, t in tensors.items():
                out[k] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_shard(path: str, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors `keys` of one safetensors file (8-byte little-endian header size, JSON header, then the bytes
    at each tensor's data_offsets), read with readinto straight into fresh tensors: private memory, one copy, and
    the GIL released while reading, so a background read does not stall the thread launching GPU work.
    None if a tensor has a dtype not listed in _SAFETENSORS_DTYPES."""
    with open(path, "rb", buffering=0) as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        out = {}
        for k in keys:
            info = header[k]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                return None
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=dtype)
            if t.numel() * t.element_size() != end - start:
                raise llm.LLMError(f"{path}: tensor {k} has {end - start} bytes for shape {info['shape']}")
            if end > start:
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.seek(8 + size + start)
                done = 0
                while done < len(view):
                    got = f.readinto(view[done:])
                    if not got:
                        raise llm.LLMError(f"{path}: the file ends inside tensor {k}")
                    done += got
            out[k] = t
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
    index, config, tokenizer and quantization record and renames it into place, `abort` deletes it.

    `write` takes its own copies of the tensors (CUDA tensors: a device copy, moved to host memory by the
    background thread on a side stream) and returns; the file is written by that background thread (one shard in
    flight: the next `write`, `finish` and `abort` wait for it, and raise its error), so the host copy and the disk
    write overlap the caller's next layer."""

    def __init__(self, path: str, nshards: int):
        self.path = os.path.abspath(os.path.expanduser(path))
        llm.check_save_target(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", dir=os.path.dirname(self.path))
        self.nshards, self.weight_map, self.total_size = nshards, {}, 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        k = len(set(self.weight_map.values())) + 1
        if k > self.nshards:
            raise RuntimeError(f"CheckpointWriter: more than the {self.nshards} announced shards")
        name = f"model-{k:05d}-of-{self.nshards:05d}.safetensors"
        # own copies: the caller may free or change its tensors as soon as this returns
        tensors = {n: t.detach().clone(memory_format=torch.contiguous_format) for n, t in tensors.items()}
        ready = None
        if any(t.is_cuda for t in tensors.values()):
            ready = torch.cuda.Event()
            ready.record()  # the copies' values are queued before this point of the caller's stream
        self._wait()
        self._pending = self._pool.submit(_save_shard, tensors, ready, os.path.join(self.tmp, name))
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total_size += t.numel() * t.element_size()
        del tensors

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self, config, tokenizer=None, spec: dict | None = None) -> str:
        """Publish the checkpoint (spec None: a plain checkpoint without gptaq_quant.json); returns its path."""
        self._wait()
        self._pool.shutdown()
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        config.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        if spec is not None:
            llm.write_quant_file(self.tmp, config, spec)
        llm.publish_directory(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - the shard is being discarded anyway
            pass
        self._pool.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _save_shard(tensors: dict[str, torch.Tensor], ready: torch.cuda.Event | None, path: str) -> None:
    """(CheckpointWriter's background thread) tensors to host memory, CUDA ones on a side stream after `ready`,
    then one safetensors file."""
    from safetensors.torch import save_file

    if ready is not None:
        stream = torch.cuda.Stream(device=next(t.device for t in tensors.values() if t.is_cuda))
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            tensors = {n: t.to("cpu") for n, t in tensors.items()}  # synchronous: done before the copies are freed
    save_file(tensors, path, metadata={"format": "pt"})


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
    _assign(module, _read_module(module, prefix, ckpt, dtype))


def _read_module(module: nn.Module, prefix: str, ckpt: SafetensorsCheckpoint,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{parameter name in `module`: its tensor in `ckpt`} (CPU, `dtype`); touches no module state."""
    names = checkpoint_names(module, prefix)
    tensors = ckpt.read(list(names.values()), dtype)
    return {n: tensors[k] for n, k in names.items()}


def _assign(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(state, strict=False, assign=True)


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
    is released.  For a consumer that is done with a layer when it asks for the next (`quantize_blocks`).
    Layer i + 1's tensors are read by a background thread while layer i is in use (host memory: one layer more).
    `times[i]` = {"block", "read_s" (waiting for the read), "prepare_s", "write_s" (finish + release)}: wall
    seconds, CUDA synchronized."""

    def __init__(self, model: nn.Module, ckpt: SafetensorsCheckpoint, dtype: torch.dtype,
                 prepare: Callable[[int, nn.Module], None], finish: Callable[[int, nn.Module], None]):
        self.layers, self.ckpt, self.dtype = llm.decoder_layers(model), ckpt, dtype
        self.prepare, self.finish = prepare, finish
        self.times: list[dict] = []

    def __len__(self) -> int:
        return len(self.layers)

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        return _read_module(self.layers[i], f"{LAYERS_PREFIX}{i}.", self.ckpt, self.dtype)

    def __iter__(self) -> Iterator[nn.Module]:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader")
        try:
            ahead = pool.submit(self._read, 0) if len(self.layers) else None
            for i, layer in enumerate(self.layers):
                t0 = time.perf_counter()
                state = ahead.result()
                ahead = pool.submit(self._read, i + 1) if i + 1 < len(self.layers) else None
                t1 = time.perf_counter()
                _assign(layer, state)
                del state
                self.prepare(i, layer)
                t2 = _synced()
                yield layer
                t3 = _synced()
                self.finish(i, layer)
                release_module(layer)
                self.times.append({"block": i, "read_s": round(t1 - t0, 4), "prepare_s": round(t2 - t1, 4),
                                   "write_s": round(_synced() - t3, 4)})
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _synced() -> float:
    """perf_counter after queued CUDA work has finished (phase timing)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return llm.DTYPES[dtype] if isinstance(dtype, str) else dtype


def quantize_checkpoint(model_dir: str, out_dir: str, *, dtype: str | torch.dtype, wcfg, act: llm.ActQuantSettings,
                        kv, calibration: list[torch.Tensor], device: torch.device | str,
                        rotation: Rotation | None = None, offload_inputs: bool = False, tokenizer=None,
                        spec: dict | None = None, block_times: list[dict] | None = None,
                        setup_times: dict | None = None) -> list[dict]:
    """fake_quant's pipeline (rotation, KV / activation quantizers, layer-by-layer weight solve) on the safetensors
    checkpoint in `model_dir`, one decoder layer in host memory at a time; the quantized model is written to
    `out_dir` (sharded safetensors + config + tokenizer + gptaq_quant.json holding `spec`).

    wcfg: `common.solver.SolverConfig`; kv: `common.models.kv_quant.KVQuantConfig`; calibration: token-id batches
    [bsz, seqlen] (may be empty when the method needs no data).  block_times: see `quantize_blocks`; each block's
    entry also gets the layer's read_s / prepare_s / write_s (`LayerStream.times`).  setup_times: if given, gets the
    wall seconds outside the layers: "outer_s" (embedding, norm, lm_head: read, rotate, write), "embed_s" (the
    calibration batches through the embedding), "publish_s" (the last shard, index and config).
    Returns the per-linear records of `quantize_blocks`.
    """
    from common.pipeline.driver import quantize_blocks
    from common.models.rotation import check_rotations, rotate_embeddings, rotate_layer, rotation_record

    dtype = _dtype(dtype)
    device = torch.device(device)
    config = llm.read_config(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)
    model = build_skeleton(config, dtype)
    R1 = R2s = None
    if rotation is not None:
        try:
            R1, R2s = check_rotations(model, rotation.R1, rotation.R2)
        except ValueError as e:
            raise llm.LLMError(str(e)) from None
        R1, R2s = R1.to(device), [None if r is None else r.to(device) for r in R2s]  # float64 math on `device`
    writer = CheckpointWriter(out_dir, nshards=1 + len(llm.decoder_layers(model)))
    setup = {}
    try:
        t0 = _synced()
        _load_outer(model, ckpt, dtype)
        if rotation is not None:
            outer = [model.get_input_embeddings(), model.get_output_embeddings(), model.model.norm]
            for m in outer:
                m.to(device)
            rotate_embeddings(model, R1)
            for m in outer:
                m.to("cpu")
        writer.write(_outer_state(model))
        setup["outer_s"] = _synced() - t0

        def prepare(i: int, layer: nn.Module) -> None:
            layer.to(device)
            if rotation is not None:
                rotate_layer(layer, R1, R2s[i], online_r4=True, fp32_had=rotation.fp32_had)
            llm.install_layer_quantizers(layer, act, kv)

        def finish(i: int, layer: nn.Module) -> None:
            params = dict(layer.named_parameters())
            writer.write({k: params[n] for n, k in checkpoint_names(layer, f"{LAYERS_PREFIX}{i}.").items()})

        t0 = _synced()
        inputs = llm.LayerInputs()
        if wcfg.needs_data:
            inputs = llm.capture_layer_inputs(model, calibration, device)
        setup["embed_s"] = _synced() - t0
        stream = LayerStream(model, ckpt, dtype, prepare, finish)
        records = quantize_blocks(stream, inputs.inputs, inputs.run_layer, llm.sublayer_groups, wcfg,
                                  prepare_block=llm.make_prepare_layer(act), device=device,
                                  offload_inputs=offload_inputs, desc="layer", block_times=block_times,
                                  stages=inputs.stages)
        del inputs
        if block_times is not None:
            io = {t["block"]: t for t in stream.times}
            for entry in block_times:
                entry.update({k: v for k, v in io.get(entry["block"], {}).items() if k != "block"})
        t0 = time.perf_counter()
        if rotation is not None:
            setattr(model.config, "gptaq_rotation",
                    rotation_record(rotation.mode, rotation.seed, True, rotation.fp32_had))
        model.config.dtype = dtype
        writer.finish(model.config, tokenizer, dict(spec or {}))
        setup["publish_s"] = time.perf_counter() - t0
        if setup_times is not None:
            setup_times.update({k: round(v, 4) for k, v in setup.items()})
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
