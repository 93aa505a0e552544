"""Hadamard matrices of any model size and the fast Walsh-Hadamard transform (QuaRot's H, R1/R2 init, R3/R4).

n = 2^a * m':  H_n = (H_{2^a} (x) H_{m'}) / sqrt(n)  with H_{2^a} Sylvester and H_{m'} a Paley I (q = m'-1 = 3 mod 4)
or Paley II (q = m'/2-1 = 1 mod 4, q a prime power) Hadamard of the smallest m' = odd(n) * 2^j that has one, so
H_n H_n^T = I and  x -> x H_n^T  costs O(n log n + n m').  Where neither Paley construction reaches any m'
(or n has no factor 4 to spare), H_{m'} is replaced by the orthonormal DCT-II matrix of the odd part m (an
orthogonal, deterministic, equally cheap stand-in that is not +-1/sqrt(n)-valued); `is_exact_hadamard(n)` tells.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

__all__ = ["hadamard_factors", "is_exact_hadamard", "hadamard_matrix", "hadamard_transform", "random_hadamard_matrix",
           "random_orthogonal_matrix", "OnlineHadamard"]

try:  # optional CUDA kernel (Dao-AILab); used for the power-of-two part of CUDA tensors only, never required
    from fast_hadamard_transform import hadamard_transform as _fht_cuda
except ImportError:  # pragma: no cover - depends on the environment
    _fht_cuda = None

_FHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# finite fields GF(p^e) (enough to get the quadratic character for Paley's Jacobsthal matrix)
# ---------------------------------------------------------------------------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, e >= 1; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists lowest degree first, f monic."""
    a = [c % p for c in a]
    df = len(f) - 1
    for k in range(len(a) - 1, df - 1, -1):
        c = a[k]
        if c:
            for i in range(df + 1):
                a[k - df + i] = (a[k - df + i] - c * f[i]) % p
    return a[:df] + [0] * max(0, df - len(a))


