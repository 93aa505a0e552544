"""Layer streaming: quantize and evaluate safetensors checkpoints that do not fit in host memory.

The model skeleton is built on the meta device; the parts outside the decoder layers (embedding, final norm,
lm_head) are loaded once, and decoder layer l is read from its safetensors shard only when its turn comes, moved to
the device, rotated (R1, R2 are fixed up front: W R1 on q/k/v/gate/up, R1^T W on o/down, R2 per value head,
W_down H^T), quantized by
`common.pipeline.driver.quantize_blocks`, written as its own shard of the output checkpoint and sent back to the meta device.
Host memory then holds about one decoder layer (two for GPTAQ, which keeps a full-precision copy) plus the
embedding, lm_head and the calibration streams, instead of the whole model.  Perplexity streams the same way from
the written checkpoint (`open_quantized` + `common.eval.perplexity.perplexity(open_layer=...)`).
The output is a plain sharded transformers checkpoint plus `gptaq_quant.json`, so `--load_qmodel_path` reads it;
its `gptaq_grid-*` shards keep each linear's grid (`common.io.export.grid_tensors`) for a later export.
With `export_dir`, each layer is also packed and written as a shard of a GPTQ checkpoint as soon as it is solved
(`export_saved` does the same from a finished saved model), so exports need no more host memory than the run.
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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from common.models import checkpoint, llm
from common.models.files import FileError, ordinary_permissions
from common.models.rotation import Rotation
from common.pipeline import prewarm
from common.quant.act_quant import ActQuantLinear

__all__ = ["SafetensorsCheckpoint", "CheckpointWriter", "build_skeleton", "checkpoint_names",
           "load_module", "release_module", "LayerStream", "quantize_checkpoint", "open_quantized",
           "check_saved_exportable", "export_saved", "keeps_grids"]

SINGLE_FILE, INDEX_FILE = checkpoint.SINGLE_FILE, checkpoint.INDEX_FILE
LAYERS_PREFIX = "model.layers."


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory: one `model.safetensors`, or shards listed by
    `model.safetensors.index.json`.  `read` opens only the shards it needs and closes (unmaps) them again, so no
    more than the requested tensors stay resident."""

    def __init__(self, directory: str, flag: str = "--model", single: str = SINGLE_FILE, index: str = INDEX_FILE):
        self.directory = os.path.expanduser(directory)
        if not os.path.isdir(self.directory):
            raise llm.LLMError(f"{flag}: streaming needs a local model directory, {directory} is none")
        if not any(os.path.isfile(os.path.join(self.directory, f)) for f in (index, single)):
            raise llm.LLMError(f"{flag}: {directory} has neither {single} nor {index}; streaming reads "
                               "safetensors checkpoints only")
        self.files: dict[str, str] = {}  # tensor name -> shard file name
        self.shapes: dict[str, tuple[int, ...]] = {}
        try:
            for path in checkpoint.weight_files(self.directory, flag, single, index):
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

    def read(self, names: list[str], dtype: torch.dtype | None, pin: bool = False) -> dict[str, torch.Tensor]:
        """{name: tensor} on the CPU, floating tensors cast to `dtype` (None: as stored); pin: read into page-locked
        memory (CUDA's cached host allocator), so that the copy to the GPU is one DMA that no other host work slows."""
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
            tensors = _read_shard(path, keys, pin)
            if tensors is None:  # a dtype _read_shard does not know: safetensors' own reader
                with _open_shard(path) as f:
                    tensors = {k: f.get_tensor(k) for k in keys}
            for k, t in tensors.items():
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
        return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_shard(path: str, keys: list[str], pin: bool = False) -> dict[str, torch.Tensor] | None:
    """The tensors `keys` of one safetensors file (8-byte little-endian header size, JSON header, then the bytes
    at each tensor's data_offsets), read with readinto straight into fresh tensors: private memory, one copy, and
    the GIL released while reading, so a background read does not stall the thread launching GPU work.
    None if a tensor has a dtype not listed in _SAFETENSORS_DTYPES.  pin: into page-locked memory."""
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
            t = torch.empty(info["shape"], dtype=dtype, pin_memory=pin)
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
    """A sharded safetensors checkpoint written shard by shard into a hidden sibling of `path`; `finish` (a
    quantized model) or `publish` (any other files) adds the indexes and renames it into place, `abort` deletes it.

    `write` takes its own copies of the tensors (CUDA tensors: a device copy, moved to host memory by the
    background thread on a side stream) and returns; the files are written by that background thread in order,
    IN_FLIGHT shards at most (a `write` beyond them waits for the oldest; `publish` and `abort` wait for all; a
    failed shard's error is raised there), so the host copies and the disk writes overlap the caller's next layer
    (a layer's model shard and its grid shard are both in flight while the next layer runs).

    nshards: {family: its number of shards}; a family's shards are `<family>-0000k-of-0000n.safetensors`, listed by
    `<family>.safetensors.index.json` (family "model": the transformers checkpoint).  check(path) refuses a target."""

    IN_FLIGHT = 2

    def __init__(self, path: str, nshards: int | dict[str, int], check: Callable[[str], None] = llm.check_save_target):
        self.path = os.path.abspath(os.path.expanduser(path))
        check(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", dir=os.path.dirname(self.path))
        self.nshards = nshards if isinstance(nshards, dict) else {"model": nshards}
        self.weight_map = {f: {} for f in self.nshards}
        self.total_size = dict.fromkeys(self.nshards, 0)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future] = deque()

    def write(self, tensors: dict[str, torch.Tensor], family: str = "model") -> None:
        k, n = len(set(self.weight_map[family].values())) + 1, self.nshards[family]
        if k > n:
            raise RuntimeError(f"CheckpointWriter: more than the {n} announced {family} shards")
        name = f"{family}-{k:05d}-of-{n:05d}.safetensors"
        # own copies: the caller may free or change its tensors as soon as this returns
        tensors = {t_name: t.detach().clone(memory_format=torch.contiguous_format) for t_name, t in tensors.items()}
        ready = None
        if any(t.is_cuda for t in tensors.values()):
            ready = torch.cuda.Event()
            ready.record()  # the copies' values are queued before this point of the caller's stream
        self._wait(keep=self.IN_FLIGHT - 1)
        for t_name, t in tensors.items():
            self.weight_map[family][t_name] = name
            self.total_size[family] += t.numel() * t.element_size()
        # handed over in a box that the writer empties: the pending future holds no reference to the device copies
        # once they are on the host (they would otherwise stay on the GPU until the file is written)
        self._pending.append(self._pool.submit(_save_shard, [tensors], ready, os.path.join(self.tmp, name)))
        del tensors

    def _wait(self, keep: int = 0) -> None:
        """Wait for the oldest shards until at most `keep` are in flight (raising a failed one's error)."""
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def publish(self, write_files: Callable[[str], None] | None = None) -> str:
        """Write the index of every family that has shards, then `write_files(tmp)`, and rename into place."""
        self._wait()
        self._pool.shutdown()
        for family, weight_map in self.weight_map.items():
            if weight_map:
                index = {"metadata": {"total_size": self.total_size[family]},
                         "weight_map": dict(sorted(weight_map.items()))}
                with open(os.path.join(self.tmp, f"{family}.safetensors.index.json"), "w") as f:
                    json.dump(index, f, indent=2)
        if write_files is not None:
            write_files(self.tmp)
        ordinary_permissions(self.tmp)
        llm.publish_directory(self.tmp, self.path)
        return self.path

    def finish(self, config, tokenizer=None, spec: dict | None = None) -> str:
        """Publish the checkpoint (spec None: a plain checkpoint without gptaq_quant.json); returns its path."""
        def write_files(tmp: str) -> None:
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if spec is not None:
                llm.write_quant_file(tmp, config, spec)
        return self.publish(write_files)

    def abort(self) -> None:
        while self._pending:
            try:
                self._wait(keep=len(self._pending) - 1)
            except Exception:  # noqa: BLE001 - the shards are being discarded anyway
                pass
        self._pool.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _save_shard(box: list[dict[str, torch.Tensor]], ready: torch.cuda.Event | None, path: str) -> None:
    """(CheckpointWriter's background thread) tensors to host memory, CUDA ones on a side stream after `ready`
    into page-locked buffers (one DMA each, given back to CUDA's cached host allocator after the file is written),
    then one safetensors file.  box = [tensors], emptied here (the device copies are freed once on the host)."""
    from safetensors.torch import save_file

    tensors = box.pop()
    if ready is not None:
        stream = torch.cuda.Stream(device=next(t.device for t in tensors.values() if t.is_cuda))
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            # synchronous: done before the device copies are freed
            tensors = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) if t.is_cuda else t
                       for n, t in tensors.items()}
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
                 dtype: torch.dtype, pin: bool = False) -> dict[str, torch.Tensor]:
    """{parameter name in `module`: its tensor in `ckpt`} (CPU, `dtype`, page-locked if `pin`); touches no module
    state."""
    names = checkpoint_names(module, prefix)
    tensors = ckpt.read(list(names.values()), dtype, pin)
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
    Layer i + 1's tensors are read by a background thread while layer i is in use (host memory: one layer more;
    page-locked with `pin`, for a `prepare` that copies the layer to the GPU).
    `times[i]` = {"block", "read_s" (waiting for the read), "prepare_s", "write_s" (finish + release)}: wall
    seconds, CUDA synchronized."""

    def __init__(self, model: nn.Module, ckpt: SafetensorsCheckpoint, dtype: torch.dtype,
                 prepare: Callable[[int, nn.Module], None], finish: Callable[[int, nn.Module], None],
                 pin: bool = False):
        self.layers, self.ckpt, self.dtype, self.pin = llm.decoder_layers(model), ckpt, dtype, pin
        self.prepare, self.finish = prepare, finish
        self.times: list[dict] = []

    def __len__(self) -> int:
        return len(self.layers)

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        return _read_module(self.layers[i], f"{LAYERS_PREFIX}{i}.", self.ckpt, self.dtype, self.pin)

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


def _export_layer(tensors: dict[str, torch.Tensor], grids: dict[str, dict[str, torch.Tensor]], bits: int,
                  checkpoint_format: str, dtype: str | torch.dtype) -> dict[str, torch.Tensor]:
    """One decoder layer of a GPTQ checkpoint: its plain checkpoint `tensors` with every linear in `grids` (full
    names) replaced by its packed tensors (bias included), the rest (norms) in the export dtype."""
    from common.io.export import plain_tensor, repack

    out = {}
    for name, grid in grids.items():
        bias = tensors.get(f"{name}.bias")
        out.update({f"{name}.{k}": v for k, v in repack(grid, bits, checkpoint_format, name, dtype, bias).items()})
    out.update({k: plain_tensor(v, dtype) for k, v in tensors.items() if k.rpartition(".")[0] not in grids})
    return out


def _export_writer(path: str, nlayers: int) -> CheckpointWriter:
    from common.io.export import ExportError, check_export_target

    def check(target: str) -> None:
        try:
            check_export_target(target)
        except ExportError as e:
            raise llm.LLMError(str(e)) from None
    return CheckpointWriter(path, 1 + nlayers, check=check)


def keeps_grids(wcfg, config) -> bool:
    """Whether a run keeps its linears' grids (saved models do, for a later export): bits the export packs and
    layer widths it can pack."""
    from common.io.export import EXPORT_BITS, ExportError, check_export_config

    if not wcfg.active or wcfg.bits not in EXPORT_BITS:
        return False
    try:
        check_export_config(config)
    except ExportError:
        return False
    return True


def rotate_outer(model: nn.Module, R1: torch.Tensor, device: torch.device | str) -> None:
    """QuaRot's R1 on the parts outside the decoder layers (embedding, lm_head, final norm folded), computed on
    `device` and moved back to the host."""
    from common.models.rotation import rotate_embeddings

    outer = [model.get_input_embeddings(), model.get_output_embeddings(), model.model.norm]
    for m in outer:
        m.to(device)
    rotate_embeddings(model, R1)
    for m in outer:
        m.to("cpu")


def quantize_checkpoint(model_dir: str, out_dir: str, *, dtype: str | torch.dtype, wcfg, act: llm.ActQuantSettings,
                        kv, calibration: list[torch.Tensor], device: torch.device | str,
                        rotation: Rotation | None = None, offload_inputs: bool = False, tokenizer=None,
                        spec: dict | None = None, block_times: list[dict] | None = None,
                        setup_times: dict | None = None, export_dir: str | None = None,
                        export_format: str = "gptq", export_dtype: str = "float16",
                        cuda_graphs: bool = False) -> list[dict]:
    """fake_quant's pipeline (rotation, KV / activation quantizers, layer-by-layer weight solve) on the safetensors
    checkpoint in `model_dir`, one decoder layer in host memory at a time; the quantized model is written to
    `out_dir` (sharded safetensors + config + tokenizer + gptaq_quant.json holding `spec`, + the linears' grids).

    wcfg: `common.solver.SolverConfig`; kv: `common.models.kv_quant.KVQuantConfig`; calibration: token-id batches
    [bsz, seqlen] (may be empty when the method needs no data).  block_times: see `quantize_blocks`; each block's
    entry also gets the layer's read_s / prepare_s / write_s (`LayerStream.times`).  setup_times: if given, gets the
    wall seconds outside the layers: "outer_s" (embedding, norm, lm_head: read, rotate, write), "embed_s" (the
    calibration batches through the embedding), "prewarm_wait_s" (waiting for the Triton kernels that
    `common.pipeline.prewarm` compiles during the setup), "publish_s" (the last shard, index and config).
    export_dir: also write each layer, as soon as it is solved, as a shard of a GPTQ checkpoint there
    (`export_format`, scales and other tensors in `export_dtype`); the rotation then has no online R4 (a plain
    model; kv must have rotate_qk False and act / kv no quantization, as `common.io.export` requires).
    Returns the per-linear records of `quantize_blocks`.
    """
    from common.io.export import GPTQCollector, plain_tensor, quantization_config, write_export_files
    from common.pipeline.driver import quantize_blocks
    from common.models.rotation import check_rotations, rotate_layer, rotation_record

    dtype = _dtype(dtype)
    device = torch.device(device)
    config = llm.read_config(model_dir)
    ckpt = SafetensorsCheckpoint(model_dir)
    model = build_skeleton(config, dtype)
    online_r4 = export_dir is None
    ckpt.check_fits(model)
    warm = prewarm.start(device, dtype, wcfg, llm.act_quant_widths(config, act, kv))
    R1 = R2s = None
    if rotation is not None:
        try:
            R1, R2s = check_rotations(model, rotation.R1, rotation.R2)
        except ValueError as e:
            raise llm.LLMError(str(e)) from None
        R1, R2s = R1.to(device), [None if r is None else r.to(device) for r in R2s]  # float64 math on `device`
    nlayers = len(llm.decoder_layers(model))
    collector = GPTQCollector(model, llm.decoder_layers(model), export_format if export_dir else None) \
        if export_dir is not None or keeps_grids(wcfg, config) else None
    writer = CheckpointWriter(out_dir, {"model": 1 + nlayers, llm.GRID_FAMILY: nlayers})
    exporter = None
    setup = {}
    try:
        t0 = _synced()
        if export_dir is not None:
            exporter = _export_writer(export_dir, nlayers)
        _load_outer(model, ckpt, dtype)
        if rotation is not None:
            rotate_outer(model, R1, device)
        writer.write(_outer_state(model))
        if exporter is not None:
            exporter.write({k: plain_tensor(v, export_dtype) for k, v in _outer_state(model).items()})
        setup["outer_s"] = _synced() - t0

        prepare_times: dict[int, dict] = {}

        def prepare(i: int, layer: nn.Module) -> None:
            t = [_synced()]
            layer.to(device)
            t.append(_synced())
            if rotation is not None:
                rotate_layer(layer, R1, R2s[i], online_r4=online_r4, fp32_had=rotation.fp32_had)
            t.append(_synced())
            llm.install_layer_quantizers(layer, act, kv)
            t.append(_synced())
            prepare_times[i] = {k: round(b - a, 4) for k, a, b in zip(("to_device_s", "rotate_s", "quantizers_s"),
                                                                     t, t[1:])}

        def finish(i: int, layer: nn.Module) -> None:
            params = dict(layer.named_parameters())
            tensors = {k: params[n] for n, k in checkpoint_names(layer, f"{LAYERS_PREFIX}{i}.").items()}
            writer.write(tensors)
            if collector is not None:
                grids = collector.block(i, pop=True)
                writer.write(llm.flatten_grids(grids), llm.GRID_FAMILY)
                if exporter is not None:
                    exporter.write(_export_layer(tensors, grids, wcfg.bits, export_format, export_dtype))

        t0 = _synced()
        inputs = llm.LayerInputs()
        if wcfg.needs_data:
            inputs = llm.capture_layer_inputs(model, calibration, device)
        setup["embed_s"] = _synced() - t0
        setup["prewarm_wait_s"] = warm.wait()  # kernels compiled during the setup above (common.pipeline.prewarm)
        stream = LayerStream(model, ckpt, dtype, prepare, finish, pin=device.type == "cuda")
        records = quantize_blocks(stream, inputs.inputs, inputs.run_layer, llm.sublayer_groups, wcfg,
                                  prepare_block=llm.make_prepare_layer(act), device=device,
                                  offload_inputs=offload_inputs, desc="layer", block_times=block_times,
                                  stages=inputs.stages, on_quantized=collector, cuda_graphs=cuda_graphs)
        del inputs
        if block_times is not None:
            io = {t["block"]: t for t in stream.times}
            for entry in block_times:
                entry.update({k: v for k, v in io.get(entry["block"], {}).items() if k != "block"})
                entry["prepare"] = prepare_times.get(entry["block"], {})  # prepare_s by step
        t0 = time.perf_counter()
        if rotation is not None:
            setattr(model.config, "gptaq_rotation",
                    rotation_record(rotation.mode, rotation.seed, online_r4, rotation.fp32_had))
        model.config.dtype = dtype
        if exporter is not None:
            qcfg = quantization_config(wcfg, export_format)
            exporter.publish(lambda tmp: write_export_files(tmp, model.config, qcfg, export_dtype, tokenizer,
                                                            getattr(model, "generation_config", None)))
        writer.finish(model.config, tokenizer, dict(spec or {}))
        setup["publish_s"] = time.perf_counter() - t0
        if setup_times is not None:
            setup_times.update({k: round(v, 4) for k, v in setup.items()})
    except BaseException:
        writer.abort()
        if exporter is not None:
            exporter.abort()
        raise
    return records


def _saved_solver_config(spec: dict):
    """The SolverConfig a saved model records (gptaq_quant.json "weight_quant")."""
    from common.solver import GPTAQConfig, SolverConfig

    d = dict(spec["weight_quant"])
    return SolverConfig(**{**d, "gptaq": GPTAQConfig(**d["gptaq"])})


def check_saved_exportable(path: str, flag: str = "--load_qmodel_path") -> None:
    """Raise an LLMError unless the model saved in `path` can be exported without quantizing again: weight-only
    (no activation / KV-cache quantizer, no online R3/R4) and saved with its grids."""
    spec = llm.read_quant_spec(path)
    act, kv, rotation = spec.get("act_quant", {}), spec.get("kv_quant", {}), spec.get("rotation") or {}
    online = [f"a_bits {act['bits']}"] if act.get("bits", 16) < 16 else []
    online += ["int8_down_proj"] if act.get("down_proj_bits") is not None else []
    online += [f"{k}_bits {kv[f'{k}_bits']}" for k in "kv" if kv.get(f"{k}_bits", 16) < 16]
    if online:
        raise llm.LLMError(f"--export: {path} was quantized with {', '.join(online)}; a GPTQ checkpoint holds "
                           "weight-only models")
    if rotation.get("online_r4") or kv.get("rotate_qk"):
        raise llm.LLMError(f"--export: {path} was rotated with the online R3/R4 Hadamards, which a GPTQ checkpoint "
                           "cannot hold; quantize it again with --rotate --export (R1/R2 folded, no online Hadamard)")
    directory = os.path.expanduser(path)
    if not any(os.path.isfile(os.path.join(directory, f)) for f in (llm.GRID_FILE, llm.GRID_INDEX)):
        raise llm.LLMError(f"--export: {path} has no {llm.GRID_FILE} (the weight grids an export packs): it was "
                           f"saved without weight quantization at bits 2/3/4/8, or by an older version")


def export_saved(path: str, out_dir: str, *, checkpoint_format: str = "gptq", dtype: str = "float16",
                 tokenizer=None, flag: str = "--load_qmodel_path") -> str:
    """Write the weight-only fake-quant model saved in `path` (`llm.save_quantized` or `quantize_checkpoint`) as a
    GPTQ checkpoint in `out_dir`, one decoder layer at a time, from its saved grids: nothing is quantized again.
    Each saved weight is checked to be its grid's dequantization (to 1% of a step).  Returns `out_dir`."""
    from common.io.export import plain_tensor, quantization_config, write_export_files

    check_saved_exportable(path, flag)
    spec = llm.read_quant_spec(path)
    wcfg = _saved_solver_config(spec)
    config = llm.read_config(path, flag)
    ckpt = SafetensorsCheckpoint(path, flag)
    grid_ckpt = SafetensorsCheckpoint(path, flag, single=llm.GRID_FILE, index=llm.GRID_INDEX)
    nlayers = config.num_hidden_layers
    exporter = _export_writer(out_dir, nlayers)
    try:
        outer = [k for k in ckpt.files if not k.startswith(LAYERS_PREFIX)]
        exporter.write({k: plain_tensor(v, dtype) for k, v in ckpt.read(outer, None).items()})
        for i in range(nlayers):
            prefix = f"{LAYERS_PREFIX}{i}."
            tensors = ckpt.read([k for k in ckpt.files if k.startswith(prefix)], None)
            flat = grid_ckpt.read([k for k in grid_ckpt.files if k.startswith(prefix)], None)
            grids: dict[str, dict[str, torch.Tensor]] = {}
            for key, value in flat.items():
                name, _, leaf = key.rpartition(".")
                grids.setdefault(name, {})[leaf] = value
            for name, grid in grids.items():
                _check_on_grid(name, tensors[f"{name}.weight"], grid, wcfg.bits, path)
            exporter.write(_export_layer(tensors, grids, wcfg.bits, checkpoint_format, dtype))
            del tensors, flat, grids
            _trim_heap()
        if tokenizer is None:
            tokenizer = llm.load_tokenizer(path)
        qcfg = quantization_config(wcfg, checkpoint_format)
        return exporter.publish(lambda tmp: write_export_files(tmp, config, qcfg, dtype, tokenizer))
    except BaseException:
        exporter.abort()
        raise


def _check_on_grid(name: str, weight: torch.Tensor, grid: dict[str, torch.Tensor], bits: int, path: str) -> None:
    from common.io.export import unpack_codes

    codes = unpack_codes(grid["qweight"], bits).t().float()  # [out, in]
    zeros = unpack_codes(grid["qzeros"].t().contiguous(), bits).float()  # [out, groups]
    g = grid["g_idx"].long()
    scales = grid["scales"].float().t()  # [out, groups]
    S = scales[:, g]
    deq = S * (codes - zeros[:, g])
    if deq.shape != weight.shape or bool(((deq - weight.float()).abs() > 0.01 * S).any()):
        raise llm.LLMError(f"--export: the saved weight of {name} in {path} is not its saved grid's dequantization "
                           "(the checkpoint was changed after it was saved)")


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
