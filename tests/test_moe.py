"""Mixture-of-experts decoders (tiny Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE built here): QuaRot through the
fused experts keeps the float64 outputs and the routing; the routed-token statistics (H, GPTAQ's dXXT, token counts)
equal an independent float64 computation on transformers' own layer; the RTN fallback for experts with too few or
no tokens; fake_quant end to end with GPTQ and GPTAQ (per-expert losses in results.json, routers untouched, a saved
model re-evaluates to the same perplexity) and --export (bit-exact per-expert GPTQ tensors, reloaded to the
fake-quant perplexity by a reference loader and, where installed, by gptqmodel)."""
from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from common.models import llm, moe
from common.models.rotation import Rotation
from common.pipeline.driver import quantize_blocks
from common.quant.act_quant import ActQuantSettings
from common.solver import SolverConfig, rtn_quantize
from fixtures import MOE_ARCHS, make_tiny_moe_lm, tiny_moe_config, write_text
from test_export import dequantize_checkpoint

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fake_quant.main import main  # noqa: E402


def _fp64_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, 320, **overrides), dtype=torch.float64,
                                             experts_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model


IDS = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _routing(model) -> list[torch.Tensor]:
    """Each MoE block's top-k expert indices for IDS (forward hooks on transformers' routers)."""
    out, hooks = [], [layer.mlp.gate.register_forward_hook(lambda m, a, o: out.append(o[2]))
                      for layer in model.model.layers]
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    for h in hooks:
        h.remove()
    return logits, out


