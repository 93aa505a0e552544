"""SpinQuant: Cayley SGD, rotation files, functional rotations, rotation training and the CLIs (tiny models, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.models.cayley import CayleySGD, orthogonality_error, reorthonormalize
from common.models.rotation_io import load_rotations, r2_key, save_rotations

ROOT = Path(__file__).resolve().parents[1]


def _orth(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return reorthonormalize(torch.randn(n, n, generator=g, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------- optimizer

@pytest.mark.parametrize("dtype,retraction,reorth,momentum", [
    (torch.float64, "exact", 0, 0.0),
    (torch.float32, "exact", 0, 0.0),        # float64 solve, float32 storage, no re-orthonormalisation
    (torch.float64, "exact", 0, 0.9),
    (torch.float32, "fixed_point", 10, 0.0),  # the iterative retraction drifts (~1e-4) unless re-orthonormalised
])
def test_cayley_stays_orthogonal_and_descends(dtype, retraction, reorth, momentum):
    target, R = _orth(48, 1, dtype), torch.nn.Parameter(_orth(48, 2, dtype))
    opt = CayleySGD([R], lr=0.5, momentum=momentum, retraction=retraction, reorth_every=reorth)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ((R - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert orthogonality_error(R) < 1e-5
    assert losses[-1] < 0.05 * losses[0]


def test_cayley_solves_procrustes():
    """Orthogonal Procrustes min ||R A - B||^2 has the closed form U V^T of svd(B A^T); Cayley SGD reaches it.

    The Cayley map keeps det R, so the target is taken in SO(n) like the start R = I.  With lr above the step
    bound the step length is fixed (a = 1/||A||_1), so, as in SpinQuant, lr decays linearly to 0.
    """
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 200, generator=g, dtype=torch.float64)
    T = _orth(16, 3)
    T[:, 0] *= torch.linalg.det(T).sign()
    B = T @ A + 0.01 * torch.randn(16, 200, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(B @ A.T)
    best = ((U @ Vh @ A - B) ** 2).sum().item()
    R = torch.nn.Parameter(torch.eye(16, dtype=torch.float64))
    opt = CayleySGD([R], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 200)
    for _ in range(200):
        opt.zero_grad()
        loss = ((R @ A - B) ** 2).sum()
        loss.backward()
        opt.step()
        sched.step()
    assert loss.item() < best * 1.01 + 1e-6
    assert orthogonality_error(R) < 1e-10


def test_cayley_rejects_bad_parameters():
    with pytest.raises(ValueError, match="square"):
        CayleySGD([torch.nn.Parameter(torch.zeros(3, 4))], lr=1.0)
    with pytest.raises(ValueError, match="not orthogonal"):
        CayleySGD([torch.nn.Parameter(2 * torch.eye(4))], lr=1.0)
    with pytest.raises(ValueError, match="retraction"):
        CayleySGD([torch.nn.Parameter(torch.eye(4))], lr=1.0, retraction="qr")


# ---------------------------------------------------------------- rotation files

class _Cfg:
    hidden_size, num_attention_heads, num_hidden_layers, head_dim = 32, 4, 3, 8


def test_rotation_file_round_trip_and_mismatch(tmp_path):
    R1, R2 = _orth(32, 0, torch.float32), [_orth(8, i + 1, torch.float32) for i in range(3)]
    path = save_rotations(tmp_path / "R.bin", R1, R2, model="tiny", bits={"w_bits": 4, "a_bits": 4})
    assert not list(tmp_path.glob("*.tmp"))
    rot = load_rotations(path, _Cfg())
    assert torch.equal(rot.R1, R1) and all(torch.equal(a, b) for a, b in zip(rot.R2, R2))
    assert rot.meta["model"] == "tiny" and rot.meta["bits"]["w_bits"] == 4 and rot.meta["num_layers"] == 3
    assert load_rotations(tmp_path, _Cfg()).hidden_size == 32  # a directory means <dir>/R.bin

    class Wide(_Cfg):
        hidden_size = 64

    class Deep(_Cfg):
        num_hidden_layers = 4

    for cfg in (Wide(), Deep()):
        with pytest.raises(ValueError, match="does not fit the model.*made for tiny"):
            load_rotations(path, cfg)


def test_published_layout_is_accepted(tmp_path):
    R1, R2 = _orth(32, 0, torch.float32), [_orth(8, i + 1, torch.float32) for i in range(3)]
    state = {"R1": R1, **{f"model.layers.{i}.self_attn.R2": r for i, r in enumerate(R2)}}
    torch.save(state, tmp_path / "R.bin")
    rot = load_rotations(tmp_path / "R.bin", _Cfg())
    assert rot.meta == {} and torch.equal(rot.R2[2], R2[2])
    # our files are readable by the published loader (same keys)
    ours = torch.load(save_rotations(tmp_path / "ours.bin", R1, R2, model="m"), weights_only=True)
    assert torch.equal(ours["R1"], R1) and torch.equal(ours[r2_key(1)], R2[1])
    # a file with only R1 is fine (R2 = None); a partial R2 set or a non-orthogonal matrix is not
    torch.save({"R1": R1}, tmp_path / "r1.bin")
    assert load_rotations(tmp_path / "r1.bin", _Cfg()).R2 is None
    torch.save({"R1": R1, r2_key(0): R2[0], r2_key(2): R2[2]}, tmp_path / "gap.bin")
    with pytest.raises(ValueError, match=r"lacks R2 for layers \[1\]"):
        load_rotations(tmp_path / "gap.bin")
    torch.save({"R1": 2 * R1}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="not orthogonal"):
        load_rotations(tmp_path / "bad.bin")
    torch.save({"X": R1}, tmp_path / "nor1.bin")
    with pytest.raises(ValueError, match="no tensor 'R1'"):
        load_rotations(tmp_path / "nor1.bin")
    with pytest.raises(FileNotFoundError):
        load_rotations(tmp_path / "missing.bin")


# ---------------------------------------------------------------- functional rotations and training (tiny Llama)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fixtures import make_tiny_causal_lm, write_text

    root = tmp_path_factory.mktemp("spinquant")
    model_dir = make_tiny_causal_lm("llama", root / "llama")
    write_text(root / "cal.txt", 4000, seed=1)
    write_text(root / "eval.txt", 400, seed=2)
    return root, model_dir


def _load(model_dir):
    from common.models.llm import load_model

    return load_model(str(model_dir), "float32")


def _ids(n=2, seqlen=32, seed=0):
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_rotated_16bit_model_equals_original_and_the_functional_model(tiny):
    from common.models import rotation
    from common.models.rotation_io import RotationSet
    from spinquant.main import learned_rotation
    from spinquant.optimize_rotation import Rotations, attach_rotations

    _, model_dir = tiny
    ids = _ids()
    ref = _load(model_dir)(input_ids=ids).logits
    R1, R2 = _orth(64, 5, torch.float32), [_orth(16, 6 + i, torch.float32) for i in range(2)]
    folded = _load(model_dir)
    learned_rotation(RotationSet(R1, R2), folded.config, rotation_seed=0).apply(folded)  # what the pipeline calls
    out = folded(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert torch.allclose(folded.model.embed_tokens.weight, _load(model_dir).model.embed_tokens.weight @ R1,
                          atol=1e-5)
    functional = _load(model_dir)
    rotation.rotate_model(functional, torch.eye(64), None)
    attach_rotations(functional, Rotations(R1, R2))
    out_f = functional(input_ids=ids).logits
    assert ((out_f - out).norm() / ref.norm()).item() < 1e-4


def test_training_lowers_the_quantized_loss(tiny):
    from common.models.kv_quant import KVQuantConfig
    from common.models.llm import ActQuantSettings
    from spinquant.optimize_rotation import Rotations, build_training_model, quantized_loss, train_rotations

    _, model_dir = tiny
    model = _load(model_dir)
    rot = Rotations.random_hadamard(64, 16, 2, seed=0)
    start = [p.detach().clone() for p in rot.parameters()]
    build_training_model(model, rot, weight_quant=dict(bits=3, sym=True, mse=False, group_size=-1),
                         act=ActQuantSettings(bits=3), kv=KVQuantConfig(k_bits=3, v_bits=3, rotate_qk=True))
    assert all(not p.requires_grad for p in model.parameters())
    ids = _ids(2, 32, seed=3)
    with torch.no_grad():
        before = quantized_loss(model, ids).item()
    hist = train_rotations(model, rot, ids, iters=5, lr=1.5, bsz=2, micro_bsz=1, progress=False)
    with torch.no_grad():
        after = quantized_loss(model, ids).item()
    assert len(hist) == 5 and hist[0]["lr"] == 1.5 and hist[-1]["lr"] < 1.5
    assert after < before - 0.01, (before, after, [h["loss"] for h in hist])
    assert rot.max_orthogonality_error() < 1e-5
    assert all(not torch.equal(a, b) for a, b in zip(start, rot.parameters()))


# ---------------------------------------------------------------- command lines

def _run(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_cli_train_then_gptq_and_gptaq(tiny, tmp_path):
    from common.models.llm import read_config
    from spinquant import main as sq_main

    root, model_dir = tiny
    rpath = tmp_path / "R.bin"
    res = _run("spinquant/optimize_rotation.py", "--model", model_dir, "--w_bits", 16, "--a_bits", 4,
               "--k_bits", 4, "--v_bits", 4, "--cal_dataset", root / "cal.txt", "--nsamples", 4, "--seqlen", 32,
               "--iters", 2, "--bsz", 2, "--output_rotation_path", rpath, "--output_dir", tmp_path / "train")
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((tmp_path / "train" / "results.json").read_text())
    assert len(rec["history"]) == 2 and rec["rotation_path"] == str(rpath) and rec["ortho_err"] < 1e-5
    rot = load_rotations(rpath, read_config(str(model_dir)))
    assert rot.meta["bits"] == {"w_bits": 16, "a_bits": 4, "k_bits": 4, "v_bits": 4} and len(rot.R2) == 2

    common = ["--model", str(model_dir), "--optimized_rotation_path", str(rpath), "--w_bits", "4", "--a_bits", "4",
              "--k_bits", "4", "--v_bits", "4", "--cal_dataset", str(root / "cal.txt"), "--eval_dataset",
              str(root / "eval.txt"), "--nsamples", "4", "--seqlen", "32", "--dtype", "float32", "--device", "cpu"]
    ppl = {}
    for method in ("gptq", "gptaq"):
        out_dir = tmp_path / method
        result = sq_main.main(common + ["--output_dir", str(out_dir)] + (["--gptaq"] if method == "gptaq" else []))
        saved = json.loads((out_dir / "results.json").read_text())
        assert saved["quantization"]["method"] == method and saved["quantization"]["rotate"] is True
        assert saved["rotation"]["path"] == str(rpath) and saved["rotation"]["has_r2"]
        assert saved["config"]["optimized_rotation_path"] == str(rpath)
        ppl[method] = result["perplexity"][str(root / "eval.txt")]
        assert 1.0 < ppl[method] < 1e4
    assert ppl["gptq"] != ppl["gptaq"]


def test_two_gloo_processes_train_the_rotations_of_one(tiny, tmp_path):
    """torchrun data parallelism: 2 processes, each with half of every step's samples, follow the single-process
    optimisation (same losses and rotations up to float summation order); only rank 0 writes."""
    from common.models.llm import read_config

    root, model_dir = tiny
    args = ["--model", model_dir, "--w_bits", 16, "--a_bits", 4, "--k_bits", 4, "--v_bits", 4, "--cal_dataset",
            root / "cal.txt", "--nsamples", 4, "--seqlen", 32, "--iters", 3, "--bsz", 2, "--lr", 1.0,
            "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               str(ROOT / "spinquant" / "optimize_rotation.py"), *map(str, args),
               "--output_rotation_path", str(out / "R.bin"), "--output_dir", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("wrote") == 1  # rank 0 alone writes
        runs[n] = (json.loads((out / "results.json").read_text()), load_rotations(out / "R.bin",
                                                                                  read_config(str(model_dir))))
    (rec1, rot1), (rec2, rot2) = runs[1], runs[2]
    assert rec2["world_size"] == 2 and rec1["world_size"] == 1
    assert [h["loss"] for h in rec2["history"]] == pytest.approx([h["loss"] for h in rec1["history"]], rel=1e-5)
    assert torch.allclose(rot2.R1, rot1.R1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(rot2.R2, rot1.R2))
    assert rec1["history"][-1]["loss"] != rec1["history"][0]["loss"]  # the rotations did move


def _one_line_exit(capsys, entry, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        entry([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0, err
    return err


def test_bad_inputs_exit_with_one_line(tiny, tmp_path, capsys):
    from spinquant import main as sq_main
    from spinquant import optimize_rotation as sq_opt

    root, model_dir = tiny
    base = ["--model", model_dir, "--w_bits", 4, "--cal_dataset", root / "cal.txt"]
    err = _one_line_exit(capsys, sq_main.main, base + ["--optimized_rotation_path", tmp_path / "nope.bin"])
    assert "--optimized_rotation_path" in err and "does not exist" in err

    save_rotations(tmp_path / "wide.bin", _orth(128, 0), [_orth(16, 1)] * 2, model="other")
    err = _one_line_exit(capsys, sq_main.main, base + ["--optimized_rotation_path", tmp_path / "wide.bin"])
    assert "hidden_size 128" in err and "hidden_size 64" in err and "made for other" in err

    err = _one_line_exit(capsys, sq_opt.main, ["--model", tmp_path / "missing_model", "--a_bits", 4,
                                               "--output_rotation_path", tmp_path / "R.bin"])
    assert "--model" in err
    err = _one_line_exit(capsys, sq_opt.main, ["--model", model_dir, "--output_rotation_path", tmp_path / "R.bin"])
    assert "nothing is quantized" in err
    err = _one_line_exit(capsys, sq_opt.main, ["--model", model_dir, "--a_bits", 4, "--cal_dataset",
                                               tmp_path / "none.txt", "--output_rotation_path", tmp_path / "R.bin"])
    assert "--cal_dataset" in err
    assert not (tmp_path / "R.bin").exists()
