"""Hadamard matrices for every model size: orthogonality, exactness (+-1/sqrt(n) entries), the fast transform
against x @ H^T with an independently built H, round trips, random Hadamard / orthogonal matrices, OnlineHadamard."""
import math

import pytest
import torch

from common.models.hadamard import (OnlineHadamard, hadamard_factors, hadamard_matrix, hadamard_transform,
                             is_exact_hadamard, random_hadamard_matrix, random_orthogonal_matrix)

MODEL_SIZES = [64, 128, 576, 896, 1536, 2048, 3072, 3584, 4096, 4864, 5120, 8192, 8960, 11008, 13824, 14336,
               18944, 27648, 28672]
TINY_SIZES = [16, 32, 48, 64, 96]
DENSE_CHECK = 1536  # up to this size the full H H^T product is checked


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def reference(n: int) -> torch.Tensor:
    """H_n = Sylvester (x) D built with torch.kron (not with the transform under test), normalised."""
    p2, D = hadamard_factors(n)
    S = sylvester(p2) / math.sqrt(p2)
    return S if D is None else torch.kron(S, D)


@pytest.mark.parametrize("n", sorted(set(MODEL_SIZES + TINY_SIZES)))
def test_sizes_orthogonal_exact_and_fast(n):
    p2, D = hadamard_factors(n)
    assert p2 & (p2 - 1) == 0 and n % p2 == 0
    assert is_exact_hadamard(n)  # every listed size has a true Hadamard (Sylvester x Paley)
    if D is not None:
        m = D.shape[0]
        assert m * p2 == n and m <= 400
        assert torch.allclose(D @ D.T, torch.eye(m, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(D.abs(), torch.full_like(D, m ** -0.5), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    if n <= 4096:  # against the dense reference
        assert torch.allclose(y, x @ reference(n).T, atol=1e-10)
    if n <= DENSE_CHECK:
        H = hadamard_matrix(n)
        assert (H @ H.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
        assert torch.allclose(H.abs(), torch.full_like(H, n ** -0.5), atol=1e-12)
    # isometry and round trip (x H^T) H = x, the inverse applied as a transform on the transposed problem
    assert torch.allclose(y @ y.T, x @ x.T, atol=1e-9)
    if n <= 4096:
        assert torch.allclose(y @ reference(n), x, atol=1e-10)
    assert torch.allclose(hadamard_transform(x, scale=False), y * math.sqrt(n), atol=1e-8)


def test_transform_batch_shapes_and_dtypes():
    x = torch.randn(2, 3, 96)
    H = hadamard_matrix(96, dtype=torch.float32)
    assert torch.allclose(hadamard_transform(x), x @ H.T, atol=1e-5)
    xb = x.to(torch.bfloat16)
    assert hadamard_transform(xb).dtype == torch.bfloat16
    xg = x.clone().requires_grad_()
    hadamard_transform(xg).pow(2).sum().backward()  # autograd path: d/dx |x H^T|^2 = 2 x
    assert torch.allclose(xg.grad, 2 * x, atol=1e-4)


def test_non_hadamard_size_falls_back_to_orthogonal():
    for n in (7, 3 * 5 * 7, 2 * 11 * 13 * 17):
        H = hadamard_matrix(n)
        assert (H @ H.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    assert not is_exact_hadamard(7)
    with pytest.raises(ValueError, match="positive integer"):
        hadamard_factors(0)


def test_random_matrices_deterministic_and_orthogonal():
    for make in (random_hadamard_matrix, random_orthogonal_matrix):
        R = make(48, seed=5)
        assert R.dtype == torch.float64
        assert torch.equal(R, make(48, seed=5)) and not torch.equal(R, make(48, seed=6))
        assert (R @ R.T - torch.eye(48, dtype=torch.float64)).abs().max() < 1e-12
    R = random_hadamard_matrix(64, 0)
    signs = torch.diagonal(hadamard_matrix(64).T @ R)  # R = H diag(s)
    assert torch.allclose(signs.abs(), torch.ones(64, dtype=torch.float64))
    assert torch.allclose(R, hadamard_matrix(64) * signs)


def test_online_hadamard():
    mod = OnlineHadamard(96, fp32_had=True)
    x = torch.randn(4, 96).to(torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), hadamard_transform(x.float()).bfloat16().float())
    with pytest.raises(ValueError, match="size 96"):
        mod(torch.randn(2, 64))


@pytest.mark.parametrize("n", [128, 512, 11008, 14336])  # power-of-two parts 128, 512, 32, 512
def test_half_precision_product_path_is_closer_to_float64_than_butterflies(n, monkeypatch):
    """Up to SYLVESTER_MATMUL_MAX the power-of-two part is one matrix product (float32 sums, one rounding); in float16
    it is nearer the float64 transform than the butterflies, which round after every stage."""
    from common.models import hadamard

    x = torch.randn(16, n, generator=torch.Generator().manual_seed(n)) * 4
    ref = hadamard_transform(x.double())
    y = hadamard_transform(x.half())
    monkeypatch.setattr(hadamard, "SYLVESTER_MATMUL_MAX", 1)
    y_butterfly = hadamard_transform(x.half())
    assert y.dtype == torch.float16
    err = lambda a: float((a.double() - ref).norm() / ref.norm())  # noqa: E731
    assert err(y) < 0.8 * err(y_butterfly)
    assert err(y) < 6e-4


def test_transform_never_returns_a_view_of_its_input():
    for n in (1, 64, 96):  # no factor (n = 1), the product path, the product path with a dense factor
        x = torch.randn(3, n)
        y = hadamard_transform(x, scale=False)
        assert y.data_ptr() != x.data_ptr()
        assert torch.allclose(hadamard_transform(x, scale=False), x @ hadamard_matrix(n, torch.float32).T * n ** 0.5,
                              atol=1e-4)
