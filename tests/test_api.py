"""The Python API (common.api): CausalLM loads, calibrates from every kind of source, quantizes with the library's
configuration objects, evaluates, saves and exports; the command line is a thin layer over it (same weights and
perplexity); the README's example runs (on a tiny model); chat / SFT rows calibrate through the chat template."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from common.api import ActQuantSettings, CausalLM, KVQuantConfig, Rotation, SolverConfig, export_saved
from common.data import text
from fixtures import make_tiny_causal_lm, write_text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main  # noqa: E402

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return {"root": root, "model": make_tiny_causal_lm("llama", root / "llama"),
            "cal": str(write_text(root / "cal.txt", 3000, seed=0)), "eval": str(write_text(root / "eval.txt", 500, seed=1))}


def _state(model) -> dict:
    return {k: v for k, v in model.state_dict().items()}


def test_api_equals_the_command_line(env, tmp_path):
    flags = ["--rotate", "--gptaq", "--w_bits", "4", "--a_bits", "8", "--a_clip_ratio", "0.9", "--eval_limit", "4"]
    cli = main(["--model", str(env["model"]), "--dtype", "float32", "--device", "cpu", "--nsamples", "4",
                "--seqlen", "32", "--bsz", "2", "--cal_dataset", env["cal"], "--eval_dataset", env["eval"],
                "--output_dir", str(tmp_path / "cli"), "--save_qmodel_path", str(tmp_path / "q_cli"), *flags])
    torch.manual_seed(0)
    lm = CausalLM.load(str(env["model"]), dtype="float32")
    cal = lm.calibration(env["cal"], nsamples=4, seqlen=32)
    layers = lm.quantize(cal, SolverConfig(method="gptaq", bits=4, sym=True),
                         act=ActQuantSettings(bits=8, sym=True, clip_ratio=0.9), kv=KVQuantConfig(),
                         rotation=Rotation.quarot(lm.config), bsz=2)
    assert [r["loss"] for r in layers] == [r["loss"] for r in cli["layers"]]
    ppl = lm.perplexity(env["eval"], seqlen=32, bsz=2, limit=4)
    assert ppl == pytest.approx(cli["perplexity"][env["eval"]], rel=1e-6)
    lm.save(str(tmp_path / "q_api"))
    again = CausalLM.load_quantized(str(tmp_path / "q_api"))
    cli_model = CausalLM.load_quantized(str(tmp_path / "q_cli"))
    a, b = _state(again.model), _state(cli_model.model)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.perplexity(env["eval"], seqlen=32, bsz=2, limit=4) == pytest.approx(ppl, rel=1e-6)
    assert again.spec["weight_quant"]["method"] == "gptaq" and "args" not in again.spec


def test_calibration_sources_and_export(env, tmp_path):
    lm = CausalLM.load(str(env["model"]), dtype="float16")
    texts = [Path(env["cal"]).read_text()]
    from_texts = lm.calibration(texts, nsamples=3, seqlen=32, seed=1)
    assert [t.shape for t in from_texts] == [(1, 32)] * 3
    assert all(torch.equal(a, b) for a, b in zip(from_texts, lm.calibration(env["cal"], nsamples=3, seqlen=32, seed=1)))
    ids = torch.randint(0, 300, (3, 32))
    assert all(torch.equal(a[0], b) for a, b in zip(lm.calibration(ids), ids))
    cfg = SolverConfig(method="gptq", bits=4, sym=True, group_size=32, scale_dtype="bfloat16")
    lm.quantize(lm.calibration(ids), cfg, export_format="gptq")
    out = lm.export(str(tmp_path / "gptq"), dtype="bfloat16")
    qcfg = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32
    lm.save(str(tmp_path / "fake"))
    export_saved(str(tmp_path / "fake"), str(tmp_path / "gptq2"), dtype="bfloat16")
    from safetensors.torch import load_file

    first, second = load_file(str(Path(out) / "model.safetensors")), {}
    for f in (tmp_path / "gptq2").glob("model-*.safetensors"):
        second.update(load_file(str(f)))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="weight-only"):
        CausalLM.load(str(env["model"])).quantize(ids, cfg, act=ActQuantSettings(bits=4), export_format="gptq")


def test_readme_example_runs(env, tmp_path, monkeypatch):
    """The README's Python API example, on a tiny model and text instead of SmolLM2 and the pydoc text."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "assets/smollm2-135m" in code and "assets/pydoc/cal.txt" in code
    for old, new in (("assets/smollm2-135m", str(env["model"])), ("assets/pydoc/cal.txt", env["cal"]),
                     ("assets/pydoc/eval.txt", env["eval"]), ("seqlen=256", "seqlen=32"), ("nsamples=16", "nsamples=4"),
                     ("group_size=64", "group_size=32"), ("limit=32", "limit=4"),
                     ("mse=True", "mse=False")):  # the MSE clip search is the slow part on CPU
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "outputs" / "api" / "w4a4_gptaq" / "gptaq_quant.json").is_file()
    assert (tmp_path / "outputs" / "api" / "w4g64_gptaq_gptq" / "quantize_config.json").is_file()


