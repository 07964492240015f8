"""Top-k sparsification by magnitude (Aji & Heafield, 2017; Stich et al., 2018)."""

import math

import torch

from commlib import ops
from commlib.compress.base import Compressor, Payload, numel_of
from commlib.validation import flag, fraction


def topk_count(numel: int, density: float) -> int:
    """k = ceil(density * numel), at least 1 for a non-empty tensor."""
    return 0 if numel == 0 else min(numel, max(1, math.ceil(density * numel)))


class TopK(Compressor):
    r"""Keeps the ``k = ceil(density * n)`` entries of largest magnitude: values + int32 indices.

    A contraction with ``||C(x) - x||^2 <= (1 - k/n) ||x||^2`` (alpha = k/n in EF21's theory).
    Ties go to the lower index; NaN and inf rank above every finite value, so they always travel.

    Arguments:
        density: fraction kept, in (0, 1].
        exact: True (default) returns exactly the top-k set. False estimates the threshold from
            65536 hashed samples and keeps the first k entries that reach it: faster, approximate
            (``benchmarks/bench_kernels.py`` reports its recall).

    Example::

        >>> import torch
        >>> from commlib.compress import TopK
        >>> c = TopK(density=0.5)
        >>> c.decompress(c.compress(torch.tensor([1.0, -3.0, 0.5, 2.0])))
        tensor([ 0., -3.,  0.,  2.])
    """

    summable = False
    name = "topk"

    def __init__(self, density: float = 0.01, exact: bool = True):
        self.density = fraction("density", density)
        flag("exact", exact)
        self.exact = exact

    def config(self):
        return {"density": self.density, "exact": self.exact}

    def compress(self, tensor, *, seed=0):
        if tensor.numel() >= 2**31:
            raise ValueError(f"TopK: a tensor of {tensor.numel()} elements needs indices beyond int32 (the wire "
                             "format); compress tensors of fewer than 2^31 elements (a smaller bucket_cap_mb)")
        k = topk_count(tensor.numel(), self.density)
        if tensor.dtype == torch.float64:  # the op covers the gradient dtypes; float64 (analysis, tests) sorts
            flat = tensor.reshape(-1)
            order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
            indices = torch.sort(order).values
            return Payload((flat[indices], indices.to(torch.int32)), tensor.shape, tensor.dtype)
        values, indices = ops.topk_abs(tensor, k, self.exact)
        return Payload((values, indices), tensor.shape, tensor.dtype)

    def compress_ef(self, grad, residual, *, seed=0, numel=None):
        """Fused pass 1 (``ops.ef_topk_abs``): the top-k of ``grad + residual`` computed where read."""
        if numel not in (None, grad.numel()) or grad.dtype == torch.float64:
            return super().compress_ef(grad, residual, seed=seed, numel=numel)
        k = topk_count(grad.numel(), self.density)
        values, indices = ops.ef_topk_abs(grad.reshape(-1), None if residual is None else residual.reshape(-1), k,
                                          self.exact)
        return Payload((values, indices), grad.shape if numel is None else torch.Size([numel]), grad.dtype)

    def update_residual_(self, residual, grad, payload, accumulate=True):
        """Fused pass 2 (``ops.ef_sparse_residual_``): ``g + e`` with what was sent taken out."""
        if numel_of(payload.shape) != grad.numel() or grad.dtype == torch.float64:
            return super().update_residual_(residual, grad, payload, accumulate)
        values, indices = payload.tensors
        ops.ef_sparse_residual_(residual.view(-1), grad.reshape(-1), indices, values, accumulate)
        return residual

    def touched_indices(self, payload):
        return payload.tensors[1]

    def decompress(self, payload):
        out = torch.zeros(numel_of(payload.shape), dtype=payload.dtype, device=payload.tensors[0].device)
        return self.decompress_add_(out, payload).view(payload.shape)

    def decompress_add_(self, out, payload):
        values, indices = payload.tensors
        flat = out.view(-1)
        flat.index_add_(0, indices.long(), values.to(flat.dtype))
        return out

    def nbytes(self, shape, dtype=torch.float32):
        k = topk_count(numel_of(shape), self.density)
        return k * (torch.empty((), dtype=dtype).element_size() + 4)
