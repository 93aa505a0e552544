"""Layer streaming (common.pipeline.streaming, fake_quant/main.py --stream): the streamed pipeline writes the same weights and
gives the same perplexity as the in-memory one, releases every layer, and a subprocess quantizing and evaluating a
~270 MiB sharded checkpoint grows its peak RSS by less than a quarter of the model's size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.models import llm
from common.pipeline import streaming
from fixtures import make_tiny_causal_lm, make_tiny_tokenizer, tiny_config, write_text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main  # noqa: E402

W4A4KV4 = ["--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--v_bits", "4", "--w_clip", "--a_clip_ratio", "0.9"]


def _reshard(directory: Path, shard: str = "60KB") -> Path:
    """Re-save a saved model as several safetensors shards plus model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    (directory / "model.safetensors").unlink()
    model.save_pretrained(str(directory), max_shard_size=shard)
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast and does not spin against other work on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    models = {
        "llama": _reshard(make_tiny_causal_lm("llama", root / "llama")),
        "qwen2_tied": _reshard(make_tiny_causal_lm("qwen2", root / "qwen2", tie_word_embeddings=True)),
    }
    return {"root": root, "models": models, "cal": str(write_text(root / "cal.txt", 3000, seed=0)),
            "eval": str(write_text(root / "eval.txt", 500, seed=1))}


def _argv(env, arch, out, *extra):
    model = arch if isinstance(arch, Path) else env["models"][arch]
    return ["--model", str(model), "--dtype", "float32", "--device", "cpu", "--nsamples", "4",
            "--seqlen", "32", "--bsz", "2", "--cal_dataset", env["cal"], "--eval_dataset", env["eval"],
            "--output_dir", str(out), *extra]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch,flags", [
    ("llama", ["--rotate", "--gptaq", *W4A4KV4]),
    ("qwen2_tied", ["--rotate", "--w_bits", "4", "--w_groupsize", "16", "--act_order", "--a_bits", "8"]),
])
def test_streamed_equals_in_memory(env, tmp_path, arch, flags):
    mem = main(_argv(env, arch, tmp_path / "mem", *flags, "--save_qmodel_path", str(tmp_path / "q_mem")))
    st = main(_argv(env, arch, tmp_path / "st", *flags, "--stream", "--save_qmodel_path", str(tmp_path / "q_st")))
    a, b = _tensors(tmp_path / "q_mem"), _tensors(tmp_path / "q_st")
    assert set(a) == set(b) and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert json.loads((tmp_path / "q_mem" / "config.json").read_text()) == \
        json.loads((tmp_path / "q_st" / "config.json").read_text())
    spec_mem, spec_st = (llm.read_quant_spec(str(tmp_path / q)) for q in ("q_mem", "q_st"))
    assert spec_st["rotation"] == spec_mem["rotation"] and spec_st["rotation"]["online_r4"]
    assert spec_st["kv_quant"] == spec_mem["kv_quant"] and spec_st["act_quant"] == spec_mem["act_quant"]
    key = env["eval"]
    assert st["perplexity"][key] == pytest.approx(mem["perplexity"][key], rel=1e-6)
    assert [r["loss"] for r in st["layers"]] == [r["loss"] for r in mem["layers"]]
    # the in-memory model's checkpoint, evaluated streaming
    again = main(["--load_qmodel_path", str(tmp_path / "q_mem"), "--device", "cpu", "--seqlen", "32", "--bsz", "2",
                  "--eval_dataset", env["eval"], "--output_dir", str(tmp_path / "ev"), "--stream"])
    assert again["perplexity"][key] == pytest.approx(mem["perplexity"][key], rel=1e-6)


