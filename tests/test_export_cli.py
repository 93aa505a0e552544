"""fake_quant/main.py --export end to end on a tiny Llama: the GPTQ checkpoint against the format's documented
fields, a pure-PyTorch reference loader (written here) and, where gptqmodel is installed, transformers'
AutoModelForCausalLM: both reload it to the fake-quant model's perplexity; and the refusals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from common.models import llm
from common.data.text import get_eval_data
from common.eval.perplexity import perplexity
from fixtures import make_tiny_causal_lm, tiny_config, write_text
from test_export import dequantize_checkpoint

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main  # noqa: E402

LINEARS = [n for g in llm.LAYER_GROUPS for n in g]
# (flags, bits, checkpoint format): every flag family the export has to carry into the checkpoint
SETTINGS = {
    "w4g32_act_order_rotate_gptq": (["--w_bits", "4", "--w_groupsize", "32", "--act_order", "--rotate"], 4, "gptq"),
    "w3g32_asym_static_gptaq_v2": (["--w_bits", "3", "--w_groupsize", "32", "--act_order", "--static_groups",
                                    "--w_asym", "--gptaq", "--export_format", "gptq_v2"], 3, "gptq_v2"),
    "w2_per_channel_rtn": (["--w_bits", "2", "--w_rtn"], 2, "gptq"),
    "w8g32_gptaq_rotate": (["--w_bits", "8", "--w_groupsize", "32", "--gptaq", "--rotate"], 8, "gptq"),
    # groups of 64 on down_proj's 96 input features (64 + 32; GPTQModel's kernels take group sizes 16, 32, 64, ...)
    # and GPTQModel's symmetric grid
    "w4g64_partial_gptq_sym_grid_gptaq": (["--w_bits", "4", "--w_groupsize", "64", "--act_order", "--w_sym_grid",
                                           "gptq", "--gptaq"], 4, "gptq"),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = make_tiny_causal_lm("llama", root / "llama")
    cal = write_text(root / "cal.txt", 3000, seed=0)
    ev = write_text(root / "eval.txt", 500, seed=1)
    return {"root": root, "model": model, "cal": str(cal), "eval": str(ev)}


def _argv(env, out, *extra):
    return ["--model", str(env["model"]), "--dtype", "float16", "--device", "cpu", "--nsamples", "4", "--seqlen",
            "32", "--bsz", "2", "--cal_dataset", env["cal"], "--eval_dataset", env["eval"], "--output_dir", str(out),
            *extra]


@pytest.fixture(scope="module", params=list(SETTINGS))
def exported(request, env):
    """One CLI run per setting: fake-quant perplexity, the export and the saved fake-quant model."""
    flags, bits, fmt = SETTINGS[request.param]
    out = env["root"] / request.param
    result = main(_argv(env, out / "run", *flags, "--export", str(out / "gptq"),
                        "--save_qmodel_path", str(out / "fake")))
    return {"result": result, "dir": out / "gptq", "fake": out / "fake", "bits": bits, "format": fmt,
            "flags": flags, "ppl": result["perplexity"][env["eval"]]}


def _linear_tensors(state: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def reference_load(directory: Path) -> torch.nn.Module:
    """Pure-PyTorch GPTQ loader: dequantize every packed linear (the test's own unpacker) into a plain model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    qcfg = config.quantization_config
    del config.quantization_config
    state = load_file(str(directory / "model.safetensors"))
    for name in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")}):
        t = _linear_tensors(state, name)
        state[f"{name}.weight"] = dequantize_checkpoint(t, qcfg["bits"], qcfg["checkpoint_format"]).half()
        for leaf in ("qweight", "qzeros", "scales", "g_idx"):
            del state[f"{name}.{leaf}"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _perplexity(model, env) -> float:
    windows = get_eval_data(env["eval"], llm.load_tokenizer(str(env["model"])), 32)
    return perplexity(model, windows, bsz=2, device="cpu")


def test_layout_matches_gptq_format(exported):
    """The documented GPTQ fields: quantization_config / quantize_config.json, and per linear qweight int32
    [in*b/32, out], qzeros int32 [groups, out*b/32], scales float16 [groups, out], g_idx int32 [in]."""
    from safetensors.torch import load_file

    d, bits, flags = exported["dir"], exported["bits"], exported["flags"]
    group = int(flags[flags.index("--w_groupsize") + 1]) if "--w_groupsize" in flags else -1
    act_order = "--act_order" in flags
    qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
    expect = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
              "sym": "--w_asym" not in flags, "static_groups": "--static_groups" in flags,
              "checkpoint_format": exported["format"]}
    assert {k: qcfg[k] for k in expect} == expect
    assert json.loads((d / "quantize_config.json").read_text()) == qcfg
    assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    config = json.loads((d / "config.json").read_text())
    assert "gptaq_rotation" not in config  # a plain architecture: nothing to rebuild
    sd = load_file(str(d / "model.safetensors"))
    hidden, inter, kv = 64, 96, 32
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
              "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden), "mlp.up_proj": (hidden, inter),
              "mlp.gate_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    for i in range(2):
        for name, (inp, out) in shapes.items():
            t = _linear_tensors(sd, f"model.layers.{i}.{name}")
            groups = 1 if group == -1 else -(-inp // group)  # ceil: a narrower last group
            assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
            assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (inp * bits // 32, out)
            assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (groups, out * bits // 32)
            assert t["scales"].dtype == torch.float16 and t["scales"].shape == (groups, out)
            assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (inp,)
            sequential = torch.arange(inp, dtype=torch.int32) // (inp if group == -1 else group)
            assert torch.equal(t["g_idx"].sort().values, sequential)  # act-order permutes, never changes counts
    rest = {k for k in sd if ".layers." not in k}
    assert rest == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert all(v.dtype == torch.float16 for k, v in sd.items() if k.endswith(("norm.weight", "embed_tokens.weight")))
    if "--rotate" in flags:  # norms fused into the linears; R1 folded into the embedding
        assert torch.all(sd["model.norm.weight"] == 1) and torch.all(sd["model.layers.0.input_layernorm.weight"] == 1)


def test_checkpoint_dequantizes_to_the_fake_quant_weights(exported):
    """Bit exact: the weights --save_qmodel_path stored are what the checkpoint's codes, fp16 scales and zeros give."""
    from safetensors.torch import load_file

    fake = load_file(str(exported["fake"] / "model.safetensors"))
    sd = load_file(str(exported["dir"] / "model.safetensors"))
    for i in range(2):
        for name in LINEARS:
            full = f"model.layers.{i}.{name}"
            w = dequantize_checkpoint(_linear_tensors(sd, full), exported["bits"], exported["format"])
            assert torch.equal(w.half(), fake[f"{full}.weight"]), full


def test_reference_loader_gives_fake_quant_perplexity(exported, env):
    ppl = _perplexity(reference_load(exported["dir"]), env)
    assert ppl == pytest.approx(exported["ppl"], rel=1e-3)


def gptqmodel_load(directory: Path, bits: int, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """AutoModelForCausalLM.from_pretrained through transformers' GPTQ integration (optimum + gptqmodel, its pure
    PyTorch kernel on CPU); skips the test where either package is missing."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"))
    assert type(model.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel")
    return model


def test_transformers_gptqmodel_loads_export_with_fake_quant_perplexity(exported, env):
    """Reloaded with gptqmodel (torch.compile of its dequantizer switched off to keep the test fast: through
    torch's own config.patch, which restores the setting; monkeypatch.setattr deletes it on undo), the export gives
    the fake-quant perplexity."""
    with torch._dynamo.config.patch(disable=True):
        ppl = _perplexity(gptqmodel_load(exported["dir"], exported["bits"]), env)
    assert ppl == pytest.approx(exported["ppl"], rel=1e-3)


# ----------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")
    monkeypatch.setattr(llm, "load_model", refuse)


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    msg = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert code not in (0, None) and msg and "\n" not in msg.strip(), msg
    return msg


@pytest.mark.parametrize("extra, expect", [
    (["--w_bits", "4", "--rotate", "--a_bits", "4"], "online R3/R4 Hadamards"),
    (["--w_bits", "4", "--rotate", "--k_bits", "4", "--v_bits", "4"], "online R3/R4 Hadamards"),
    (["--w_bits", "4", "--v_bits", "4"], "weight-only"),
    (["--w_bits", "4", "--int8_down_proj"], "weight-only"),
    (["--w_bits", "16"], "--export needs --w_bits in 2, 3, 4, 8"),
    (["--w_bits", "5"], "--export needs --w_bits in 2, 3, 4, 8"),
    (["--w_bits", "4", "--export_dtype", "float32"], "--export_dtype"),
])
def test_export_refusals(env, tmp_path, capsys, no_load, extra, expect):
    assert expect in _refused(_argv(env, tmp_path, *extra, "--export", str(tmp_path / "q")), capsys)
    assert not (tmp_path / "q").exists()


def test_export_refuses_nonempty_dir_and_unpackable_dims(env, tmp_path, capsys, no_load):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("x")
    msg = _refused(_argv(env, tmp_path, "--w_bits", "4", "--export", str(tmp_path / "q")), capsys)
    assert "--export" in msg and "not empty" in msg
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["notes.txt"]
    odd = tmp_path / "odd"  # config.json only: the check must come before anything else is read
    tiny_config("llama", 320, hidden_size=64, intermediate_size=80).save_pretrained(odd)
    argv = _argv(env, tmp_path, "--w_bits", "4", "--export", str(tmp_path / "q2"))
    argv[argv.index("--model") + 1] = str(odd)
    msg = _refused(argv, capsys)
    assert "--export" in msg and "gate_proj is [80 x 64]" in msg and "multiples of 32" in msg


# ------------------------------------------------------------------- export at any size, export dtype


def _checkpoint_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def variants(env):
    """The same GPTAQ W4 g32 act-order rotated export three ways: in memory, --stream (each layer packed as it is
    solved), and --load_qmodel_path --export of the saved in-memory model (nothing quantized again)."""
    root, flags = env["root"] / "variants", ["--w_bits", "4", "--w_groupsize", "32", "--act_order", "--rotate",
                                              "--gptaq"]
    mem = main(_argv(env, root / "mem", *flags, "--export", str(root / "g_mem"), "--save_qmodel_path",
                     str(root / "q_mem")))
    st = main(_argv(env, root / "st", *flags, "--stream", "--export", str(root / "g_st")))
    saved = main(["--load_qmodel_path", str(root / "q_mem"), "--device", "cpu", "--seqlen", "32", "--bsz", "2",
                  "--eval_dataset", env["eval"], "--output_dir", str(root / "ev"), "--stream",
                  "--export", str(root / "g_saved")])
    return {"root": root, "runs": {"mem": mem, "st": st, "saved": saved}}


def test_streamed_and_saved_exports_equal_the_in_memory_export(variants, env):
    root = variants["root"]
    mem, st, saved = (_checkpoint_tensors(root / g) for g in ("g_mem", "g_st", "g_saved"))
    assert (root / "g_st" / "model.safetensors.index.json").is_file() and len(list(root.glob("g_st/*.safetensors"))) == 3
    assert not (root / "g_mem" / "model.safetensors.index.json").exists()
    for other in (st, saved):
        assert set(other) == set(mem) and len(mem) > 20
        assert all(torch.equal(mem[k], other[k]) for k in mem), [k for k in mem if not torch.equal(mem[k], other[k])]
    configs = [json.loads((root / g / "config.json").read_text()) for g in ("g_mem", "g_st", "g_saved")]
    assert configs[0]["quantization_config"] == configs[1]["quantization_config"] == configs[2]["quantization_config"]
    assert all("gptaq_rotation" not in c for c in configs)
    key = env["eval"]
    ppl = [variants["runs"][r]["perplexity"][key] for r in ("mem", "st", "saved")]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-6) and ppl[2] == pytest.approx(ppl[0], rel=1e-6)
    assert reference_perplexity(root / "g_st", env) == pytest.approx(ppl[0], rel=1e-3)
    assert not list(root.glob(".g_*"))  # no temporary folder left


def reference_perplexity(directory: Path, env) -> float:
    """reference_load for sharded checkpoints too."""
    from safetensors.torch import save_file

    tensors = _checkpoint_tensors(directory)
    if not (directory / "model.safetensors").exists():
        import shutil

        single = directory.parent / f"{directory.name}_single"
        shutil.copytree(directory, single, ignore=shutil.ignore_patterns("model-*", "*.index.json"))
        save_file(tensors, str(single / "model.safetensors"))
        directory = single
    return _perplexity(reference_load(directory), env)


def test_gptqmodel_loads_sharded_streamed_export(variants, env):
    with torch._dynamo.config.patch(disable=True):
        ppl = _perplexity(gptqmodel_load(variants["root"] / "g_st", 4), env)
    assert ppl == pytest.approx(variants["runs"]["mem"]["perplexity"][env["eval"]], rel=1e-3)


@pytest.fixture(scope="module")
def bf16(env):
    out = env["root"] / "bf16"
    argv = _argv(env, out / "run", "--w_bits", "4", "--w_groupsize", "32", "--export_dtype", "bfloat16",
                 "--export", str(out / "gptq"), "--save_qmodel_path", str(out / "fake"))
    argv[argv.index("--dtype") + 1] = "bfloat16"
    return {"result": main(argv), "dir": out / "gptq", "fake": out / "fake"}


def test_bfloat16_export_dequantizes_to_the_bfloat16_fake_quant_weights(bf16):
    from safetensors.torch import load_file

    sd, fake = load_file(str(bf16["dir"] / "model.safetensors")), load_file(str(bf16["fake"] / "model.safetensors"))
    assert json.loads((bf16["dir"] / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for k, v in sd.items() if k.endswith((".scales", "norm.weight", "embed_tokens.weight")))
    for i in range(2):
        for name in LINEARS:
            full = f"model.layers.{i}.{name}"
            w = dequantize_checkpoint(_linear_tensors(sd, full), 4, "gptq")
            assert torch.equal(w.bfloat16(), fake[f"{full}.weight"]), full


def test_gptqmodel_loads_bfloat16_export(bf16, env):
    with torch._dynamo.config.patch(disable=True):
        ppl = _perplexity(gptqmodel_load(bf16["dir"], 4, torch.bfloat16), env)
    assert ppl == pytest.approx(bf16["result"]["perplexity"][env["eval"]], rel=1e-2)


def test_export_of_saved_model_refusals(env, tmp_path, capsys):
    rtn = ["--w_bits", "4", "--w_rtn"]
    main(_argv(env, tmp_path / "r1", *rtn, "--rotate", "--save_qmodel_path", str(tmp_path / "online")))
    main(_argv(env, tmp_path / "r2", *rtn, "--a_bits", "8", "--save_qmodel_path", str(tmp_path / "a8")))
    load = ["--device", "cpu", "--seqlen", "32", "--eval_dataset", env["eval"], "--output_dir", str(tmp_path / "o"),
            "--export", str(tmp_path / "q"), "--load_qmodel_path"]
    capsys.readouterr()  # the two runs' progress bars
    assert "online R3/R4" in _refused([*load, str(tmp_path / "online")], capsys)
    capsys.readouterr()
    assert "a_bits 8" in _refused([*load, str(tmp_path / "a8")], capsys)
    assert not (tmp_path / "q").exists()
