"""Low-rank projectors for gradient matrices: SVD, random orthogonal (shared seed), DCT-II columns.

A projector of a gradient ``G`` (m x n) works on one side:

* ``right`` (``P``: r x n, orthonormal rows): ``R = G Pᵀ`` (m x r), back: ``R P``;
* ``left``  (``P``: m x r, orthonormal columns): ``R = Pᵀ G`` (r x n), back: ``P R``.

``side_for(shape, proj_type)`` maps GaLore's ``proj_type`` (``std``: project the smaller side,
``reverse_std``, ``left``, ``right``) to a side. The DCT projector stores only the int64 indices of
the chosen DCT-II basis vectors; the basis is rebuilt from a per-(size, dtype, device) cache.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from commlib.validation import integer

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJECTORS = ("svd", "random", "dct")
LEFT, RIGHT = 0, 1


def check_rank(rank, shape: tuple[int, int], side: int | None = None) -> int:
    """``rank`` must be an int in [1, the projected dimension]."""
    integer("rank", rank, 1)
    limit = min(shape) if side is None else (shape[1] if side == RIGHT else shape[0])
    if rank > limit:
        raise ValueError(f"rank must be <= {limit} for a {shape[0]} x {shape[1]} gradient, got {rank}")
    return rank


def side_for(shape: tuple[int, int], proj_type: str) -> int:
    """GaLore's convention: ``std`` projects the smaller side (right when m >= n)."""
    m, n = shape
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type == "left":
        return LEFT
    if proj_type == "right":
        return RIGHT
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Parameters with more than 2 dims are projected as (dim 0) x (the rest)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


# ---------------------------------------------------------------------------------------- bases
def svd_basis(grad: torch.Tensor, rank: int, side: int) -> torch.Tensor:
    """Top-``rank`` singular vectors of ``grad`` (SVD in float32, returned in ``grad``'s dtype)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = vh[:rank, :] if side == RIGHT else u[:, :rank]
    return basis.to(grad.dtype)


SVD_SIGNS = ("align", "raw")


def basis_vectors(basis: torch.Tensor, side: int) -> torch.Tensor:
    """The basis vectors as rows (r x dim): a right basis as it is, a left one transposed."""
    return basis if side == RIGHT else basis.t()


def sign_flips(dots: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per vector: -1 where ``dots`` is negative (0 keeps the sign)."""
    return torch.where(dots < 0, -torch.ones_like(dots), torch.ones_like(dots))


def canonical_sign_dots(basis: torch.Tensor, side: int) -> torch.Tensor:
    """Per vector, its entry of largest magnitude (first on ties): flipping each vector by the sign
    of it makes the basis independent of the SVD routine's arbitrary signs."""
    vectors = basis_vectors(basis, side)
    picked = vectors.abs().argmax(dim=1, keepdim=True)
    return vectors.gather(1, picked).squeeze(1)


def alignment_dots(basis: torch.Tensor, previous: torch.Tensor, side: int) -> torch.Tensor:
    """``<b_i, p_i>`` per vector: the new basis vector against the previous one of the same index
    (on a shard's left side: over this rank's rows, to be summed across ranks)."""
    return (basis_vectors(basis, side).float() * basis_vectors(previous, side).float()).sum(dim=1)


def apply_flips(basis: torch.Tensor, flips: torch.Tensor, side: int) -> torch.Tensor:
    flips = flips.to(basis.dtype)
    return basis * flips[:, None] if side == RIGHT else basis * flips[None, :]


def align_signs(basis: torch.Tensor, previous: torch.Tensor | None, side: int) -> torch.Tensor:
    r"""Stable singular vectors: each vector of a refreshed SVD basis flipped to point like the
    previous basis's vector of the same index (canonical signs on the first refresh).

    Singular vectors are defined up to sign, and an SVD routine picks them arbitrarily: a rounding
    difference in the gradient can flip one. GaLore carries Adam's moments across a refresh, so a
    flipped vector turns the carried moment against the new projected gradient; aligning makes the
    trajectory a continuous function of the gradients (``projector="svd"`` with
    ``svd_signs="align"``, the default; ``"raw"`` keeps the routine's signs, as galore-torch does)."""
    if previous is None or previous.shape != basis.shape:
        return apply_flips(basis, sign_flips(canonical_sign_dots(basis, side)), side)
    return apply_flips(basis, sign_flips(alignment_dots(basis, previous, side)), side)


