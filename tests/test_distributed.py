"""Multi-process quantization (torchrun, gloo on CPU): 2 processes, each with half of the calibration batches, give
exactly the weights, proxy losses and perplexity of 1 process; and the float64 sums behind that."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.pipeline import distributed
from common.pipeline.hessian import HessianAccumulator
from fixtures import make_tiny_causal_lm, write_text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as torchrun gives each worker: the same kernels in every process compared here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_hessian_accumulator_matches_float64_reference_and_any_split():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(24, 24, generator=g)
    xs = [torch.randn(3, 7, 24, generator=g) @ mix for _ in range(4)]
    fp = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    one, halves = HessianAccumulator(24, asymmetric=True), [HessianAccumulator(24, asymmetric=True) for _ in range(2)]
    for b, (x, f) in enumerate(zip(xs, fp)):
        one.add(x, f)
        halves[b % 2].add(x, f)
    X, F = torch.cat(xs).reshape(-1, 24).double(), torch.cat(fp).reshape(-1, 24).double()
    n = X.shape[0]
    assert one.nsamples == n
    assert torch.allclose(one.H.double(), 2 / n * X.T @ X, rtol=1e-6, atol=1e-6)
    assert torch.allclose(one.dXXT.double(), 2 / n * (F - X).T @ X, rtol=1e-6, atol=1e-6)
    # what all_reduce does across two ranks: add the raw sums, then scale by the total token count
    merged = HessianAccumulator(24, asymmetric=True)
    merged._S, merged._D = halves[0]._S + halves[1]._S, halves[0]._D + halves[1]._D
    merged.nsamples = halves[0].nsamples + halves[1].nsamples
    assert torch.equal(merged.H, one.H) and torch.equal(merged.dXXT, one.dXXT)
    with pytest.raises(RuntimeError, match="after H was read"):
        one.add(xs[0], fp[0])


def test_single_process_is_a_no_op():
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.owner(5) == 0
    assert distributed.init("cpu") == torch.device("cpu")
    t = torch.ones(3)
    distributed.broadcast_(t, 0)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_causal_lm("llama", root / "llama")
    cal = write_text(root / "cal.txt", 3000, seed=0)
    ev = write_text(root / "eval.txt", 500, seed=1)
    return {"root": root, "model": str(model), "cal": str(cal), "eval": str(ev)}


def _argv(env, out: Path) -> list[str]:
    return ["--model", env["model"], "--dtype", "float32", "--device", "cpu", "--nsamples", "6", "--seqlen", "32",
            "--bsz", "2", "--cal_dataset", env["cal"], "--eval_dataset", env["eval"], "--rotate", "--gptaq",
            "--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--v_bits", "4", "--w_clip", "--act_order",
            "--output_dir", str(out), "--save_qmodel_path", str(out / "qmodel")]


def _spinquant_argv(env, out: Path) -> list[str]:
    """spinquant/main.py with a rotation file of random orthogonal R1 / R2 (hidden 64, head_dim 16, 2 layers)."""
    from common.models.hadamard import random_orthogonal_matrix
    from common.models.rotation_io import save_rotations

    path = env["root"] / "R.bin"
    if not path.exists():
        save_rotations(path, random_orthogonal_matrix(64, 0).float(),
                       [random_orthogonal_matrix(16, 1 + i).float() for i in range(2)], model="tiny")
    return [a for a in _argv(env, out) if a != "--rotate"] + ["--optimized_rotation_path", str(path)]


@pytest.mark.parametrize("front_end", ["fake_quant", "spinquant"])
def test_two_gloo_processes_give_the_weights_of_one(env, tmp_path, front_end):
    if front_end == "fake_quant":
        argv = _argv
        one = main(argv(env, tmp_path / "one"))
    else:
        from spinquant.main import main as spinquant_main

        argv = _spinquant_argv
        one = spinquant_main(argv(env, tmp_path / "one"))
        assert one["rotation"]["kind"] == "spinquant"
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / front_end / "main.py"), *argv(env, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert proc.stdout.count("| model | method |") == 1  # only rank 0 prints and writes
    a = load_file(str(tmp_path / "one" / "qmodel" / "model.safetensors"))
    b = load_file(str(out / "qmodel" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert two["perplexity"] == one["perplexity"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in one["layers"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in two["layers"]] == strip
    assert all(r["tokens"] == 6 * 32 for r in two["layers"])  # statistics over the batches of both ranks
