"""fake_quant/main.py end to end on tiny offline models (nsamples 4, seqlen 32, local text), and its input checks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.models import llm
from fixtures import make_tiny_causal_lm, write_text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main  # noqa: E402

W4A4KV4 = ["--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--v_bits", "4", "--w_clip", "--a_clip_ratio", "0.9"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fq")
    models = {arch: make_tiny_causal_lm(arch, root / arch) for arch in ("llama", "qwen2", "mistral")}
    cal = write_text(root / "cal.txt", 3000, seed=0)
    ev = write_text(root / "eval.txt", 700, seed=1)
    return {"root": root, "models": models, "cal": str(cal), "eval": str(ev)}


def _argv(env, arch, out, *extra):
    return ["--model", str(env["models"][arch]), "--dtype", "float32", "--device", "cpu", "--nsamples", "4",
            "--seqlen", "32", "--bsz", "2", "--cal_dataset", env["cal"], "--eval_dataset", env["eval"],
            "--output_dir", str(out), *extra]


def _check_layers(result, gptaq: bool):
    layers = result["layers"]
    assert len(layers) == 2 * 7
    assert {r["name"] for r in layers} == {n for g in llm.LAYER_GROUPS for n in g}
    assert all(r["loss"] >= 0 and math.isfinite(r["loss"]) for r in layers)
    assert all(("asym_loss" in r) == gptaq for r in layers)


def test_rotated_w4a4kv4_gptq_results_json(env, tmp_path):
    result = main(_argv(env, "llama", tmp_path, "--rotate", *W4A4KV4))
    _check_layers(result, gptaq=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["quantization"] == {"method": "gptq", "w_bits": 4, "a_bits": 4, "k_bits": 4, "v_bits": 4,
                                       "rotate": True}
    ppl = on_disk["perplexity"][env["eval"]]
    assert math.isfinite(ppl) and ppl > 1
    cfg = on_disk["config"]
    assert cfg["nsamples"] == 4 and cfg["seqlen"] == 32 and cfg["rotate"] and cfg["w_clip"] and cfg["alpha"] == 0.25
    assert on_disk["seeds"] == {"seed": 0, "rotation_seed": 0}
    assert {"data", "load", "quantize", "perplexity", "total"} <= set(on_disk["time_s"])
    assert on_disk["peak_memory"].get("peak_rss_gib", 0) > 0
    assert "git_commit" in on_disk and "environment" in on_disk
    assert len(on_disk["layers"]) == 14
    assert not list(tmp_path.glob("*.tmp"))


def test_rotated_gptaq_save_load_same_perplexity(env, tmp_path):
    qdir = tmp_path / "qmodel"
    result = main(_argv(env, "llama", tmp_path / "a", "--rotate", "--gptaq", *W4A4KV4, "--int8_down_proj",
                        "--save_qmodel_path", str(qdir)))
    _check_layers(result, gptaq=True)
    assert result["quantization"]["method"] == "gptaq"
    assert (qdir / "gptaq_quant.json").is_file() and (qdir / "config.json").is_file()
    spec = json.loads((qdir / "gptaq_quant.json").read_text())
    assert spec["rotation"]["online_r4"] and spec["act_quant"]["down_proj_bits"] == 8 and spec["kv_quant"]["k_bits"] == 4

    loaded = main(["--load_qmodel_path", str(qdir), "--device", "cpu", "--seqlen", "32", "--bsz", "2",
                   "--eval_dataset", env["eval"], "--output_dir", str(tmp_path / "b")])
    key = env["eval"]
    assert loaded["perplexity"][key] == pytest.approx(result["perplexity"][key], rel=1e-6)
    assert loaded["quantization"]["method"] == "gptaq" and loaded["layers"] == []
    # the rebuilt model has the online Hadamard on down_proj and the same quantizers
    model, _ = llm.load_quantized(str(qdir))
    down = model.model.layers[0].mlp.down_proj
    assert down.pre_transform is not None and down.quantizer.bits == 8
    assert model.model.layers[0].self_attn.q_proj.quantizer.bits == 4


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_families_gptaq(env, tmp_path, arch):
    result = main(_argv(env, arch, tmp_path, "--rotate", "--gptaq", *W4A4KV4))
    _check_layers(result, gptaq=True)
    assert math.isfinite(result["perplexity"][env["eval"]])


def test_table5_and_table6_ablation_flags(env, tmp_path):
    """--gptaq_p_only (Table 5) and --quant_order (Table 6) reach the solver and driver and are recorded."""
    result = main(_argv(env, "llama", tmp_path / "p", "--rotate", "--gptaq", "--gptaq_p_only", *W4A4KV4))
    _check_layers(result, gptaq=True)
    assert result["quantization"]["method"] == "gptaq_p_term_only" and result["config"]["gptaq_p_only"]
    w_first = main(_argv(env, "llama", tmp_path / "w", "--rotate", "--gptaq", "--quant_order", "w_first", *W4A4KV4))
    a_first = main(_argv(env, "llama", tmp_path / "a", "--rotate", "--gptaq", *W4A4KV4))
    assert w_first["config"]["quant_order"] == "w_first" and w_first["layers"][0]["loss"] != a_first["layers"][0]["loss"]


def test_weight_only_w3_groups(env, tmp_path):
    result = main(_argv(env, "llama", tmp_path, "--w_bits", "3", "--w_groupsize", "32", "--act_order",
                        "--static_groups", "--w_asym"))
    _check_layers(result, gptaq=False)
    assert result["quantization"]["a_bits"] == 16


def test_fp16_baseline_and_rtn_agree_on_format(env, tmp_path):
    fp = main(_argv(env, "llama", tmp_path / "fp"))
    assert fp["layers"] == [] and fp["quantization"]["method"] == "none"
    rtn = main(_argv(env, "llama", tmp_path / "rtn", "--rotate", "--w_rtn", *W4A4KV4))
    assert rtn["quantization"]["method"] == "rtn" and len(rtn["layers"]) == 14
    assert all("loss" not in r for r in rtn["layers"])
    assert rtn["perplexity"][env["eval"]] > fp["perplexity"][env["eval"]] * 0.5


def test_subprocess_run(env, tmp_path):
    cmd = [sys.executable, str(REPO / "fake_quant" / "main.py"), *_argv(env, "qwen2", tmp_path, "--w_bits", "4",
                                                                           "--a_bits", "8", "--w_rtn")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(env["root"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | method |" in proc.stdout
    assert json.loads((tmp_path / "results.json").read_text())["quantization"]["method"] == "rtn"


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")
    monkeypatch.setattr(llm, "load_model", refuse)
    monkeypatch.setattr(llm, "load_quantized", refuse)


def _bad(env, tmp_path, capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    if isinstance(code, str):  # SystemExit("error: ...")
        msg = code
    else:  # argparse's parser.error: status 2, message on stderr
        assert code not in (0, None)
        msg = capsys.readouterr().err.strip()
    assert msg and "\n" not in msg.strip(), msg
    return msg


@pytest.mark.parametrize("extra, expect", [
    (["--w_bits", "1"], "--w_bits"),
    (["--w_bits", "9"], "--w_bits"),
    (["--a_bits", "9"], "--a_bits"),
    (["--k_bits", "1"], "--k_bits"),
    (["--cal_dataset", "wikitext3"], "--cal_dataset"),
    (["--eval_dataset", "no_such_set"], "--eval_dataset"),
    (["--w_bits", "4", "--gptaq", "--w_rtn"], "--gptaq"),
    (["--gptaq_exact"], "--gptaq_exact"),
    (["--a_clip_ratio", "1.5"], "--a_clip_ratio"),
    (["--w_bits", "4", "--w_asym", "--w_sym_grid", "gptq"], "--w_sym_grid gptq"),
    (["--a_bits", "4", "--a_groupsize", "48"], "--a_groupsize 48 does not divide"),
    (["--k_bits", "4", "--k_groupsize", "12"], "--k_groupsize 12 does not divide head_dim"),
    (["--w_bits", "4", "--gptaq_p_only"], "--gptaq_p_only needs --gptaq"),
    (["--w_bits", "4", "--gptaq", "--gptaq_exact", "--gptaq_p_only"], "--gptaq_p_only"),
    (["--quant_order", "first"], "--quant_order"),
    (["--lm_eval_num_fewshot", "8"], "--lm_eval_num_fewshot needs --lm_eval"),
    (["--lm_eval_chat_template"], "--lm_eval_chat_template needs --lm_eval"),
    (["--lm_eval", "--lm_eval_num_fewshot", "-1"], "--lm_eval_num_fewshot"),
])
def test_bad_flags(env, tmp_path, capsys, no_load, extra, expect):
    assert expect in _bad(env, tmp_path, capsys, _argv(env, "llama", tmp_path, *extra))


def test_bad_paths_and_architecture(env, tmp_path, capsys, no_load):
    msg = _bad(env, tmp_path, capsys, _argv(env, "llama", tmp_path)[2:] + ["--model", "./no/such/model_dir"])
    assert "--model" in msg and "does not exist" in msg
    msg = _bad(env, tmp_path, capsys, ["--load_qmodel_path", str(tmp_path / "missing"), "--device", "cpu"])
    assert "--load_qmodel_path" in msg
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    msg = _bad(env, tmp_path, capsys, _argv(env, "llama", tmp_path)[2:] + ["--model", str(gpt2)])
    assert "unsupported architecture GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg
    msg = _bad(env, tmp_path, capsys, ["--device", "cpu"])
    assert "--model is required" in msg
    if not torch.cuda.is_available():
        msg = _bad(env, tmp_path, capsys, _argv(env, "llama", tmp_path)[:6] + ["--device", "cuda"])
        assert "CUDA" in msg
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("x")
    msg = _bad(env, tmp_path, capsys, _argv(env, "llama", tmp_path, "--save_qmodel_path",
                                            str(tmp_path / "occupied")))
    assert "refusing to overwrite" in msg
    assert os.listdir(tmp_path / "occupied") == ["notes.txt"]
