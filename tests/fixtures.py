"""Tiny offline models, tokenizers and text for the tests (nothing is downloaded).

`make_tiny_tokenizer(dir)` trains a small word-level tokenizer on generated English-like text and saves it;
`make_tiny_causal_lm(arch, dir)` builds a random Llama / Qwen2 / Qwen3 / Mistral with small dims,
saves it with `save_pretrained` (plus the tokenizer) and returns the directory.
`write_text(path, n_words)` writes deterministic pseudo-English text.
`run_in_triton_interpreter(code)` runs a Python snippet with TRITON_INTERPRET=1 (Triton kernels on CPU tensors).
"""
from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def run_in_triton_interpreter(code: str, timeout: int = 300) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (the repository on the path); it must print OK."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


WORDS = ("the a model layer weight quantized rotation hessian error column token sequence input output "
         "matrix grid scale zero block group order update cholesky inverse calibration language small large "
         "fast slow data text of to and in is on for with as by at from that this it be are was were").split()


def pseudo_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, line = [], []
    for i in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 14):
            out.append(" ".join(line).capitalize() + ".")
            line = []
    if line:
        out.append(" ".join(line) + ".")
    return "\n".join(out) + "\n"


def write_text(path: str | Path, n_words: int = 20000, seed: int = 0) -> Path:
    path = Path(path)
    path.write_text(pseudo_text(n_words, seed))
    return path


def make_tiny_tokenizer(directory: str | Path):
    """A byte-level BPE tokenizer (vocab about 300) trained on pseudo_text, saved into `directory`.

    Byte-level BPE is what Llama-3/Qwen/Mistral checkpoints ship, so every family's tokenizer class
    rebuilds it faithfully from vocab + merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(pseudo_text(5000, seed=123).splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    """Config of a 2-layer model of family `arch` (llama, qwen2, qwen3, mistral) with small dims."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    common.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    if arch == "qwen3":
        common.setdefault("head_dim", 16)
    return cls(**common)


def make_tiny_causal_lm(arch: str, directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Random tiny causal LM of family `arch` with non-trivial norm weights, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), **overrides), dtype=torch.float32)
    return _randomize_and_save(model, directory)


def _randomize_and_save(model, directory: Path, router_std: float = 0.08) -> Path:
    """Non-unit norm scales (they exercise norm fusion), N(0, 0.08) matrices (MoE routers: N(0, router_std), so
    that tokens spread over the experts), N(0, 0.02) vectors; then save_pretrained into `directory`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, router_std if name.endswith("mlp.gate.weight") else 0.08)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(directory))
    return directory


MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_moe_config(arch: str, vocab_size: int, **overrides):
    """Config of a 2-layer mixture-of-experts model of family `arch` (mixtral, qwen2_moe with a shared expert,
    qwen3_moe): 4 experts, top-2, hidden 64, expert intermediate 32 (every width a multiple of 32, for exports)."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3, tie_word_embeddings=False, num_experts_per_tok=2)
    if arch == "mixtral":
        common.update(intermediate_size=32, num_local_experts=4)
    else:
        common.update(intermediate_size=96, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True)
    if arch == "qwen2_moe":
        common.update(shared_expert_intermediate_size=64, qkv_bias=True)
    if arch == "qwen3_moe":
        common.update(head_dim=16)
    common.update(overrides)
    cls = {"mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig}[arch]
    return cls(**common)


def make_tiny_moe_lm(arch: str, directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Random tiny MoE causal LM of family `arch` (tiny_moe_config) with non-trivial norm weights and a router
    that spreads tokens over the experts, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, len(tok), **overrides), dtype=torch.float32)
    return _randomize_and_save(model, directory, router_std=0.5)


def rotated_quantized_model(path: str | Path, a_bits: int = 4, nbatches: int = 2):
    """(model, token batches): the tiny model at `path` in float32, QuaRot-rotated (seed 0), with A`a_bits` and KV4
    quantizers, and `nbatches` random [2, 32] token batches (seed 0)."""
    from common.models import llm
    from common.models.kv_quant import KVQuantConfig
    from common.models.rotation import quarot_rotate

    model = llm.load_model(str(path), "float32")
    quarot_rotate(model, seed=0)
    llm.install_quantizers(model, llm.ActQuantSettings(bits=a_bits), KVQuantConfig(k_bits=4, v_bits=4, rotate_qk=True))
    g = torch.Generator().manual_seed(0)
    return model, [torch.randint(4, 300, (2, 32), generator=g) for _ in range(nbatches)]