@pytest.mark.parametrize("mode", ["hadamard", "random"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_rotation_through_moe_keeps_float64_outputs_and_routing(arch, mode):
    model = _fp64_model(arch)
    ref, ref_routes = _routing(model)
    moe.convert_experts(model)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    Rotation.quarot(model.config, mode, seed=1).apply(model, online_r4=True)
    out, routes = _routing(model)
    # float64 weights; the floor is transformers' float32 RMSNorm / rotary internals (float32 rotation: ~1e-4)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(routes, ref_routes))  # the router logits are rotation invariant
    assert not torch.allclose(model.model.layers[0].mlp.experts.gate_up_proj, before, atol=1e-3)
    assert all(layer.mlp.experts.down_transform is not None for layer in model.model.layers)


# ------------------------------------------------------------------------- routed-token statistics


def _quantize_first_layer(arch, method, monkeypatch, min_tokens=moe.DEFAULT_MIN_TOKENS, edit=None, **overrides):
    """quantize_blocks on decoder layer 0 of a tiny float32 MoE model (first changed by `edit(model)`); every solver
    call is recorded with H, dXXT and the layer's weights at that moment."""
    from common import solver

    model = _fp64_model(arch, **overrides).float()
    if edit is not None:
        edit(model)
    moe.convert_experts(model, min_tokens)
    fp_state = copy.deepcopy(model.model.layers[0].state_dict())
    batches = [torch.randint(4, 300, (2, 32), generator=torch.Generator().manual_seed(b)) for b in range(2)]
    inputs = llm.capture_layer_inputs(model, batches, "cpu")
    layer = model.model.layers[0]
    calls, real = {}, solver.quantize_linear

    def spy(W, H, dXXT, cfg, name="layer"):
        calls[name.split(".", 2)[2]] = {"H": None if H is None else H.clone(),
                                        "dXXT": None if dXXT is None else dXXT.clone(), "cfg": cfg,
                                        "state": {k: v.clone() for k, v in layer.state_dict().items()}}
        return real(W, H, dXXT, cfg, name=name)

    monkeypatch.setattr(solver, "quantize_linear", spy)
    cfg = SolverConfig(method=method, bits=4, group_size=32)
    records = quantize_blocks([layer], inputs.inputs, inputs.run_layer, llm.sublayer_groups, cfg,
                              prepare_block=llm.make_prepare_layer(ActQuantSettings()), device="cpu")
    return model, inputs, fp_state, calls, {r["name"]: r for r in records}


def _reference_layer(model, state):
    """transformers' own decoder layer (fused experts, eager), float64, holding `state` (wrappers unwrapped)."""
    config = copy.deepcopy(model.config)
    config._experts_implementation = "eager"
    layer = type(model.model.layers[0])(config, 0).double().eval()
    layer.load_state_dict({k.replace(".linear.", "."): v for k, v in state.items()})
    return layer


def _router_inputs(layer, inputs, x):
    """Post-attention-norm hidden states [tokens, H] and the top-k routing of transformers' layer on input x."""
    seen = {}
    hook = layer.mlp.gate.register_forward_hook(lambda m, a, o: seen.update(h=a[0], idx=o[2]))
    args, kwargs = inputs.kwargs[0][x.shape[0]]
    to64 = lambda v: v.double() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    kwargs = {k: tuple(map(to64, v)) if isinstance(v, tuple) else to64(v) for k, v in kwargs.items()}
    with torch.no_grad():
        layer(x.double(), *args, **kwargs)
    hook.remove()
    return seen["h"].reshape(-1, x.shape[-1]), seen["idx"]


def _expert_inputs(layer, h, e):
    gate, up = F.linear(h, layer.mlp.experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routed_hessians_match_an_independent_computation(arch, method, monkeypatch):
    """H_e and dXXT_e over the tokens the quantized stream routes to e, in float64 on transformers' layer: the
    gate/up inputs when the attention is quantized, the down_proj inputs when gate/up are too; FP partners from the
    full-precision layer on the same tokens."""
    model, inputs, fp_state, calls, records = _quantize_first_layer(arch, method, monkeypatch)
    fp_layer = _reference_layer(model, fp_state)
    E = model.config.num_local_experts if arch == "mixtral" else model.config.num_experts
    for kind in ("up_proj", "down_proj"):
        q_layer = _reference_layer(model, calls[f"mlp.experts.0.{kind}"]["state"])
        sums = {e: [0, 0, 0] for e in range(E)}
        for x in inputs.inputs:
            hq, idx = _router_inputs(q_layer, inputs, x)
            hf, _ = _router_inputs(fp_layer, inputs, x)
            for e in range(E):
                t = torch.where(idx == e)[0]
                xq, xf = hq[t], hf[t]
                if kind == "down_proj":
                    xq, xf = _expert_inputs(q_layer, xq, e), _expert_inputs(fp_layer, xf, e)
                sums[e][0] += xq.T @ xq
                sums[e][1] += (xf - xq).T @ xq
                sums[e][2] += len(t)
        for e in range(E):
            S, D, n = sums[e]
            call, rec = calls[f"mlp.experts.{e}.{kind}"], records[f"mlp.experts.{e}.{kind}"]
            assert rec["tokens"] == n > moe.DEFAULT_MIN_TOKENS and "fallback" not in rec
            H = 2 * S / n
            assert ((call["H"].double() - H).norm() / H.norm()).item() < 1e-5
            if method == "gptaq":
                D = 2 * D / n
                assert D.norm() > 1e-3 * H.norm()  # the streams differ: a real test of the pairing
                assert ((call["dXXT"].double() - D).norm() / D.norm()).item() < 1e-4
            else:
                assert call["dXXT"] is None
    total = sum(records[f"mlp.experts.{e}.up_proj"]["tokens"] for e in range(E))
    assert total == 2 * 2 * 32 * model.config.num_experts_per_tok  # every routed (token, slot) exactly once


def test_fallback_for_experts_with_too_few_tokens(monkeypatch, caplog):
    """min_tokens above every count: each expert is rounded to nearest on the same grid, logged, recorded."""
    caplog.set_level(logging.WARNING, logger="common.pipeline.routed")
    model, _, fp_state, calls, records = _quantize_first_layer("mixtral", "gptaq", monkeypatch, min_tokens=10**9)
    experts = model.model.layers[0].mlp.experts
    for e in range(experts.num_experts):
        for i, lin in enumerate(("gate_proj", "up_proj")):
            rec = records[f"mlp.experts.{e}.{lin}"]
            assert rec["fallback"] == "rtn" and rec["tokens"] > 0 and "loss" in rec
            assert calls[f"mlp.experts.{e}.{lin}"]["cfg"].method == "rtn"
            rows = slice(i * 32, (i + 1) * 32)
            expect = rtn_quantize(fp_state["mlp.experts.gate_up_proj"][e, rows], bits=4, group_size=32).weight
            assert torch.equal(experts.gate_up_proj.data[e, rows], expect)
    assert records["self_attn.q_proj"].get("fallback") is None  # dense linears are solved as before
    warned = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
    assert len(warned) == 2 * experts.num_experts and all("--moe_min_tokens" in m for m in warned)


def test_fallback_for_an_expert_that_gets_no_token(monkeypatch):
    """A router that never picks expert 4 (rows w0, -w0, w2, -w2, 0: two logits >= 0 beat it for every token)."""
    def no_token_router(model):
        with torch.no_grad():
            g = model.model.layers[0].mlp.gate.weight
            g[1], g[3], g[4] = -g[0], -g[2], 0.0

    model, _, _, _, records = _quantize_first_layer("qwen3_moe", "gptq", monkeypatch, edit=no_token_router,
                                                    num_experts=5)
    for lin in ("gate_proj", "up_proj", "down_proj"):
        rec = records[f"mlp.experts.4.{lin}"]
        assert rec["tokens"] == 0 and rec["fallback"] == "rtn" and "loss" not in rec
    assert all("fallback" not in records[f"mlp.experts.{e}.down_proj"] for e in range(4))
    assert torch.isfinite(model.model.layers[0].mlp.experts.gate_up_proj).all()


# ------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {"root": root, "cal": str(write_text(root / "cal.txt", 3000, seed=0)),
            "eval": str(write_text(root / "eval.txt", 500, seed=1)),
            **{arch: make_tiny_moe_lm(arch, root / arch) for arch in MOE_ARCHS}}


def _argv(env, arch, out, *extra):
    return ["--model", str(env[arch]), "--device", "cpu", "--nsamples", "4", "--seqlen", "32", "--bsz", "2",
            "--cal_dataset", env["cal"], "--eval_dataset", env["eval"], "--eval_limit", "4", "--output_dir",
            str(out), *extra]


def _check_expert_records(result, config, method):
    E = config.num_local_experts if config.model_type == "mixtral" else config.num_experts
    names = {(r["block"], r["name"]) for r in result["layers"]}
    for block in range(2):
        for e in range(E):
            assert {(block, f"mlp.experts.{e}.{n}") for n in moe.EXPERT_LINEARS} <= names
        assert "mlp.gate" not in {n for _, n in names} and "mlp.shared_expert_gate" not in {n for _, n in names}
        summary = result["experts"][str(block)]
        assert sorted(summary, key=int) == [str(e) for e in range(E)]
        assert sum(s["tokens"] for s in summary.values()) == 4 * 32 * config.num_experts_per_tok
        for s in summary.values():
            if "fallback" not in s:
                assert s["loss"] > 0 and (("asym_loss" in s) == (method == "gptaq"))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fake_quant_gptq_w4a8_rotated_and_reloaded(env, arch):
    out = env["root"] / f"{arch}_gptq"
    result = main(_argv(env, arch, out / "run", "--dtype", "float32", "--w_bits", "4", "--a_bits", "8", "--rotate",
                        "--save_qmodel_path", str(out / "fake")))
    _check_expert_records(result, llm.read_config(str(env[arch])), "gptq")
    ppl = result["perplexity"][env["eval"]]
    assert 1 < ppl < 1e4
    again = main(["--load_qmodel_path", str(out / "fake"), "--device", "cpu", "--seqlen", "32", "--eval_dataset",
                  env["eval"], "--eval_limit", "4", "--output_dir", str(out / "reload")])
    assert again["perplexity"][env["eval"]] == pytest.approx(ppl, rel=1e-6)  # online R4 rebuilt in every expert


@pytest.fixture(scope="module", params=MOE_ARCHS)
def exported(request, env):
    """GPTAQ W4 g32 asymmetric (act-order), no rotation: the export and the saved fake-quant model."""
    arch = request.param
    out = env["root"] / f"{arch}_export"
    result = main(_argv(env, arch, out / "run", "--dtype", "float16", "--w_bits", "4", "--w_groupsize", "32",
                        "--act_order", "--gptaq", "--export", str(out / "gptq"), "--save_qmodel_path",
                        str(out / "fake")))
    return {"arch": arch, "result": result, "dir": out / "gptq", "fake": out / "fake",
            "ppl": result["perplexity"][env["eval"]]}


def _tensors(state, name):
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def test_export_holds_every_expert_bit_exactly_and_routers_untouched(exported, env):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _check_expert_records(exported["result"], llm.read_config(str(env[exported["arch"]])), "gptaq")
    sd = load_file(str(exported["dir"] / "model.safetensors"))
    fake = llm.load_model(str(exported["fake"]), "float16")
    orig = AutoModelForCausalLM.from_pretrained(str(env[exported["arch"]]), dtype=torch.float32)
    qcfg = json.loads((exported["dir"] / "config.json").read_text())["quantization_config"]
    assert "mlp.experts.3.down_proj" in qcfg["modules_in_block_to_quantize"][0]
    for i, layer in enumerate(fake.model.layers):
        experts = layer.mlp.experts
        assert not any(k.startswith(f"model.layers.{i}.mlp.experts.") and k.endswith(("gate_up_proj", "down_proj"))
                       for k in sd)  # the fused tensors are not written
        for e in range(experts.num_experts):
            for n in moe.EXPERT_LINEARS:
                name = f"model.layers.{i}.mlp.experts.{e}.{n}"
                w = dequantize_checkpoint(_tensors(sd, name), 4, "gptq").half()
                assert torch.equal(w, experts.get_submodule(f"{e}.{n}").weight), name
        for router in ("mlp.gate", "mlp.shared_expert_gate"):
            if hasattr(layer.mlp, router.split(".")[1]):
                ref = orig.model.layers[i].get_submodule(router).weight.half()
                assert torch.equal(layer.get_submodule(router).weight, ref)  # 16-bit, never quantized
                assert torch.equal(sd[f"model.layers.{i}.{router}.weight"], ref)


def _reference_load(directory: Path):
    """Pure-PyTorch loader: dequantize every packed linear, stack each layer's experts into transformers' fused
    gate_up_proj [E, 2I, H] / down_proj [E, H, I], load strictly into the model built from config.json."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    qcfg = config.quantization_config
    del config.quantization_config
    state = load_file(str(directory / "model.safetensors"))
    weights = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")}):
        weights[name] = dequantize_checkpoint(_tensors(state, name), qcfg["bits"], qcfg["checkpoint_format"]).half()
        for leaf in ("qweight", "qzeros", "scales", "g_idx"):
            del state[f"{name}.{leaf}"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    for key in [k for k in model.state_dict() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        prefix, fused = key.rsplit(".", 1)
        E = model.get_submodule(prefix).gate_up_proj.shape[0]
        parts = [("gate_proj", "up_proj")] if fused == "gate_up_proj" else [("down_proj",)]
        state[key] = torch.stack([torch.cat([weights.pop(f"{prefix}.{e}.{n}") for n in parts[0]]) for e in range(E)])
    state.update({f"{n}.weight": w for n, w in weights.items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def _perplexity(model, env, arch):
    from common.data.text import get_eval_data
    from common.eval.perplexity import perplexity

    windows = get_eval_data(env["eval"], llm.load_tokenizer(str(env[arch])), 32)[:4]
    return perplexity(model, windows, bsz=2, device="cpu")


def test_reference_loader_gives_fake_quant_perplexity(exported, env):
    ppl = _perplexity(_reference_load(exported["dir"]), env, exported["arch"])
    assert ppl == pytest.approx(exported["ppl"], rel=1e-3)


def test_gptqmodel_loads_moe_export_with_fake_quant_perplexity(exported, env):
    """GPTQModel.load (which defuses transformers' fused experts into per-expert linears; pure-PyTorch kernel)."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel

    disabled = torch._dynamo.config.disable
    torch._dynamo.config.disable = True  # keeps gptqmodel's dequantizer uncompiled (fast on CPU)
    try:
        model = GPTQModel.load(str(exported["dir"]), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        ppl = _perplexity(model.model, env, exported["arch"])
    finally:
        torch._dynamo.config.disable = disabled
    assert ppl == pytest.approx(exported["ppl"], rel=1e-3)


@pytest.mark.parametrize("flag", ["--stream", "--resume"])
def test_moe_refusals(env, tmp_path, flag):
    with pytest.raises(SystemExit) as e:
        main(_argv(env, "mixtral", tmp_path, "--w_bits", "4", flag))
    assert "mixture-of-experts" in str(e.value.code) and flag in str(e.value.code)
