"""Fault injection (issue 17): nothing silently wrong.  One section per class of the issue, on tiny models built
here (CPU): 1 unwritable outputs are found before any model loads; 2 checkpoints that do not hold exactly their
config's tensors are refused; 3 non-finite metrics fail the run (exit 1, recorded in results.json, the tensor
named); 4 --resume checks the model's contents and the calibration data, a lock keeps a second run out, a finished
run is marked complete; 5 corrupt inputs are one line naming the file, exit 2; 6 Ctrl-C is one line and exit 130
with nothing hidden left behind; 7 flags that do nothing warn (or are refused) the same way in every front end;
8 hub names offline fail in seconds and name the local-file flag; 9 exit status 2 for input errors, ordinary file
permissions, a warning for a --seqlen beyond the model's positions."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.cli.exits import run_main
from common.io.lock import RunLock
from common.models import hub, llm
from common.pipeline import resume as resume_mod
from fixtures import make_tiny_causal_lm, write_text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main as fq_main  # noqa: E402
from spinquant.main import main as sq_main  # noqa: E402
from vit_quant.main import main as vit_main  # noqa: E402

GPTQ = ["--w_bits", "4"]
RTN = ["--w_bits", "4", "--w_rtn"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from common.models.hadamard import random_hadamard_matrix
    from common.models.rotation_io import save_rotations

    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_causal_lm("llama", root / "llama")
    other = make_tiny_causal_lm("llama", root / "other", seed=1)  # same shapes, other weights
    cal = write_text(root / "cal.txt", 3000, seed=0)
    ev = write_text(root / "eval.txt", 150, seed=1)
    rot = save_rotations(root / "R.bin", random_hadamard_matrix(64, 0), [random_hadamard_matrix(16, 1)] * 2,
                         model="tiny")
    return {"root": root, "model": str(model), "other": str(other), "cal": str(cal), "eval": str(ev),
            "rot": str(rot)}


def _argv(env, out, *extra, model=None) -> list[str]:
    return ["--model", str(model or env["model"]), "--dtype", "float32", "--device", "cpu", "--nsamples", "4",
            "--seqlen", "32", "--bsz", "2", "--cal_dataset", env["cal"], "--eval_dataset", env["eval"],
            "--output_dir", str(out), *extra]


def _fails(capsys, main, argv) -> tuple[int, str]:
    """Run a front end as its __main__ does; (exit status, the one line it printed on stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main([str(a) for a in argv]))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()
             and not line.startswith(("Loading weights", "Writing model"))]
    assert lines, "no message on stderr"
    return e.value.code, lines[-1]


def _input_error(capsys, main, argv, *expect) -> str:
    code, msg = _fails(capsys, main, argv)
    assert code == 2, msg
    for text in expect:
        assert text in msg, msg
    return msg


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the input was validated")
    for name in ("load_model", "load_tokenizer", "load_quantized"):
        monkeypatch.setattr(llm, name, refuse)
    from common.models import vit
    monkeypatch.setattr(vit, "create_model", refuse)


def _copy_model(env, tmp_path, name="m") -> Path:
    dst = tmp_path / name
    shutil.copytree(env["model"], dst)
    return dst


