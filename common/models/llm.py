"""Decoder-only LLMs (Llama, Qwen2/2.5, Qwen3, Mistral; the MoE Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5):
loading, decoder layers and their inputs.

A decoder layer l maps the residual stream X_l -> X_{l+1}; its linears are solved in the order
[k, v, q] -> [o] -> [up, gate] -> [down] (each group shares one input; an MoE block's experts as in
`common.models.moe.mlp_groups`).  `capture_layer_inputs` runs the embedding
on the device and records X_0 plus the keyword arguments (attention mask, position embeddings...) that each layer
receives, so that one layer at a time can run on the device while the model stays on CPU.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from common.models import moe
from common.models import checkpoint, hub, rms_norm
from common.models.files import FileError, ordinary_permissions, read_json
from common.models.hadamard import OnlineHadamard
from common.models.stages import BlockStages
from common.quant.act_quant import ActQuantizer, ActQuantLinear, ActQuantSettings, wrap_linears

__all__ = ["SUPPORTED_MODEL_TYPES", "SUPPORTED_ARCHITECTURES", "LLMError", "as_llm_error", "looks_like_path",
           "read_config", "check_config", "linear_in_features", "act_quant_widths", "check_weight_files", "load_model",
           "load_tokenizer", "decoder_layers",
           "sublayer_groups", "ActQuantSettings", "make_prepare_layer", "add_act_quant", "LayerInputs",
           "capture_layer_inputs", "install_layer_quantizers", "install_quantizers", "check_save_target",
           "save_quantized", "write_quant_file", "publish_directory", "read_quant_spec", "load_quantized",
           "make_rebuild_layer", "distribute_model", "head_dim", "install_online_hadamard", "flatten_grids",
           "GRID_FAMILY", "GRID_FILE", "GRID_INDEX"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", *moe.MOE_MODEL_TYPES)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                           *moe.MOE_ARCHITECTURES)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYER_GROUPS = (
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
)


class LLMError(ValueError):
    """Bad model argument: unsupported architecture, missing directory, unreadable config or weights."""


def looks_like_path(value: str) -> bool:
    """True for values meant as local paths (absolute, ./, ../, ~, a trailing / or more than one /),
    False for hub ids like 'meta-llama/Llama-2-7b-hf'."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or value.endswith(("/", os.sep))
            or value.count("/") > 1 or os.sep != "/" and os.sep in value)


