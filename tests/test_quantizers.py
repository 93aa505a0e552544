"""Grid conventions, MSE clip search and the activation quantizer."""
import pytest
import torch
from torch import nn

from common.quant.act_quant import ActQuantizer, ActQuantLinear, set_act_quant, wrap_linears
from common.quant.grid import fake_quantize, grid_params
from common.quant.weight_grid import fit_grid


def test_asymmetric_grid_convention():
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    scale, zero = fit_grid(x, bits=2, sym=False)
    assert torch.allclose(scale.flatten(), torch.tensor([1.0, 2 / 3, 1.0]))  # (xmax - xmin)/3, zero row uses [-1, 1]
    assert torch.equal(zero.flatten(), torch.tensor([1.0, 2.0, 0.0]))  # round(-xmin/scale); xmin clamps to 0
    q = fake_quantize(x, scale, zero, 2)
    assert torch.allclose(q[0], torch.tensor([-1.0, 0.0, 2.0]))  # round(0.5) = 0 (half to even)
    assert torch.equal(q[1], torch.zeros(3))


def test_symmetric_grid_convention():
    x = torch.tensor([[-4.0, 1.0, 3.5]])
    scale, zero = fit_grid(x, bits=4, sym=True)
    assert torch.allclose(scale, torch.tensor([[4.0 / 7]])) and torch.equal(zero, torch.tensor([[8.0]]))
    q = fake_quantize(x, scale, zero, 4)
    assert q.min() >= -8 * scale and q.max() <= 7 * scale
    tiny_scale, _ = grid_params(torch.zeros(1, 1), torch.zeros(1, 1), 3, True)
    assert torch.allclose(tiny_scale, torch.tensor([[1e-5 / 3]]))


def test_gptq_symmetric_grid_convention():
    """sym_grid "gptq" (IST-DASLab GPTQ, GPTQModel): scale = 2 amax / (2^b - 1), zero 2^(b-1); a row without negative
    entries keeps its lower end at 0 (scale xmax / (2^b - 1)), an all-zero row uses [-1, 1]."""
    x = torch.tensor([[-3.75, 1.0, 3.5], [0.5, 1.0, 3.0], [0.0, 0.0, 0.0], [-2.0, -1.0, 0.0]])
    scale, zero = fit_grid(x, bits=4, sym=True, sym_grid="gptq")
    assert torch.allclose(scale.flatten(), torch.tensor([0.5, 3.0 / 15, 2.0 / 15, 4.0 / 15]))
    assert torch.equal(zero, torch.full((4, 1), 8.0))
    q = fake_quantize(x, scale, zero, 4)
    assert q[0, 0] == -4.0 and q[0, 2] == 3.5  # round(-7.5) = -8: code 0 is in use
    assert torch.equal(q[2], torch.zeros(3))
    assert torch.equal(fit_grid(x, 4, sym=False, sym_grid="gptq")[0], fit_grid(x, 4, sym=False)[0])  # asym: unused
    s1, _ = fit_grid(x, 4, sym=True, mse=True, sym_grid="gptq")
    assert torch.all(s1 <= scale + 1e-7)
    with pytest.raises(ValueError, match="sym_grid"):
        fit_grid(x, 4, sym=True, sym_grid="signed")


def test_mse_clip_search_never_worse_and_shrinks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    x[:, 0] *= 20  # outliers make clipping pay off
    for sym in (False, True):
        s0, z0 = fit_grid(x, 3, sym, mse=False)
        s1, z1 = fit_grid(x, 3, sym, mse=True)
        e0 = (fake_quantize(x, s0, z0, 3) - x).abs().pow(2.4).sum(1)
        e1 = (fake_quantize(x, s1, z1, 3) - x).abs().pow(2.4).sum(1)
        assert torch.all(e1 <= e0 + 1e-4) and torch.all(s1 <= s0 + 1e-7) and (s1 < s0).any()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_activation_quantizer_per_token_levels(bits, sym):
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 64)
    q = ActQuantizer(bits=bits, sym=sym, clip_ratio=0.9)(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    for row in q.reshape(-1, 64):
        assert row.unique().numel() <= 2**bits
    # per token: scaling one token does not change the others
    x2 = x.clone()
    x2[0, 0] *= 100
    q2 = ActQuantizer(bits=bits, sym=sym, clip_ratio=0.9)(x2)
    assert torch.equal(q2[1:], q[1:])


def test_activation_quantizer_groups_clip_and_switch():
    x = torch.randn(4, 32)
    aq = ActQuantizer(bits=4, groupsize=8, clip_ratio=0.5)
    q = aq(x)
    for grp in q.reshape(4, 4, 8).reshape(-1, 8):
        assert grp.unique().numel() <= 16
    assert q.abs().max() < x.abs().max() * 0.75  # range clipped to half (plus at most one grid step)
    aq.enabled = False
    assert torch.equal(aq(x), x)
    assert torch.equal(ActQuantizer()(x), x)  # 16 bits: identity
    with pytest.raises(ValueError, match="activation bits"):
        ActQuantizer(bits=1)
    with pytest.raises(ValueError, match="clip ratio"):
        ActQuantizer(bits=4, clip_ratio=1.5)
    with pytest.raises(ValueError, match="group size 5"):
        ActQuantizer(bits=4, groupsize=5)(x)


def test_wrap_linears_is_idempotent_and_quantizes_inputs():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    ref = net(x)
    wrapped = wrap_linears(net, skip=lambda n: n == "2")
    assert list(wrapped) == ["0"] and isinstance(net[0], ActQuantLinear) and isinstance(net[2], nn.Linear)
    assert list(wrap_linears(net, skip=lambda n: n == "2")) == ["0"]
    assert torch.equal(net(x), ref)  # 16-bit quantizer: unchanged
    net[0].quantizer = ActQuantizer(bits=2)
    assert not torch.allclose(net(x), ref)
    set_act_quant(net, False)
    assert torch.equal(net(x), ref)
