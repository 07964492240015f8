"""PowerSGD low-rank compression (Vogels, Karimireddy, Jaggi, NeurIPS 2019), as pure functions."""

from __future__ import annotations

import torch

from commlib.compress.base import Compressor, Payload, derive_seed, numel_of
from commlib.validation import integer, number


def matrix_shape(shape) -> tuple[int, int]:
    """How a tensor is seen as a matrix: (dim 0, product of the rest); 1-D as a column."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], numel_of(shape[1:])


def effective_rank(shape, rank: int) -> int:
    rows, cols = matrix_shape(shape)
    return max(1, min(rank, rows, cols))


def gram_schmidt_(matrices: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Orthonormalise the columns of a batch ``(b, n, r)`` in place (modified Gram-Schmidt).

    Same operations as PyTorch's PowerSGD hook, so the two agree numerically, except that an
    all-zero column stays zero (PyTorch's divides 0 by 0: a layer whose gradient is exactly zero
    then turns every rank's gradients into NaN). Zero in, zero out; NaN and inf still propagate.
    """
    for i in range(matrices.shape[2]):
        col = matrices[:, :, i : i + 1]
        if epsilon == 0:
            norm = torch.norm(col, dim=1, keepdim=True)
            col /= torch.where(norm > 0, norm, torch.ones_like(norm))
        else:
            col /= torch.norm(col, dim=1, keepdim=True) + epsilon
        if i + 1 < matrices.shape[2]:
            rest = matrices[:, :, i + 1 :]
            rest -= torch.sum(col * rest, dim=1, keepdim=True) * col
    return matrices


def orthogonalize_(matrices: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Gram-Schmidt for rank <= 2 or 16-bit dtypes, Householder QR otherwise (PyTorch's rule)."""
    if matrices.shape[2] <= 2 or matrices.dtype in (torch.float16, torch.bfloat16):
        return gram_schmidt_(matrices, epsilon)
    q, _ = torch.linalg.qr(matrices)
    return matrices.copy_(q)


def shared_gaussian(rows: int, cols: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A standard normal ``(rows, cols)`` matrix from a private generator: equal on every rank."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


class PowerSGD(Compressor):
    r"""Rank-``r`` approximation ``M ≈ P Q^T`` by one step of subspace iteration (Alg. 1 of the paper).

    ``P = M Q``, ``P <- orthogonalize(P)``, ``Q = M^T P``; ``decompress`` returns ``P Q^T``. Tensors
    are viewed as ``(shape[0], rest)`` matrices. ``compress(t, q=previous_q)`` warm-starts from the
    last step's ``Q`` (the paper's reuse of the previous factor); otherwise ``Q`` is a Gaussian
    drawn from ``seed``. In a data-parallel hook ``P`` and ``Q`` are each all-reduced (two rounds):
    ``M Q`` is linear in ``M`` for a shared ``Q``, and ``M^T P`` for the shared ``P``.

    Arguments:
        rank: target rank >= 1 (capped at min(rows, cols) per tensor).
        epsilon: added to column norms in Gram-Schmidt (0 = PyTorch's default).

    Example::

        >>> import torch
        >>> from commlib.compress import PowerSGD
        >>> c = PowerSGD(rank=2)
        >>> m = torch.randn(64, 2) @ torch.randn(2, 32)   # exactly rank 2
        >>> bool(torch.allclose(c.decompress(c.compress(m, seed=0)), m, atol=1e-4))
        True
    """

    summable = False
    name = "powersgd"

    def __init__(self, rank: int = 1, epsilon: float = 0.0):
        self.rank = integer("rank", rank, 1)
        number("epsilon", epsilon, low=0)
        self.epsilon = float(epsilon)

    def config(self):
        return {"rank": self.rank, "epsilon": self.epsilon}

    def initial_q(self, shape, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
        _, cols = matrix_shape(shape)
        return shared_gaussian(cols, effective_rank(shape, self.rank), derive_seed(seed, 0x9), dtype, device)

    def compress(self, tensor, *, seed=0, q: torch.Tensor | None = None):
        rows, cols = matrix_shape(tensor.shape)
        work_dtype = torch.float32 if tensor.dtype == torch.float64 else tensor.dtype
        m = tensor.reshape(rows, cols).to(work_dtype)
        if q is None:
            q = self.initial_q(tensor.shape, seed, work_dtype, tensor.device)
        p = m @ q.to(work_dtype)
        orthogonalize_(p.unsqueeze(0), self.epsilon)
        q = m.t() @ p
        return Payload((p, q), tensor.shape, tensor.dtype)

    def decompress(self, payload):
        p, q = payload.tensors
        return (p @ q.t()).to(payload.dtype).view(payload.shape)

    def nbytes(self, shape, dtype=torch.float32):
        rows, cols = matrix_shape(shape)
        elem = torch.empty((), dtype=torch.float32 if dtype == torch.float64 else dtype).element_size()
        return (rows + cols) * effective_rank(shape, self.rank) * elem