def read_config(name_or_path: str, flag: str = "--model"):
    """The model's config (only config.json is read): a local directory or a hub id."""
    from transformers import AutoConfig

    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise LLMError(f"{flag}: {name_or_path} is a file; expected a model directory or a hub id")
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise LLMError(f"{flag}: directory {name_or_path} has no config.json")
        if not isinstance(_read_json(file, "a transformers model config (a JSON object)", flag), dict):
            raise LLMError(f"{flag}: {file} is not a JSON object; expected a transformers model config")
        try:
            return AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - transformers rejects bad configs with many exception types
            raise LLMError(f"{flag}: {file} is not a valid transformers config ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
    if looks_like_path(name_or_path):
        raise LLMError(f"{flag}: local model directory {name_or_path} does not exist")
    try:
        with hub.offline_unless_reachable():
            return AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - hub / network errors come in many types
        if not hub.reachable():
            raise LLMError(f"{flag}: {name_or_path!r} is not a local directory, the Hugging Face Hub is not "
                           "reachable and the model is not in its local cache; pass a local model directory "
                           f"({flag} path/to/model)") from None
        raise LLMError(f"{flag}: cannot read the config of {name_or_path!r} (not a local directory, and the hub "
                       f"lookup failed: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def as_llm_error(e: FileError, flag: str) -> LLMError:
    """A FileError of the files behind `flag` as an LLMError whose message starts with the flag."""
    return LLMError(str(e) if str(e).startswith(flag) else f"{flag}: {e}")


def _read_json(path: str, expected: str, flag: str):
    try:
        return read_json(path, expected)
    except FileError as e:
        raise as_llm_error(e, flag) from None


def check_config(config) -> None:
    """Raise LLMError unless the config is one of the supported decoder families."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        name = archs[0] if archs else model_type
        raise LLMError(f"--model: unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_in_features(config) -> dict[str, int]:
    """Input features of each kind of decoder linear (what a weight / activation group size must divide)."""
    if moe.is_moe_config(config):
        return {"q/k/v_proj, up/gate_proj": config.hidden_size,
                "o_proj": config.num_attention_heads * head_dim(config), **moe.linear_in_features(config)}
    return {"q/k/v_proj, up/gate_proj": config.hidden_size,
            "o_proj": config.num_attention_heads * head_dim(config),
            "down_proj": config.intermediate_size}


def act_quant_widths(config, act: ActQuantSettings, kv) -> set[tuple[int, bool]]:
    """(row width, symmetric) of each activation and K/V quantizer a decoder layer of `config` calls: the
    specializations of common.quant.act_triton's kernel that `common.pipeline.prewarm` compiles ahead."""
    widths = set()
    if act.bits < 16 or (act.down_proj_bits or 16) < 16:
        widths |= {(act.groupsize if act.groupsize > 0 else n, act.sym) for n in linear_in_features(config).values()}
    from common.models.kv_quant import kv_group

    for bits, gs, sym in ((kv.k_bits, kv.k_groupsize, kv.k_sym), (kv.v_bits, kv.v_groupsize, kv.v_sym)):
        if bits < 16:
            widths.add((kv_group(gs, head_dim(config)), sym))
    return widths


def load_tokenizer(name_or_path: str, flag: str = "--model"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    except Exception as e:  # noqa: BLE001 - a corrupt tokenizer file fails in many ways
        raise LLMError(f"{flag}: cannot load the tokenizer of {name_or_path} ({type(e).__name__}: "
                       f"{_first_line(e)}); expected tokenizer.json / tokenizer_config.json") from None


def check_weight_files(directory: str, flag: str = "--model") -> None:
    """Before any loading: the weight files of a local model directory exist, and every safetensors file has a
    valid header and all the bytes it declares (truncated, zeroed or missing files are a one-line LLMError)."""
    try:
        checkpoint.tensor_shapes(checkpoint.weight_files(directory, flag))
    except FileError as e:
        raise as_llm_error(e, flag) from None


def _check_loading_info(info: dict, where: str) -> None:
    """The loading report of from_pretrained: nothing missing, unexpected or re-initialised for its shape."""
    try:
        checkpoint.refuse_mismatch(where, missing=sorted(info.get("missing_keys") or ()),
                                   unexpected=sorted(info.get("unexpected_keys") or ()),
                                   mis_shaped=sorted(info.get("mismatched_keys") or ()))
    except FileError as e:
        raise LLMError(str(e)) from None


def load_model(name_or_path: str, dtype: str | torch.dtype = "float16", flag: str = "--model") -> nn.Module:
    """AutoModelForCausalLM on CPU in `dtype`, eval mode, no KV cache (MoE experts as
    `common.models.moe.RoutedExperts`); raises LLMError for unsupported models
    and for checkpoints that do not hold exactly the tensors of their config (missing, unexpected, mis-shaped)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    check_config(read_config(name_or_path, flag))
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        check_weight_files(path, flag)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, low_cpu_mem_usage=True,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise LLMError(f"{flag}: cannot load the weights of {name_or_path} ({type(e).__name__}: "
                       f"{_first_line(e)})") from None
    _check_loading_info(info, f"{flag}: the checkpoint in {name_or_path}")
    model.config.use_cache = False
    moe.convert_experts(model)
    return model.eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def sublayer_groups(layer: nn.Module) -> list[list[str]]:
    """[k, v, q] -> [o] -> [up, gate] -> [down] (names relative to the decoder layer); an MoE block's MLP part is
    `common.models.moe.mlp_groups`."""
    if moe.is_moe_block(layer.mlp):
        return [list(g) for g in LAYER_GROUPS[:2]] + moe.mlp_groups(layer)
    return [list(g) for g in LAYER_GROUPS]


def make_prepare_layer(settings: ActQuantSettings) -> Callable[[nn.Module], None]:
    """prepare_layer(layer): wrap every linear of a decoder layer in ActQuantLinear (an existing wrapper keeps its
    online pre_transform, e.g. QuaRot's down_proj Hadamard) and give it a fresh quantizer; MoE routers stay plain
    16-bit linears, routed experts get their quantizers in `common.models.moe.prepare_experts`."""
    def prepare(layer: nn.Module) -> None:
        if moe.is_moe_block(layer.mlp):
            moe.prepare_experts(layer, settings)
        for name, wrapper in wrap_linears(layer, skip=moe.is_router).items():
            bits = settings.bits
            if name.endswith("down_proj") and settings.down_proj_bits is not None:
                bits = settings.down_proj_bits
            wrapper.quantizer = ActQuantizer(bits=bits, sym=settings.sym, clip_ratio=settings.clip_ratio,
                                             groupsize=settings.groupsize)
    return prepare


def add_act_quant(model: nn.Module, settings: ActQuantSettings) -> None:
    """make_prepare_layer(settings) on every decoder layer (lm_head stays 16-bit)."""
    prepare = make_prepare_layer(settings)
    for layer in decoder_layers(model):
        prepare(layer)


class _StopEmbedding(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer `index` during capture: records its arguments and passes the stream through."""

    def __init__(self, layer: nn.Module, index: int, store: "LayerInputs", last: bool):
        super().__init__()
        self.index, self.store, self.last = index, store, last
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.store.inputs.append(hidden_states)
        self.store.kwargs.setdefault(self.index, {})[hidden_states.shape[0]] = (args, kwargs)
        if self.last:
            raise _StopEmbedding
        return hidden_states


class LayerInputs:
    """X_0 (one tensor per batch) and each layer's extra arguments, keyed by layer index and batch size.

    `run_layer(layer, x)` runs a decoder layer (identified by its self_attn.layer_idx, so deep copies work) on x.
    """

    def __init__(self):
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict[int, dict[int, tuple[tuple, dict]]] = {}

    def run_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.kwargs[layer.self_attn.layer_idx][x.shape[0]]
        out = layer(x, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def run_stage(self, layer: nn.Module, stage: int, x: torch.Tensor) -> torch.Tensor:
        """One residual half of a decoder layer, as its forward computes it: stage 0 = the layer's own forward up to
        the input of post_attention_layernorm (h1 = h + self_attn(input_layernorm(h))), stage 1 =
        h1 + mlp(post_attention_layernorm(h1)) (the last lines of every supported decoder layer's forward)."""
        if stage == 1:
            return x + layer.mlp(layer.post_attention_layernorm(x))
        return _run_to_post_attention_norm(lambda: self.run_layer(layer, x), layer)

    def stages(self, layer: nn.Module) -> BlockStages:
        """The layer's two residual halves for `common.pipeline.driver.quantize_blocks(stages=...)`:
        [k, v, q] -> [o] in the attention half, [up, gate] -> [down] in the MLP half; each half's first group reads
        the half's norm of its input (`stage_entry`)."""
        groups = sublayer_groups(layer)
        return BlockStages([groups[:2], groups[2:]], self.run_stage, stage_entry)


def stage_entry(layer: nn.Module, stage: int, x: torch.Tensor) -> torch.Tensor:
    """What the first linears of a residual half are called with: input_layernorm(h) (q/k/v) or
    post_attention_layernorm(h1) (up/gate), before their activation quantizers."""
    return (layer.input_layernorm if stage == 0 else layer.post_attention_layernorm)(x)


class _AttentionHalfDone(Exception):
    def __init__(self, h1: torch.Tensor):
        super().__init__()
        self.h1 = h1


def _run_to_post_attention_norm(run: Callable[[], torch.Tensor], layer: nn.Module) -> torch.Tensor:
    def stop(module, args):
        raise _AttentionHalfDone(args[0])

    handle = layer.post_attention_layernorm.register_forward_pre_hook(stop)
    try:
        run()
    except _AttentionHalfDone as done:
        return done.h1
    finally:
        handle.remove()
    raise RuntimeError("the decoder layer's forward never called post_attention_layernorm")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device | str) -> LayerInputs:
    """Run the embedding (and rotary embedding, mask construction) on `device` for each batch of token ids
    [bsz, seqlen]; the decoder layers stay where they are.  Returns the captured X_0 and layer arguments."""
    device = torch.device(device)
    base = model.model
    layers = base.layers
    store = LayerInputs()
    moved = [m for n, m in base.named_children() if n != "layers"]
    homes = [next(iter(m.parameters()), next(iter(m.buffers()), torch.empty(0))).device for m in moved]
    for m in moved:
        m.to(device)
    base.layers = nn.ModuleList([_Catcher(layer, i, store, i == len(layers) - 1) for i, layer in enumerate(layers)])
    try:
        for ids in batches:
            try:
                base(input_ids=ids.to(device), use_cache=False)
            except _StopEmbedding:
                pass
    finally:
        base.layers = layers
        for m, home in zip(moved, homes):
            m.to(home)
    return store


# ------------------------------------------------------------------------------------- quantized models

QUANT_FILE = "gptaq_quant.json"
QUANT_FORMAT = 1
# each quantized linear's grid (common.io.export.grid_tensors: packed codes, zero points, float32 scales, g_idx),
# keyed "<linear>.<tensor>": what a later --export of the saved model packs (one file, or shards + index)
GRID_FAMILY = "gptaq_grid"
GRID_FILE, GRID_INDEX = f"{GRID_FAMILY}.safetensors", f"{GRID_FAMILY}.safetensors.index.json"


def flatten_grids(grids: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{linear: {tensor: value}} -> {"<linear>.<tensor>": value} (the layout of GRID_FILE)."""
    return {f"{name}.{k}": v.contiguous() for name, grid in grids.items() for k, v in grid.items()}


def install_layer_quantizers(layer: nn.Module, act: ActQuantSettings, kv) -> None:
    """install_quantizers for one decoder layer (what the streaming pipeline does as each layer is loaded); its
    Llama-formula RMSNorms become one kernel each on CUDA (`common.models.rms_norm`)."""
    from common.quant.act_quant import set_act_quant
    from common.models.kv_quant import add_kv_quantization

    add_kv_quantization(layer, kv)
    make_prepare_layer(act)(layer)
    set_act_quant(layer, True)
    rms_norm.use_fused_rms_norms(layer)


def install_quantizers(model: nn.Module, act: ActQuantSettings, kv) -> None:
    """KV-cache quantizers / R3 (`common.models.kv_quant.KVQuantConfig`) and activation quantizers on every decoder
    linear, all switched on.  Call after any rotation (the down_proj wrapper keeps its online Hadamard)."""
    for layer in decoder_layers(model):
        install_layer_quantizers(layer, act, kv)


def check_save_target(path: str, flag: str = "--save_qmodel_path") -> None:
    """Refuse to overwrite anything but an empty directory or an earlier saved quantized model."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        raise LLMError(f"{flag}: {path} is a file; expected a directory")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, QUANT_FILE)):
        raise LLMError(f"{flag}: {path} exists and is not a saved quantized model; refusing to overwrite it")


@torch.no_grad()
def save_quantized(model: nn.Module, tokenizer, path: str, spec: dict,
                   grids: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Save the fake-quantized model as a plain transformers checkpoint (the ActQuantLinear wrappers are
    unwrapped, so the weights keep their usual names; rotated models carry the folded R1/R2/R4 in their weights)
    plus the tokenizer and QUANT_FILE = {format, rotation, act_quant, kv_quant, ...} needed to rebuild the
    online Hadamards and the quantizers, and the linears' `grids` (GRID_FILE) where given.  Written to a temporary
    sibling directory, then renamed into place."""
    import shutil
    import tempfile

    from common.quant.act_quant import ActQuantLinear

    path = os.path.abspath(os.path.expanduser(path))
    check_save_target(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantLinear)]
    try:
        for name, w in wrappers:
            _set_submodule(model, name, w.linear)
        try:
            model.save_pretrained(tmp)
        finally:
            for name, w in wrappers:
                _set_submodule(model, name, w)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if grids:
            from safetensors.torch import save_file

            save_file(flatten_grids(grids), os.path.join(tmp, GRID_FILE), metadata={"format": "pt"})
        write_quant_file(tmp, model.config, spec)
        ordinary_permissions(tmp)
        publish_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_quant_file(directory: str, config, spec: dict) -> None:
    """QUANT_FILE = {format, rotation (config.gptaq_rotation), **spec} in `directory`."""
    record = {"format": QUANT_FORMAT, "rotation": getattr(config, "gptaq_rotation", None), **spec}
    with open(os.path.join(directory, QUANT_FILE), "w") as f:
        json.dump(record, f, indent=2, default=str)


def publish_directory(tmp: str, path: str) -> None:
    """Move the finished directory `tmp` to `path` (a sibling), replacing an earlier one there; the earlier one
    is put back if the move fails or is interrupted."""
    import shutil
    import tempfile

    if not os.path.isdir(path):
        os.replace(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(path))
    try:
        os.replace(path, os.path.join(old, "x"))
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(os.path.join(old, "x"), path)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def read_quant_spec(path: str, flag: str = "--load_qmodel_path") -> dict:
    """QUANT_FILE of a directory written by save_quantized (its format and the fields a rebuild needs checked)."""
    file = os.path.join(os.path.expanduser(path), QUANT_FILE)
    spec = _read_json(file, f"the {QUANT_FILE} written by --save_qmodel_path", flag)
    if not isinstance(spec, dict):
        raise LLMError(f"{flag}: {file} holds a {type(spec).__name__}; expected a JSON object")
    if spec.get("format") != QUANT_FORMAT:
        raise LLMError(f"{flag}: {file} has format {spec.get('format')!r}, expected {QUANT_FORMAT}")
    try:
        make_rebuild_layer(spec)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise LLMError(f"{flag}: {file} does not describe the quantizers ({type(e).__name__}: {_first_line(e)}); "
                       "expected the act_quant, kv_quant and rotation records of --save_qmodel_path") from None
    return spec


def load_quantized(path: str, dtype: str | torch.dtype | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by save_quantized: weights, online Hadamards (R4 on down_proj), KV / activation
    quantizers, all switched on.  dtype None = the saved dtype.  Returns (model, spec)."""
    spec = read_quant_spec(path)
    model = load_model(path, dtype or spec.get("dtype") or "float16", flag="--load_qmodel_path")
    rebuild = make_rebuild_layer(spec)
    for layer in decoder_layers(model):
        rebuild(layer)
    return model, spec


def install_online_hadamard(layer: nn.Module, fp32_had: bool = False) -> None:
    """Put the online R4 (x -> x H^T) in front of one decoder layer's down_proj (wrapped in ActQuantLinear if
    needed; every down_proj of an MoE block).  Touches no weight."""
    mlp = layer.mlp
    if moe.is_moe_block(mlp):
        moe.install_down_transform(layer, lambda n: OnlineHadamard(n, fp32_had=fp32_had))
        return
    down = mlp.down_proj.linear if isinstance(mlp.down_proj, ActQuantLinear) else mlp.down_proj
    transform = OnlineHadamard(down.in_features, fp32_had=fp32_had)
    if isinstance(mlp.down_proj, ActQuantLinear):
        mlp.down_proj.pre_transform = transform
    else:
        mlp.down_proj = ActQuantLinear(mlp.down_proj, pre_transform=transform)


def make_rebuild_layer(spec: dict) -> Callable[[nn.Module], None]:
    """rebuild(layer): what a saved decoder layer needs besides its weights (QUANT_FILE `spec`): the online R4
    Hadamard on down_proj if the model was rotated, then its KV-cache and activation quantizers, all switched on."""
    from common.models.kv_quant import KVQuantConfig

    rotation = spec.get("rotation") or {}
    act, kv = ActQuantSettings(**spec["act_quant"]), KVQuantConfig(**spec["kv_quant"])

    def rebuild(layer: nn.Module) -> None:
        if rotation.get("online_r4"):
            install_online_hadamard(layer, fp32_had=bool(rotation.get("fp32_had")))
        install_layer_quantizers(layer, act, kv)
    return rebuild


def distribute_model(model: nn.Module) -> torch.device:
    """Spread the decoder layers over all visible GPUs with accelerate (balanced, a layer never split);
    returns the device of the embedding (where inputs go)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = [type(decoder_layers(model)[0]).__name__]
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    return model.get_input_embeddings().weight.device