def random_basis(shape: tuple[int, int], rank: int, side: int, seed: int, dtype=torch.float32,
                 device=None) -> torch.Tensor:
    """A random orthonormal basis from ``seed`` alone (QR of a Gaussian): equal on every rank."""
    dim = shape[1] if side == RIGHT else shape[0]
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float32))
    signs = torch.sign(torch.diagonal(r))
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)  # the unique QR with diag(R) > 0
    basis = q.t() if side == RIGHT else q
    return basis.to(dtype=dtype, device=device).contiguous()


@lru_cache(maxsize=32)
def _dct_matrix_cached(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    q = math.sqrt(2.0 / n) * torch.cos(math.pi * i * (2 * j + 1) / (2 * n))
    q[0] *= math.sqrt(0.5)
    return q.to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n x n), rows are the basis vectors: ``y = Q x``."""
    return _dct_matrix_cached(n, dtype, str(torch.device(device or "cpu")))


def dct_rows(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II of every row of ``x`` (= ``x @ Q.T``) in O(n log n) per row (Makhoul 1980)."""
    n = x.shape[-1]
    xf = x.double() if x.dtype == torch.float64 else x.float()
    v = torch.cat([xf[..., ::2], xf[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, device=x.device, dtype=xf.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    y = (spectrum * twiddle).real * 2
    scale = torch.full((n,), math.sqrt(1.0 / (2 * n)), dtype=xf.dtype, device=x.device)
    scale[0] = math.sqrt(1.0 / (4 * n))
    return y * scale


def dct_scores(grad: torch.Tensor, side: int) -> torch.Tensor:
    """L1 norm of the DCT-II coefficients of ``grad`` along the projected side, per basis vector.
    For ``right`` it is a sum over rows, so row shards add their partial scores (one all-reduce)."""
    coeffs = dct_rows(grad) if side == RIGHT else dct_rows(grad.t())  # m x n, or n x m
    return coeffs.abs().sum(dim=0)


def top_indices(scores: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` largest scores' indices (ties to the lower index), sorted ascending, int64."""
    order = torch.sort(scores, descending=True, stable=True).indices[:rank]
    return torch.sort(order).values.to(torch.int64)


def dct_indices(grad: torch.Tensor, rank: int, side: int) -> torch.Tensor:
    """The ``rank`` DCT-II basis vectors most aligned with ``grad`` (largest L1 norm of the
    coefficients along the projected side), sorted ascending, int64."""
    return top_indices(dct_scores(grad, side), rank)


def matrix_shape(shape) -> tuple[int, int]:
    """The (m, n) a parameter of ``shape`` is projected as (see :func:`as_matrix`)."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (shape[0] if shape else 1, 1)


def dct_basis(indices: torch.Tensor, shape: tuple[int, int], side: int, dtype, device=None) -> torch.Tensor:
    """The projector matrix of stored DCT indices (same layout as :func:`svd_basis`)."""
    dim = shape[1] if side == RIGHT else shape[0]
    rows = dct_matrix(dim, dtype, device)[indices]  # r x dim
    return rows if side == RIGHT else rows.t()


# ---------------------------------------------------------------------------------------- use
def project(grad: torch.Tensor, basis: torch.Tensor, side: int) -> torch.Tensor:
    return torch.matmul(grad, basis.t()) if side == RIGHT else torch.matmul(basis.t(), grad)


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: int) -> torch.Tensor:
    return torch.matmul(low_rank, basis) if side == RIGHT else torch.matmul(basis, low_rank)
