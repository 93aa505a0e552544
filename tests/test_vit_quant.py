"""vit_quant end to end on tiny random timm models (ViT, DeiT distilled, EVA-02) and a generated ImageFolder (CPU)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

timm = pytest.importorskip("timm")

from common.models import vit  # noqa: E402
from common.quant.act_quant import ActQuantLinear  # noqa: E402
from common.cli.vit import parse_args  # noqa: E402
from common.runs.vit import load, quantize  # noqa: E402
from vit_quant.main import main  # noqa: E402

VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                "num_classes": 3})
DEIT = ("deit_tiny_distilled_patch16_224", dict(VIT[1]))
EVA = ("eva02_tiny_patch14_224", {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                  "num_classes": 3, "ref_feat_shape": (4, 4)})
EVA_SPLIT = ("eva02_tiny_patch14_224", {**EVA[1], "qkv_fused": False, "scale_mlp": True})  # q/k/v_proj + SwiGLU


def _save_model(name: str, kwargs: dict, path: str) -> str:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # non-trivial biases, so EVA's fused-qkv bias path is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("vit")
    rng = np.random.default_rng(0)
    data = root / "data"
    for split, n in (("train", 6), ("val", 4)):
        for c, color in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
            (data / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(color) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype("uint8")
                Image.fromarray(img).save(data / split / f"class{c}" / f"{i}.png")
    ckpt = {
        "vit": _save_model(*VIT, str(root / "vit.safetensors")),
        "deit": _save_model(*DEIT, str(root / "deit.pth")),
        "eva": _save_model(*EVA, str(root / "eva.safetensors")),
        "eva_split": _save_model(*EVA_SPLIT, str(root / "eva_split.pth")),
    }
    return {"data": str(data), "out": root / "out", **ckpt}


SPECS = {"vit": VIT, "deit": DEIT, "eva": EVA, "eva_split": EVA_SPLIT}


def _argv(assets, which: str, *flags: str, out: str = "run") -> list[str]:
    name, kwargs = SPECS[which]
    return ["--model", name, "--model_kwargs", json.dumps(kwargs), "--checkpoint", assets[which],
            "--data_path", assets["data"], "--nsamples", "8", "--bsz", "4", "--workers", "0", "--device", "cpu",
            "--output_dir", str(assets["out"] / out), *flags]


W4A4 = ("--w_bits", "4", "--a_bits", "4", "--w_asym", "--a_asym", "--w_clip", "--act_order", "--percdamp", "0.1")


@pytest.mark.parametrize("w_bits", ["4", "2"])
@pytest.mark.parametrize("method", ["gptq", "gptaq", "rtn"])
def test_cli_vit(assets, method, w_bits):
    flags = {"gptq": (), "gptaq": ("--gptaq",), "rtn": ("--w_rtn",)}[method]
    out = f"vit_{method}_{w_bits}"
    res = main(_argv(assets, "vit", "--w_bits", w_bits, "--a_bits", "4", "--w_asym", "--a_asym", "--w_clip",
                     "--act_order", "--percdamp", "0.1", *flags, out=out))
    saved = json.loads((assets["out"] / out / "results.json").read_text())
    assert saved["method"] == method and saved["w_bits"] == int(w_bits) and saved["a_bits"] == 4
    assert saved["n_val"] == 12 and 0.0 <= saved["top1"] <= saved["top5"] <= 100.0
    assert saved["top1"] == pytest.approx(res["top1"])
    assert {"git_commit", "environment", "seconds", "args"} <= set(saved)
    assert [(r["block"], r["name"]) for r in saved["layers"]] == [
        (b, n) for b in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    if method != "rtn":
        assert all(r["tokens"] == 8 * 17 and r["loss"] >= 0 for r in saved["layers"])
        assert all(("asym_loss" in r) == (method == "gptaq") for r in saved["layers"])


@pytest.mark.parametrize("which", ["deit", "eva", "eva_split"])
def test_cli_other_models(assets, which):
    res = main(_argv(assets, which, *W4A4, "--gptaq", "--val_limit", "5", out=f"{which}_gptaq"))
    assert res["n_val"] == 5 and res["method"] == "gptaq"


def test_fp_baseline_matches_plain_model(assets):
    res = main(_argv(assets, "vit", out="vit_fp"))
    assert res["method"] == "fp16" and res["w_bits"] == 16 and res["a_bits"] == 16
    model = vit.create_model(VIT[0], assets["vit"], VIT[1])
    from common.data.imagefolder import eval_loader, model_transform
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in eval_loader(assets["data"], model_transform(model), 4))
    assert res["top1"] == pytest.approx(100.0 * correct / 12)


@pytest.mark.parametrize("which", ["vit", "eva_split"])
def test_every_block_linear_quantized_head_not(assets, which):
    args = parse_args(_argv(assets, which, *W4A4))
    model, transform, device = load(args)
    before = copy.deepcopy(model.state_dict())
    head_before = model.head.weight.detach().clone()
    quantize(model, args, transform, device)
    for block in model.blocks:
        names = vit.block_linears(block)
        assert names and all(isinstance(block.get_submodule(n), ActQuantLinear) for n in names)
        assert {n for g in vit.sublayer_groups(block) for n in g} == set(names)
        for n in names:
            m = block.get_submodule(n)
            assert m.quantizer.bits == 4 and m.quantizer.active and not m.quantizer.sym
            assert max(len(torch.unique(row)) for row in m.weight) <= 16  # per-channel 4-bit grid
    changed = [k for k in before if not torch.equal(before[k], model.state_dict().get(k, before[k]))]
    assert not any(k.startswith("head") for k in changed)
    assert isinstance(model.head, nn.Linear) and torch.equal(model.head.weight, head_before)
    assert not any(isinstance(m, ActQuantLinear) for m in model.head.modules())


def test_stem_blocks_head_equal_forward(assets):
    for which in SPECS:
        name, kwargs = SPECS[which]
        model = vit.create_model(name, assets[which], kwargs)
        vit.prepare_model(model)
        x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
        tokens, rope = vit.embed(model, x)
        run_block = vit.make_run_block(model, rope)
        with torch.no_grad():
            for block in model.blocks:
                tokens = run_block(block, tokens)
            torch.testing.assert_close(vit.head(model, tokens), model(x))


def _error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in msg
    return msg


def _replace(argv: list[str], old: str, new: str) -> list[str]:
    return [new if a == old else a for a in argv]


def test_bad_inputs(assets, tmp_path, monkeypatch):
    argv = _argv(assets, "vit", *W4A4)
    missing = str(tmp_path / "nope")
    # a missing data path is reported before the (also unknown) model is looked at
    msg = _error(_replace(_replace(argv, assets["data"], missing), VIT[0], "no_such_model"))
    assert "--data_path" in msg and missing in msg
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "c").mkdir(parents=True)
    assert "--data_path" in _error(_replace(argv, assets["data"], str(tmp_path / "empty")))
    assert "no_such_model" in _error(_replace(argv, VIT[0], "no_such_model"))
    msg = _error(_replace(argv, json.dumps(VIT[1]), json.dumps({**VIT[1], "embed_dim": 48})))
    assert "--checkpoint" in msg and "shape" in msg
    assert "unsupported model class" in _error(["--model", "resnet18", "--data_path", assets["data"],
                                                "--checkpoint", assets["vit"], "--device", "cpu"])

    def offline(*a, pretrained=False, **k):
        if pretrained:
            raise OSError("offline")
        return real(*a, **k)
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    assert "--checkpoint" in _error([a for a in argv if a not in ("--checkpoint", assets["vit"])])


def test_cli_subprocess_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "vit_quant", "main.py"), "--model",
                           "deit_tiny_patch16_224", "--data_path", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--data_path" in lines[0]
