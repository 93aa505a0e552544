"""--resume: a run killed (SIGKILL) after a decoder layer's checkpoint, or in the middle of one, and started again
with --resume ends with exactly the weights, proxy losses and perplexity of an uninterrupted run; a checkpoint of
another configuration is refused with a one-line error naming what differs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.models import llm
from common.pipeline.resume import differences
from fixtures import make_tiny_causal_lm, write_text
from test_distributed import one_thread  # noqa: F401 - autouse: one thread, as in the killed subprocess

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main  # noqa: E402

# Kill this process the moment the checkpoint reaches a given point: after the commit of `next_block`, or in the
# middle of it (streams written, state.json not yet).
KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from common.pipeline import resume
where, at = sys.argv[2], int(sys.argv[3])
commit, write_json = resume.ResumeState.commit, resume.write_json
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def killing_commit(self, next_block, *a, **k):
    commit(self, next_block, *a, **k)
    if where == "after" and next_block == at:
        die()
def killing_write_json(path, obj):
    if where == "during" and obj["next_block"] == at:
        die()
    return write_json(path, obj)
resume.ResumeState.commit, resume.write_json = killing_commit, killing_write_json
from fake_quant.main import main
main(sys.argv[4:])
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_causal_lm("llama", root / "llama3", num_hidden_layers=3)
    cal = write_text(root / "cal.txt", 3000, seed=0)
    ev = write_text(root / "eval.txt", 150, seed=1)
    return {"root": root, "model": str(model), "cal": str(cal), "eval": str(ev)}


def _argv(env, out: Path, *extra) -> list[str]:
    return ["--model", env["model"], "--dtype", "float32", "--device", "cpu", "--nsamples", "4", "--seqlen", "32",
            "--bsz", "2", "--cal_dataset", env["cal"], "--eval_dataset", env["eval"], "--rotate", "--rotate_mode",
            "random", "--rotation_seed", "3", "--gptaq", "--w_bits", "4", "--a_bits", "4", "--k_bits", "4",
            "--v_bits", "4", "--act_order", "--output_dir", str(out), "--save_qmodel_path", str(out / "qmodel"),
            *extra]


@pytest.fixture(scope="module")
def reference(env):
    out = env["root"] / "uninterrupted"
    return out, main(_argv(env, out))


def _without_seconds(layers: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in layers]


@pytest.mark.parametrize("where", ["after", "during"])
def test_killed_run_resumes_to_identical_weights(env, reference, tmp_path, where):
    ref_dir, ref = reference
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLER, str(REPO), where, "2", *_argv(env, out, "--resume")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((out / "resume" / "state.json").read_text())
    # killed after the commit of layer 1 -> 2 layers done; killed while committing it -> still 1 done
    assert state["next_block"] == (2 if where == "after" else 1)
    assert len(state["records"]) == 7 * state["next_block"]
    assert not (out / "results.json").exists() and not (out / "qmodel").exists()
    assert not list((out / "resume").glob("*.tmp"))

    resumed = main(_argv(env, out, "--resume"))
    assert resumed["perplexity"] == ref["perplexity"]
    assert _without_seconds(resumed["layers"]) == _without_seconds(ref["layers"])
    a = load_file(str(ref_dir / "qmodel" / "model.safetensors"))
    b = load_file(str(out / "qmodel" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["next_block"] == 3 and not list((out / "resume").glob("streams_*"))  # no streams after the end


@pytest.fixture(scope="module")
def finished(env):
    out = env["root"] / "finished"
    return out, main(_argv(env, out, "--resume"))


def test_finished_run_resumes_without_quantizing(env, reference, finished, tmp_path, monkeypatch):
    """A second --resume of a finished run loads every layer from the checkpoint (no solve) and evaluates."""
    from common import solver

    out, first = finished
    assert first["perplexity"] == reference[1]["perplexity"]
    monkeypatch.setattr(solver, "quantize_linear", lambda *a, **k: pytest.fail("a layer was solved again"))
    again = main(_argv(env, out, "--resume", "--save_qmodel_path", str(tmp_path / "q2")))
    assert again["perplexity"] == first["perplexity"]
    assert again["layers"] == first["layers"]


@pytest.mark.parametrize("extra, names", [
    (["--w_bits", "3"], "solver.bits: saved 4, now 3"),
    (["--rotation_seed", "4"], "rotation.seed: saved 3, now 4"),
    (["--nsamples", "6"], "nsamples: saved 4, now 6"),
    (["--seed", "1"], "calibration_sha256"),
])
def test_other_configuration_is_refused_before_loading(env, finished, monkeypatch, extra, names):
    monkeypatch.setattr(llm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(_argv(env, finished[0], "--resume", *extra))
    msg = str(e.value.code)
    assert msg.startswith("error: --resume:") and names in msg and "\n" not in msg


def test_differences_name_nested_keys():
    assert differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0}) == [
        "b.c: saved 2, now 3", "d: saved '<unset>', now 0"]


class _Toy(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_driver_replays_saved_results_for_an_export(tmp_path):
    """quantize_blocks(resume=...) on generic blocks: after an interruption the finished blocks' QuantResults
    (codes, scales, ...) reach on_quantized again, equal to an uninterrupted run's."""
    from common.quant.act_quant import ActQuantizer, wrap_linears
    from common.pipeline.driver import quantize_blocks
    from common.solver import SolverConfig
    from common.pipeline.resume import ResumeState

    def prepare(block):
        for w in wrap_linears(block).values():
            w.quantizer = ActQuantizer(bits=6)

    def run(resume=None, stop_at=None):
        torch.manual_seed(0)
        blocks = [_Toy() for _ in range(3)]
        inputs = [torch.randn(2, 5, 16) for _ in range(2)]
        got = {}

        def on_quantized(i, name, res):
            if i == stop_at:
                raise KeyboardInterrupt
            got[(i, name)] = res

        cfg = SolverConfig(method="gptaq", bits=3, group_size=8, act_order=True)
        recs = quantize_blocks(blocks, inputs, lambda b, x: b(x), lambda b: [["fc1"], ["fc2"]], cfg,
                               prepare_block=prepare, on_quantized=on_quantized, resume=resume)
        return blocks, recs, got

    ref_blocks, ref_recs, ref = run()
    state = ResumeState(tmp_path, {"toy": 1})
    with pytest.raises(KeyboardInterrupt):
        run(state, stop_at=2)
    assert state.check() == 2
    blocks, recs, got = run(state)
    assert got.keys() == ref.keys()
    for key, res in got.items():
        for field in ("weight", "codes", "scales", "zeros", "g_idx", "perm"):
            assert torch.equal(getattr(res, field), getattr(ref[key], field)), (key, field)
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref_recs]
    for a, b in zip(blocks, ref_blocks):
        assert torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.fc2.weight, b.fc2.weight)