# ---------------------------------------------------------------------------------------------- chat data


@pytest.fixture(scope="module")
def chat(env, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(env["model"]))
    tok.chat_template = TEMPLATE
    words = Path(env["cal"]).read_text().split()
    rows = [{"messages": [{"role": "user", "content": " ".join(words[i:i + 8])},
                          {"role": "assistant", "content": " ".join(words[i + 8:i + 20])}]} for i in range(0, 1200, 20)]
    path = tmp_path_factory.mktemp("chat") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = path.with_name("pairs.jsonl")
    pairs.write_text("".join(json.dumps({"prompt": r["messages"][0]["content"],
                                         "response": r["messages"][1]["content"]}) + "\n" for r in rows))
    return {"tok": tok, "rows": rows, "path": path, "pairs": pairs}


def test_chat_rows_are_rendered_and_packed_from_conversation_starts(chat):
    tok = chat["tok"]
    wins = text.get_calibration_data(str(chat["path"]), tok, nsamples=6, seqlen=48, seed=3)
    assert [w.shape for w in wins] == [(1, 48)] * 6
    starts = {tuple(t[:6].tolist()) for t in text.render_conversations(tok, text.load_documents(str(chat["path"]), "train"))}
    assert all(tuple(w[0, :6].tolist()) in starts for w in wins)  # every window starts a conversation
    assert "user: " in tok.decode(wins[0][0]) and "assistant: " in tok.decode(wins[0][0])
    same = text.get_calibration_data(str(chat["pairs"]), tok, nsamples=6, seqlen=48, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(wins, same))  # prompt/response = one user + one assistant turn
    again = text.get_calibration_data(str(chat["path"]), tok, nsamples=6, seqlen=48, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(wins, again))
    ev = text.get_eval_data(str(chat["path"]), tok, seqlen=48)
    assert ev.dim() == 2 and ev.shape[1] == 48
    api = CausalLM(None, tok).calibration(chat["rows"], nsamples=6, seqlen=48, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(wins, api))


def test_chat_data_errors(chat, env, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(env["model"]))
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        text.get_calibration_data(str(chat["path"]), plain, nsamples=2, seqlen=32)
    with pytest.raises(ValueError, match="fill only"):
        text.get_calibration_data(str(chat["path"]), chat["tok"], nsamples=500, seqlen=48)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps(chat["rows"][0]) + "\n")
    with pytest.raises(ValueError, match="mixes text rows and chat rows"):
        text.load_documents(str(mixed), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'messages' must be"):
        text.load_documents(str(bad), "train")


def test_cli_calibrates_on_chat_jsonl(chat, env, tmp_path):
    model = tmp_path / "chat_model"
    import shutil

    shutil.copytree(env["model"], model)
    chat["tok"].save_pretrained(str(model))
    result = main(["--model", str(model), "--dtype", "float32", "--device", "cpu", "--nsamples", "4", "--seqlen", "32",
                   "--cal_dataset", str(chat["path"]), "--eval_dataset", env["eval"], "--w_bits", "4",
                   "--eval_limit", "2", "--output_dir", str(tmp_path / "o")])
    assert result["layers"] and all(r["tokens"] == 4 * 32 for r in result["layers"])