def _edit_config(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def _leftovers(root: Path) -> list[str]:
    """Hidden entries (temporary folders, locks) and *.tmp files anywhere below root."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------- vit assets

VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                                "num_classes": 2})


@pytest.fixture(scope="module")
def vit_env(tmp_path_factory):
    timm = pytest.importorskip("timm")
    from PIL import Image

    root = tmp_path_factory.mktemp("vit_faults")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 255, (36, 36, 3)).astype("uint8")
                Image.fromarray(img).save(root / "data" / split / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in timm.create_model(VIT[0], pretrained=False, **VIT[1]).state_dict().items()}
    save_file(sd, str(root / "vit.safetensors"))
    sd["head.weight"][0, 0] = float("nan")
    save_file(sd, str(root / "nan.safetensors"))
    return {"root": root, "data": str(root / "data"), "ckpt": str(root / "vit.safetensors"),
            "nan": str(root / "nan.safetensors")}


def _vit_argv(vit_env, out, *extra, ckpt=None) -> list[str]:
    argv = ["--model", VIT[0], "--model_kwargs", json.dumps(VIT[1]), "--data_path", vit_env["data"],
            "--nsamples", "4", "--bsz", "4", "--workers", "0", "--device", "cpu", "--output_dir", str(out), *extra]
    return argv + ([] if ckpt == "" else ["--checkpoint", ckpt or vit_env["ckpt"]])


# ------------------------------------------------------------------------------------- 1 outputs


@pytest.mark.parametrize("flag", ["--output_dir", "--save_qmodel_path", "--export"])
def test_1_unwritable_llm_outputs_are_found_before_loading(env, tmp_path, capsys, nothing_loads, flag):
    (tmp_path / "afile").write_text("x")
    bad = {"--output_dir": tmp_path / "afile" / "out", "--save_qmodel_path": tmp_path / "afile" / "q",
           "--export": "/proc/gptaq_export"}[flag]
    argv = _argv(env, tmp_path / "out", *RTN)
    argv = [str(bad) if a == str(tmp_path / "out") and flag == "--output_dir" else a for a in argv]
    if flag != "--output_dir":
        argv += [flag, str(bad)]
    _input_error(capsys, fq_main, argv, flag, str(bad))
    assert not (tmp_path / "out").exists()


def test_1_unwritable_outputs_spinquant_and_vit(env, vit_env, tmp_path, capsys, nothing_loads):
    (tmp_path / "afile").write_text("x")
    _input_error(capsys, sq_main, _argv(env, tmp_path / "afile" / "o", *RTN, "--optimized_rotation_path",
                                        env["rot"]), "--output_dir", "is a file")
    _input_error(capsys, vit_main, _vit_argv(vit_env, "/proc/gptaq_out", *RTN), "--output_dir", "not writable")


# ------------------------------------------------------------------------------------- 2 strict loads


@pytest.mark.parametrize("stream", [False, True])
def test_2_missing_and_misshaped_tensors_are_refused(env, tmp_path, capsys, stream):
    extra = RTN + (["--stream"] if stream else [])
    deeper = _copy_model(env, tmp_path, "deeper")
    _edit_config(deeper, num_hidden_layers=3)
    _input_error(capsys, fq_main, _argv(env, tmp_path / "o1", *extra, model=deeper), "--model",
                 "missing tensor(s): model.layers.2.")
    wider = _copy_model(env, tmp_path, "wider")
    _edit_config(wider, intermediate_size=128)
    _input_error(capsys, fq_main, _argv(env, tmp_path / "o2", *extra, model=wider), "mis-shaped",
                 "mlp.down_proj.weight [64, 96] (model: [64, 128])")
    extra_tensor = _copy_model(env, tmp_path, "extra")
    sd = load_file(str(extra_tensor / "model.safetensors"))
    save_file({**sd, "model.layers.0.mlp.bogus.weight": torch.zeros(2, 2)}, str(extra_tensor / "model.safetensors"))
    _input_error(capsys, fq_main, _argv(env, tmp_path / "o3", *extra, model=extra_tensor),
                 "unexpected tensor(s): model.layers.0.mlp.bogus.weight")
    assert not any((tmp_path / o / "results.json").exists() for o in ("o1", "o2", "o3"))


def test_2_vit_checkpoint_missing_keys(vit_env, tmp_path, capsys):
    sd = load_file(vit_env["ckpt"])
    del sd["blocks.0.mlp.fc2.weight"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    _input_error(capsys, vit_main, _vit_argv(vit_env, tmp_path / "o", ckpt=str(tmp_path / "partial.safetensors")),
                 "--checkpoint", "1 missing tensor(s): blocks.0.mlp.fc2.weight")


# ------------------------------------------------------------------------------------- 3 non-finite metrics


def test_3_nan_perplexity_fails_and_is_recorded(env, tmp_path, capsys):
    nan = _copy_model(env, tmp_path, "nan")
    sd = load_file(str(nan / "model.safetensors"))
    sd["lm_head.weight"][3, 5] = float("nan")
    save_file(sd, str(nan / "model.safetensors"))
    code, msg = _fails(capsys, fq_main, _argv(env, tmp_path / "o", "--w_bits", "16", model=nan))
    assert code == 1 and "non-finite result: perplexity" in msg and "lm_head.weight (1 of" in msg, msg
    record = json.loads((tmp_path / "o" / "results.json").read_text())
    assert record["status"] == "failed" and "lm_head.weight" in record["error"]


def test_3_nan_accuracy_fails_and_is_recorded(vit_env, tmp_path, capsys):
    code, msg = _fails(capsys, vit_main, _vit_argv(vit_env, tmp_path / "o", ckpt=vit_env["nan"]))
    assert code == 1 and "top1 = nan" in msg and "head.weight" in msg, msg
    assert json.loads((tmp_path / "o" / "results.json").read_text())["status"] == "failed"


def test_3_locating_non_finite_values():
    from common.eval.finite import NonFiniteError, check_metrics

    check_metrics({"ppl": 12.5, "n": 3})
    layers = [{"block": 0, "name": "fc1", "loss": 0.1}, {"block": 1, "name": "fc2", "loss": float("inf")}]
    with pytest.raises(NonFiniteError, match="block 1, linear fc2"):
        check_metrics({"ppl": float("nan")}, torch.nn.Linear(2, 2), layers)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.fill_(3e38)  # finite weights whose output overflows to inf
    with pytest.raises(NonFiniteError, match="values are in 0$"):
        check_metrics({"top1": float("nan")}, net, [], lambda: net(torch.ones(1, 2)))


# ------------------------------------------------------------------------------------- 4 resume


def _stop_after_first_layer(argv: list[str]) -> int:
    """Run fake_quant with Ctrl-C arriving right after the first decoder layer's checkpoint; its exit status."""
    commit = resume_mod.ResumeState.commit

    def stop_after_first(self, next_block, *a, **k):
        commit(self, next_block, *a, **k)
        raise KeyboardInterrupt

    resume_mod.ResumeState.commit = stop_after_first
    try:
        with pytest.raises(SystemExit) as e:
            fq_main(argv)
    finally:
        resume_mod.ResumeState.commit = commit
    return e.value.code


@pytest.fixture(scope="module")
def interrupted(env, tmp_path_factory):
    """A GPTQ --resume run stopped by Ctrl-C after its first decoder layer: (output dir, argv)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    argv = _argv(env, out, *GPTQ, "--resume")
    assert _stop_after_first_layer(argv) == 130
    return out, argv


def _clone(interrupted, tmp_path) -> tuple[Path, list[str]]:
    out, argv = interrupted
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", [str(tmp_path / "run") if a == str(out) else a for a in argv]


def test_4_resume_checks_model_contents_and_data_then_finishes(env, tmp_path, capsys):
    model = _copy_model(env, tmp_path, "model")
    out = tmp_path / "run"
    argv = _argv(env, out, *GPTQ, "--resume", model=model)
    assert _stop_after_first_layer(argv) == 130
    assert json.loads((out / "resume" / "state.json").read_text())["next_block"] == 1
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    shutil.copy(Path(env["other"]) / "model.safetensors", weights)  # other weights, same shapes, same path
    _input_error(capsys, fq_main, argv, "--resume", "model_files.model.safetensors")
    weights.write_bytes(original)
    text = tmp_path / "cal2.txt"
    text.write_text(Path(env["cal"]).read_text().replace("the", "a"))
    _input_error(capsys, fq_main, [str(text) if a == env["cal"] else a for a in argv], "calibration_sha256")
    result = fq_main(argv)  # unchanged inputs: continues from layer 1 and finishes
    assert len(result["layers"]) == 14
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["complete"] is True and state["next_block"] == 2
    assert not (out / ".lock").exists()


def test_4_second_run_on_the_same_output_dir_is_refused(env, tmp_path, capsys):
    with RunLock(tmp_path / "o"):
        _input_error(capsys, fq_main, _argv(env, tmp_path / "o", *RTN), "--output_dir", f"pid {os.getpid()}",
                     "in use by another run")
    assert not (tmp_path / "o").exists()  # the lock's folder is gone again, nothing was written


# ------------------------------------------------------------------------------------- 5 corrupt inputs


def _corrupt_model(env, tmp_path, how: str) -> Path:
    d = _copy_model(env, tmp_path)
    weights = d / "model.safetensors"
    if how == "config":
        (d / "config.json").write_text("{not json")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "zeroed":
        weights.write_bytes(bytes(weights.stat().st_size))
    elif how == "no_weights":
        weights.unlink()
    elif how == "tokenizer":
        (d / "tokenizer.json").write_text("{\"version\": ")
    return d


@pytest.mark.parametrize("how, expect", [
    ("config", "config.json"), ("truncated", "is truncated"), ("zeroed", "not a safetensors file"),
    ("no_weights", "has neither model.safetensors"), ("tokenizer", "tokenizer"),
])
def test_5_corrupt_model_files(env, tmp_path, capsys, how, expect):
    d = _corrupt_model(env, tmp_path, how)
    msg = _input_error(capsys, fq_main, _argv(env, tmp_path / "o", *RTN, model=d), "--model", expect)
    assert str(d) in msg


@pytest.mark.parametrize("content, expect", [
    (b"\xff\xfe\x00\x81binary" * 50, "not UTF-8 text"), (bytes(4000), "NUL bytes"),
    ('{"text": "fine"}\n{"text": broken\n', "cal.jsonl:2: not valid JSON"),
    (None, "holds no data files"),
])
def test_5_corrupt_data(env, tmp_path, capsys, content, expect):
    if content is None:
        path = tmp_path / "not_a_dataset"
        path.mkdir()
        (path / "notes.md").write_text("x")
    else:
        path = tmp_path / ("cal.jsonl" if isinstance(content, str) else "cal.txt")
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    argv = [str(path) if a == env["cal"] else a for a in _argv(env, tmp_path / "o", *GPTQ)]
    assert "--cal_dataset" in argv and str(path) in argv
    msg = _input_error(capsys, fq_main, argv, expect)
    assert str(path) in msg or "--cal_dataset" in msg


@pytest.fixture(scope="module")
def saved(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    fq_main(_argv(env, root / "run", *RTN, "--save_qmodel_path", str(root / "q")))
    return root


def test_5_corrupt_saved_model(env, saved, tmp_path, capsys):
    q = tmp_path / "q"
    shutil.copytree(saved / "q", q)
    load = ["--load_qmodel_path", str(q), "--device", "cpu", "--seqlen", "32", "--eval_dataset", env["eval"],
            "--output_dir", str(tmp_path / "o")]
    spec = json.loads((q / "gptaq_quant.json").read_text())
    (q / "gptaq_quant.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "act_quant"}))
    _input_error(capsys, fq_main, load, "--load_qmodel_path", "does not describe the quantizers")
    (q / "gptaq_quant.json").write_text(json.dumps(spec))
    weights = q / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _input_error(capsys, fq_main, load, "--load_qmodel_path", "is truncated")
    _input_error(capsys, fq_main, load + ["--stream"], "--load_qmodel_path", "is truncated")


@pytest.mark.parametrize("damage, expect", [
    ("state_list", "expected a JSON object"), ("state_field", "field 'next_block'"),
    ("streams", "missing or truncated"), ("layer", "layer_0000.pt is missing or truncated"),
])
def test_5_corrupt_resume_state(interrupted, tmp_path, capsys, monkeypatch, damage, expect):
    out, argv = _clone(interrupted, tmp_path)
    monkeypatch.setattr(llm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    state = out / "resume" / "state.json"
    if damage == "state_list":
        state.write_text("[1, 2]")
    elif damage == "state_field":
        state.write_text(json.dumps({**json.loads(state.read_text()), "next_block": "one"}))
    else:
        f = next((out / "resume").glob("streams_*.pt" if damage == "streams" else "layer_*.pt"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _input_error(capsys, fq_main, argv, "--resume", expect)


def test_5_truncated_vit_checkpoint(vit_env, tmp_path, capsys):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(Path(vit_env["ckpt"]).read_bytes()[:1000])
    _input_error(capsys, vit_main, _vit_argv(vit_env, tmp_path / "o", ckpt=str(bad)), "--checkpoint", str(bad))


# ------------------------------------------------------------------------------------- 6 interrupts


def test_6_interrupt_during_save_leaves_nothing_hidden(env, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(llm, "write_quant_file", interrupt)
    code, msg = _fails(capsys, fq_main, _argv(env, tmp_path / "o", *RTN, "--save_qmodel_path", tmp_path / "q"))
    assert code == 130 and msg.startswith("interrupted: nothing was kept") and "--resume" in msg, msg
    assert not (tmp_path / "q").exists() and not _leftovers(tmp_path), _leftovers(tmp_path)


def test_6_vit_interrupt(vit_env, tmp_path, capsys, monkeypatch):
    from common.runs import vit as vit_run

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(vit_run, "evaluate", interrupt)
    code, msg = _fails(capsys, vit_main, _vit_argv(vit_env, tmp_path / "o"))
    assert code == 130 and msg.startswith("interrupted:")
    assert not (tmp_path / "o").exists()


SLOW_AFTER_FIRST_LAYER = """
import sys, time
from common.pipeline import resume
commit = resume.ResumeState.commit
def slow(self, next_block, *a, **k):
    commit(self, next_block, *a, **k)
    time.sleep(60)
resume.ResumeState.commit = slow
from common.cli.exits import run_main
from fake_quant.main import main
run_main(lambda: main(sys.argv[1:]))
"""


def test_6_sigint_exits_130_with_what_to_resume(env, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_AFTER_FIRST_LAYER, *_argv(env, out, *GPTQ, "--resume")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while not (out / "resume" / "state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: 1 finished decoder layer(s) are checkpointed in") and "--resume" in last
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()


# ------------------------------------------------------------------------------------- 7 idle flags


@pytest.mark.parametrize("extra, warning", [
    (["--w_bits", "16", "--gptaq", "--act_order"], "--gptaq --act_order have no effect with --w_bits 16"),
    (["--k_pre_rope"], "--k_pre_rope has no effect with --k_bits 16"),
    (["--rotate_mode", "random"], "--rotate_mode has no effect without --rotate"),
    (["--w_bits", "4", "--alpha", "0.5"], "--alpha has no effect without --gptaq"),
    (["--w_bits", "4", "--w_rtn", "--act_order"], "--act_order has no effect with --w_rtn"),
])
def test_7_idle_flags_warn_in_llm_front_ends(env, tmp_path, extra, warning):
    from common.cli.llm import parse_args
    from spinquant.main import parse_args as sq_parse_args

    with pytest.warns(UserWarning, match=warning):
        parse_args(_argv(env, tmp_path, *extra))
    if "--rotate_mode" not in extra:  # spinquant implies --rotate
        with pytest.warns(UserWarning, match=warning):
            sq_parse_args(_argv(env, tmp_path, *extra, "--optimized_rotation_path", env["rot"]))


def test_7_same_rules_in_vit(env, vit_env, tmp_path, capsys):
    from common.cli.vit import parse_args

    with pytest.warns(UserWarning, match="--gptaq --act_order have no effect with --w_bits 16"):
        parse_args(_vit_argv(vit_env, tmp_path, "--gptaq", "--act_order"))
    with pytest.warns(UserWarning, match="--a_asym has no effect with --a_bits 16"):
        parse_args(_vit_argv(vit_env, tmp_path, "--a_asym"))
    for main, argv in ((vit_main, _vit_argv(vit_env, tmp_path, "--w_bits", "4")),
                       (fq_main, _argv(env, tmp_path, "--w_bits", "4"))):
        _input_error(capsys, main, argv + ["--alpha", "-1"], "--alpha")
        _input_error(capsys, main, argv + ["--static_groups"], "--static_groups needs --w_groupsize")


# ------------------------------------------------------------------------------------- 8 offline hub names


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda: False)


def test_8_offline_hub_names_fail_fast(env, vit_env, tmp_path, capsys, offline):
    t0 = time.time()
    argv = [("wikitext2" if a == env["cal"] else a) for a in _argv(env, tmp_path / "o1", *GPTQ)]
    _input_error(capsys, fq_main, argv, "--cal_dataset wikitext2", "not reachable", "local .txt")
    _input_error(capsys, fq_main, _argv(env, tmp_path / "o2", *RTN, model="nobody/no-such-model"),
                 "--model", "not reachable", "local model directory")
    _input_error(capsys, vit_main, _vit_argv(vit_env, tmp_path / "o3", ckpt=""), "not reachable", "--checkpoint")
    assert time.time() - t0 < 15


def test_8_offline_mode_is_switched_on_and_back(offline):
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with hub.offline_unless_reachable():
        assert constants.HF_HUB_OFFLINE is True and constants.is_offline_mode()
    assert constants.HF_HUB_OFFLINE == before


# ------------------------------------------------------------------------------------- 9 exits, modes, seqlen


def test_9_input_errors_exit_2_everywhere(env, vit_env, tmp_path, capsys):
    # (a weight group size need not divide the width: the last group is narrower; an activation one must)
    _input_error(capsys, fq_main, _argv(env, tmp_path, "--a_bits", "4", "--a_groupsize", "48"),
                 "--a_groupsize 48 does not divide")
    _input_error(capsys, sq_main, _argv(env, tmp_path, "--a_bits", "4", "--a_groupsize", "48",
                                        "--optimized_rotation_path", env["rot"]), "--a_groupsize 48 does not divide")
    _input_error(capsys, vit_main, _vit_argv(vit_env, tmp_path / "v", "--a_bits", "4", "--a_groupsize", "5"),
                 "--a_groupsize 5 does not divide")


def test_9_outputs_get_ordinary_permissions(env, saved):
    mask = os.umask(0)
    os.umask(mask)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(saved / "run" / "results.json") == 0o666 & ~mask
    assert mode(saved / "q") == 0o777 & ~mask
    assert all(mode(f) == 0o666 & ~mask for f in (saved / "q").iterdir())


def test_9_seqlen_beyond_the_model_positions_warns(env, tmp_path):
    from common.cli.llm import parse_args, validate_model_config

    args = parse_args(_argv(env, tmp_path, "--seqlen", "300"))
    with pytest.warns(UserWarning, match="--seqlen 300 exceeds the model's max_position_embeddings 256"):
        validate_model_config(args, llm.read_config(env["model"]))