def test_scratch_checkpoint_is_removed(env, tmp_path):
    result = main(_argv(env, "llama", tmp_path, "--w_bits", "4", "--w_rtn", "--stream"))
    assert result["quantization"]["method"] == "rtn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_layer_stream_loads_prepares_and_releases(env):
    directory = env["models"]["llama"]
    ckpt = streaming.SafetensorsCheckpoint(str(directory))
    assert len(set(ckpt.files.values())) > 1  # really sharded
    model = streaming.build_skeleton(llm.read_config(str(directory)), torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    seen = []
    stream = streaming.LayerStream(model, ckpt, torch.float32, prepare=lambda i, layer: seen.append(("prepare", i)),
                                   finish=lambda i, layer: seen.append(("finish", i)))
    assert len(stream) == 2
    for i, layer in enumerate(stream):
        assert all(p.device.type == "cpu" for p in layer.parameters())
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(layer.mlp.down_proj.weight, ckpt.read([name], torch.float32)[name])
    assert seen == [(s, i) for i in range(2) for s in ("prepare", "finish")]
    assert all(p.device.type == "meta" for p in llm.decoder_layers(model).parameters())


def test_bad_inputs(env, tmp_path):
    source, broken = env["models"]["llama"], tmp_path / "broken"
    broken.mkdir()
    shards = sorted(set(streaming.SafetensorsCheckpoint(str(source)).files.values()))
    for f in source.iterdir():
        if f.name != shards[1]:
            (broken / f.name).write_bytes(f.read_bytes())
    rtn = ["--w_bits", "4", "--w_rtn", "--stream"]
    with pytest.raises(SystemExit, match=f"shard {shards[1]} .* is missing"):
        main(_argv(env, broken, tmp_path / "o", *rtn))
    for f in broken.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(SystemExit, match="neither model.safetensors nor"):
        main(_argv(env, broken, tmp_path / "o", *rtn))
    for extra in (["--lm_eval"], ["--distribute"], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            main(_argv(env, "llama", tmp_path / "o", "--stream", *extra))
        assert e.value.code == 2
    assert not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------------------------------- peak memory

RUNNER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    from fake_quant.main import main

    def status_mib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

    def rss_mib():
        return status_mib("VmRSS")

    def peak_mib():  # VmHWM, not ru_maxrss: the latter starts at the forking parent's RSS
        return status_mib("VmHWM")

    def reset_peak():  # VmHWM := VmRSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    from common.models import llm
    from common.pipeline import streaming

    peaks = {{}}
    open_quantized = streaming.open_quantized

    def opened(*args, **kwargs):  # called between the quantization and the evaluation
        peaks["quantized"] = peak_mib()
        return open_quantized(*args, **kwargs)

    streaming.open_quantized = opened
    flags = {flags!r}
    main(["--model", {warm!r}, *flags, "--output_dir", {out!r} + "/warm"])  # imports, allocator warm-up
    base = rss_mib()
    main(["--model", {big!r}, *flags, "--output_dir", {out!r} + "/big", "--save_qmodel_path", {out!r} + "/big_q",
          "--export", {out!r} + "/big_gptq"])
    streamed = peak_mib()
    reset_peak()
    base_export = rss_mib()
    main(["--load_qmodel_path", {out!r} + "/big_q", *flags[2:11], "--output_dir", {out!r} + "/big_ev",
          "--export", {out!r} + "/big_gptq_saved"])
    exported = peak_mib() - base_export
    state = llm.load_model({big!r}, "float32").state_dict()
    total = sum(float(t.sum()) for t in state.values())  # touch every weight: the harness must see a whole model
    print(json.dumps({{"base": base, "quantized": peaks["quantized"], "streamed": streamed, "loaded": peak_mib(),
                      "exported": exported}}))
""")


def _write_big_model(directory: Path) -> int:
    """A 48-layer random Llama (hidden 384, intermediate 768, float32, ~271 MiB) in 40 MB safetensors shards;
    returns its size in bytes."""
    from transformers import AutoModelForCausalLM

    directory.mkdir()
    tok = make_tiny_tokenizer(directory)
    cfg = tiny_config("llama", len(tok), hidden_size=384, intermediate_size=768, num_hidden_layers=48,
                      num_attention_heads=6, num_key_value_heads=6)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.05)
    model.model.rotary_emb.__init__(cfg)  # real inverse frequencies (to_empty left them uninitialized)
    model.save_pretrained(str(directory), max_shard_size="40MB")
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_well_below_model_size(env, tmp_path):
    size_mib = _write_big_model(tmp_path / "big") / 2**20
    assert len(list((tmp_path / "big").glob("*.safetensors"))) > 3 and size_mib > 250
    # weight-only W4 RTN with rotation: quantized, written, exported layer by layer (--stream --export), then the
    # saved model exported again from its grids (--load_qmodel_path --export) and evaluated streaming
    flags = ["--dtype", "float32", "--device", "cpu", "--seqlen", "32", "--bsz", "8", "--eval_dataset",
             str(write_text(tmp_path / "eval.txt", 150)), "--stream", "--rotate", "--w_bits", "4", "--w_rtn"]
    code = RUNNER.format(repo=str(REPO), flags=flags, warm=str(env["models"]["llama"]), big=str(tmp_path / "big"),
                         out=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    streamed, loaded = mem["streamed"] - mem["base"], mem["loaded"] - mem["base"]
    print(f"model {size_mib:.0f} MiB: peak RSS growth streamed + export {streamed:.0f} MiB, export of the saved "
          f"model {mem['exported']:.0f} MiB, whole-model load {loaded:.0f} MiB")
    assert loaded > 0.9 * size_mib, mem  # a whole-model load is visible to this measurement
    assert streamed < size_mib / 4, (f"streamed quantization + evaluation grew the peak RSS by {streamed:.0f} MiB "
                                     f"for a {size_mib:.0f} MiB model", mem)
    assert mem["exported"] < size_mib / 4, mem
    assert json.loads((tmp_path / "out" / "big" / "results.json").read_text())["quantization"]["method"] == "rtn"
    out = tmp_path / "out"
    assert len(list((out / "big_gptq").glob("model-*.safetensors"))) == 49  # outer + one shard per layer
    index = json.loads((out / "big_gptq" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.47.mlp.down_proj.qweight"] == "model-00049-of-00049.safetensors"
    assert json.loads((out / "big_gptq_saved" / "model.safetensors.index.json").read_text())["weight_map"] == index


# ---------------------------------------------------------------------------------------------- e2e benchmark

SMOKE = textwrap.dedent("""
    import builtins, json, sys
    sys.path.insert(0, {repo!r})
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # the GPU machine has neither package
        if name.split(".")[0] in ("datasets", "lm_eval"):
            raise ImportError(f"{{name}} is not available")
        return real_import(name, *args, **kwargs)

    builtins.__import__ = no_datasets
    import os, torch
    from bench.e2e_llm import SMOKE, main, make_random_checkpoint, model_config
    main(["--smoke", "--methods", "gptaq", "--model_dir", {model!r}, "--json", {json!r}])
    stamp = os.stat({model!r} + "/model.safetensors.index.json").st_mtime_ns
    make_random_checkpoint({model!r}, model_config(SMOKE, 2), torch.float32, torch.device("cpu"))  # reused
    print(json.dumps(stamp == os.stat({model!r} + "/model.safetensors.index.json").st_mtime_ns))
""")


def test_e2e_benchmark_smoke(tmp_path):
    code = SMOKE.format(repo=str(REPO), model=str(tmp_path / "model"), json=str(tmp_path / "e2e.json"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| gptaq | 2 |" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is True  # the checkpoint is reused, not rebuilt
    result = json.loads((tmp_path / "e2e.json").read_text())
    (row,) = result["rows"]
    assert row["method"] == "gptaq" and row["tokens"] == 4 * 64 and len(row["block_times"]) == 2
    phases = row["capture_s"] + row["solve_s"] + row["forward_s"]
    assert row["solve_s"] > 0 and row["capture_s"] > 0 and phases <= row["quantize_s"] + 0.02
    assert row["ppl_random_model"] > 1 and row["eval_s"] > 0 and row["peak_gpu_quantize_gib"] is None
    assert result["memory_estimate_gib"]["gptaq"]["total"] > 0 and result["settings"]["flags"][0] == "--rotate"
    assert not list(tmp_path.glob(".e2e_*")) and (tmp_path / "model" / "model.safetensors.index.json").is_file()


def test_shard_reader_matches_safetensors(tmp_path):
    """streaming._read_shard (readinto, GIL released) returns exactly what safetensors' own reader does."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).half(),
               "c": torch.randn(2, 2, 2, generator=g).bfloat16(), "d": torch.arange(6).reshape(2, 3),
               "e": torch.tensor(2.5), "f": torch.zeros(0, 4), "g": torch.tensor([True, False])}
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    got = streaming._read_shard(path, list(tensors))
    with safe_open(path, framework="pt") as f:
        for k in tensors:
            want = f.get_tensor(k)
            assert got[k].dtype == want.dtype and got[k].shape == want.shape and torch.equal(got[k], want), k
    save_file({"h": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "y.safetensors"))
    assert streaming._read_shard(str(tmp_path / "y.safetensors"), ["h"]) is None  # left to safetensors


def test_checkpoint_writer_keeps_two_shards_in_flight_and_raises_a_failed_one(tmp_path, monkeypatch):
    """write returns while the previous shard is still being written (IN_FLIGHT = 2: a layer's model and grid shards
    overlap the next layer), files are written in order with their index, a failed shard's error is raised by a
    later call, and abort leaves nothing behind."""
    import threading

    save = streaming._save_shard
    release, started = threading.Event(), []

    def held(box, ready, path):
        started.append(os.path.basename(path))
        if len(started) == 1:
            assert release.wait(30)
        save(box, ready, path)
        assert box == []  # the pending future keeps no reference to the tensors (on CUDA: their device copies)

    monkeypatch.setattr(streaming, "_save_shard", held)
    w = streaming.CheckpointWriter(str(tmp_path / "out"), {"model": 2, "grids": 1})
    w.write({"a": torch.ones(2)})
    w.write({"g": torch.zeros(3)}, "grids")  # returns although the first shard is still held
    assert not release.is_set() and len(w._pending) == 2
    release.set()
    w.write({"b": torch.full((2,), 2.0)})  # waits for the oldest only
    path = w.publish()
    assert started == ["model-00001-of-00002.safetensors", "grids-00001-of-00001.safetensors",
                       "model-00002-of-00002.safetensors"]
    index = json.loads(Path(path, "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert torch.equal(load_file(os.path.join(path, "grids-00001-of-00001.safetensors"))["g"], torch.zeros(3))

    def broken(box, ready, path):
        raise OSError("disk full")

    monkeypatch.setattr(streaming, "_save_shard", broken)
    w = streaming.CheckpointWriter(str(tmp_path / "out2"), {"model": 3})
    w.write({"a": torch.ones(1)})
    w.write({"b": torch.ones(1)})
    with pytest.raises(OSError, match="disk full"):
        w.write({"c": torch.ones(1)})  # the oldest shard's error, raised when waiting for it
    w.abort()
    assert not (tmp_path / "out2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]