def _monic_polys(p: int, d: int):
    """All monic polynomials of degree d over GF(p) (lowest degree first)."""
    for idx in range(p ** d):
        yield [(idx // p ** i) % p for i in range(d)] + [1]


def _irreducible(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree e over GF(p) (trial division by degrees 1..e//2)."""
    for f in _monic_polys(p, e):
        if all(any(_poly_mod(f, g, p)) for d in range(1, e // 2 + 1) for g in _monic_polys(p, d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # cannot happen


def _quadratic_character(p: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(digits [q, e], chi [q]) for GF(p^e): element index = sum digit_i p^i, chi = +1 square, -1 non-square, 0 at 0."""
    q = p ** e
    digits = np.array([[(idx // p ** i) % p for i in range(e)] for idx in range(q)], dtype=np.int64)
    f = _irreducible(p, e) if e > 1 else [0, 1]
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    weights = p ** np.arange(e)
    for a in digits[1:]:
        sq = np.convolve(a, a) if e > 1 else a * a
        chi[int(np.dot(np.array(_poly_mod(sq.tolist(), f, p)), weights)) if e > 1 else int(sq[0] % p)] = 1
    return digits, chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q), q an odd prime power."""
    p, e = _prime_power(q)
    digits, chi = _quadratic_character(p, e)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ (p ** np.arange(e))]


def _paley(order: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of `order` from Paley I or II, or None if neither applies."""
    pp = _prime_power(order - 1)
    if pp is not None and (order - 1) % 4 == 3:  # Paley I: H = I + [[0, 1^T], [-1, Q]]
        q = order - 1
        S = np.zeros((order, order), dtype=np.int64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
        return S + np.eye(order, dtype=np.int64)
    if order % 2 == 0:
        pp = _prime_power(order // 2 - 1)
        if pp is not None and (order // 2 - 1) % 4 == 1:  # Paley II from the symmetric conference matrix C
            q = order // 2 - 1
            C = np.zeros((q + 1, q + 1), dtype=np.int64)
            C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
            return np.kron(C, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                                      np.array([[1, -1], [-1, -1]]))
    return None


def _dct_matrix(m: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix of size m (float64): C[k, i] = s_k cos(pi (i + 1/2) k / m)."""
    k = torch.arange(m, dtype=torch.float64)[:, None]
    i = torch.arange(m, dtype=torch.float64)[None, :]
    C = torch.cos(math.pi * (i + 0.5) * k / m) * math.sqrt(2.0 / m)
    C[0] /= math.sqrt(2.0)
    return C


# ---------------------------------------------------------------------------------------------------------------
# factorisation n = 2^a * m'
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _factors(n: int) -> tuple[int, torch.Tensor | None, bool]:
    """(p2, D, exact): H_n = H_{p2} (x) D with D [m', m'] orthonormal float64 (None when m' = 1)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got {n!r}")
    a = (n & -n).bit_length() - 1  # n = 2^a * m, m odd
    m = n >> a
    if m == 1:
        return n, None, True
    for j in range(a + 1):  # smallest dense factor first
        H = _paley(m << j)
        if H is not None:
            D = torch.from_numpy(H).to(torch.float64) / math.sqrt(m << j)
            if not torch.allclose(D @ D.T, torch.eye(m << j, dtype=torch.float64), atol=1e-12):
                raise AssertionError(f"Paley construction of order {m << j} is not orthogonal")  # cannot happen
            return 1 << (a - j), D, True
    return 1 << a, _dct_matrix(m), False


def hadamard_factors(n: int) -> tuple[int, torch.Tensor | None]:
    """(p2, D): H_n = H_{p2} (x) D, H_{p2} the normalised Sylvester matrix, D [n/p2, n/p2] orthonormal float64
    (the normalised Paley Hadamard, or the DCT stand-in), None when n is a power of two."""
    p2, D, _ = _factors(n)
    return p2, D


def is_exact_hadamard(n: int) -> bool:
    """True when H_n is a true Hadamard matrix (+-1/sqrt(n) entries), False for the DCT stand-in."""
    return _factors(n)[2]


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}  # dense factors (n, ...) and Sylvester matrices (-p2, ...)


def _dense_factor(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    D = _factors(n)[1]
    if D is None:
        return None
    key = (n, device, dtype)
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = D.to(device=device, dtype=dtype)
    return _DEVICE_CACHE[key]


def _fwht(x: torch.Tensor, p2: int, tail: int) -> torch.Tensor:
    """Unnormalised Sylvester transform over a dim of size p2 followed by `tail` trailing elements: x [B, p2*tail].

    log2(p2) butterfly stages (a, b) -> (a + b, a - b) on views; without autograd they ping-pong between two
    buffers (no allocation per stage), with autograd they build new tensors.
    """
    B = x.shape[0]
    track = torch.is_grad_enabled() and x.requires_grad
    bufs = None if track else (torch.empty_like(x), torch.empty_like(x) if p2 > 2 else None)
    h, stage = 1, 0
    while h < p2:
        y = x.view(B, p2 // (2 * h), 2, h * tail)
        a, b = y[:, :, 0], y[:, :, 1]
        if track:
            x = torch.stack((a + b, a - b), dim=2).reshape(B, p2 * tail)
        else:
            out = bufs[stage % 2]
            o = out.view(B, p2 // (2 * h), 2, h * tail)
            torch.add(a, b, out=o[:, :, 0])
            torch.sub(a, b, out=o[:, :, 1])
            x = out
        h, stage = 2 * h, stage + 1
    return x


# H_{p2} up to this size is applied as one matrix product with the +-1 Sylvester matrix (2 p2 flops per entry on
# tensor cores, one pass over memory, products summed in float32 and rounded once, as the CUDA kernel of QuaRot's
# code does); larger powers of two by log2(p2) butterfly stages (in x's dtype, rounded at every stage)
SYLVESTER_MATMUL_MAX = 512


def _sylvester(p2: int, entry: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The Sylvester matrix of order p2 (symmetric, entries +-entry) on device, cached."""
    key = (-p2, entry, device, dtype)
    if key not in _DEVICE_CACHE:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < p2:
            H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
        _DEVICE_CACHE[key] = (H * entry).to(device=device, dtype=dtype)
    return _DEVICE_CACHE[key]


def hadamard_transform(x: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """x @ H_n^T over the last dimension (n = x.shape[-1]), in x's dtype; scale=False multiplies by sqrt(n)
    (the +-1 matrix where H_n is exact).  The power-of-two part as one matrix product up to SYLVESTER_MATMUL_MAX,
    O(n log n) butterflies beyond."""
    n = x.shape[-1]
    p2, _, _ = _factors(n)
    D = _dense_factor(n, x.device, x.dtype)
    m = n // p2
    shape = x.shape
    y = x.reshape(-1, p2, m)
    if D is not None:
        y = y @ D.T  # H_{p2} (x) D acts as  X -> H_{p2} X D^T  on X = x.view(p2, m')
    factor = 1.0 / math.sqrt(p2) if scale else math.sqrt(m)
    if _fht_cuda is not None and y.is_cuda and y.dtype in _FHT_DTYPES and p2 > 1:
        y = _fht_cuda(y.transpose(1, 2).contiguous(), 1.0).transpose(1, 2).reshape(-1, n)
    elif 1 < p2 <= SYLVESTER_MATMUL_MAX:
        # entries +-2^-k (exact in every float dtype; k = floor(log2(p2) / 2) when scaling, so the sums stay of the
        # size of the inputs), the remaining factor 1 or 1/sqrt(2) applied after
        k = (p2.bit_length() - 1) // 2 if scale else 0
        S = _sylvester(p2, 2.0 ** -k, y.device, y.dtype)
        y = (y.reshape(-1, p2) @ S if m == 1 else S @ y).reshape(-1, n)
        factor *= 2.0 ** k
    else:
        y = _fwht(y.reshape(-1, n), p2, m)
    if factor != 1.0 or y.data_ptr() == x.data_ptr():  # never a view of x
        y = y * factor
    return y.reshape(shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The dense orthonormal H_n (H_n H_n^T = I).  Built on demand (not cached: n^2 entries)."""
    eye = torch.eye(n, dtype=torch.float64, device=device)
    return hadamard_transform(eye).T.contiguous().to(dtype)  # rows of hadamard_transform(I) are those of H^T


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def random_hadamard_matrix(n: int, seed: int) -> torch.Tensor:
    """QuaRot's randomised Hadamard R = H_n diag(s), s_i = +-1 drawn from `seed` (float64, CPU, orthogonal)."""
    s = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * s


def random_orthogonal_matrix(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal Q from the QR of a Gaussian n x n matrix, signs fixed so diag(R) > 0 (float64, CPU)."""
    A = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    d = torch.sign(torch.diagonal(R))
    d[d == 0] = 1.0
    return Q * d


class OnlineHadamard(nn.Module):
    """Online transform x -> x H_n^T (QuaRot R4 on the down_proj input, R3 per head on q/k).

    fp32_had computes it in float32 and casts back to the input dtype.
    """

    def __init__(self, size: int, fp32_had: bool = False):
        super().__init__()
        _factors(size)  # validates and builds the factors now, not at the first forward
        self.size, self.fp32_had = size, fp32_had

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"OnlineHadamard of size {self.size} got an input with last dimension {x.shape[-1]}")
        if self.fp32_had and x.dtype != torch.float32:
            return hadamard_transform(x.float()).to(x.dtype)
        return hadamard_transform(x)

    def extra_repr(self) -> str:
        return f"size={self.size}, fp32_had={self.fp32_had}, exact={is_exact_hadamard(self.size)}"
