"""Random-k sparsification with indices from a shared seed (Stich et al., 2018)."""

import math

import torch

from commlib import ops
from commlib.compress.base import Compressor, Payload, derive_seed, numel_of
from commlib.compress.topk import topk_count
from commlib.validation import flag, fraction, integer


def random_indices(numel: int, k: int, seed: int, device) -> torch.Tensor:
    """k distinct indices in [0, numel), ascending, uniform over k-subsets, from a private generator
    seeded with ``seed`` (same on every rank; the global RNG is untouched).

    Sequential sampling with rejection: draw indices with replacement and keep the first k distinct
    ones in draw order, O(k log k) instead of a permutation of all ``numel`` (which costs more than
    the whole error-feedback round on a large gradient). Dense picks (k > numel / 4) permute.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if 4 * k > numel:
        return torch.sort(torch.randperm(numel, generator=gen)[:k]).values.to(device)
    while True:  # expected duplicates: ~k^2 / (2 numel) <= k / 8; one round almost always suffices
        draws = torch.randint(0, numel, (k + k // 4 + 16,), generator=gen)
        values, inverse = torch.unique(draws, return_inverse=True)
        if values.numel() >= k:
            break
    positions = torch.arange(draws.numel())
    first = torch.full((values.numel(),), draws.numel()).scatter_reduce_(0, inverse, positions, reduce="amin")
    chosen = values[torch.argsort(first)[:k]]
    return torch.sort(chosen).values.to(device)


class RandomK(Compressor):
    r"""Keeps ``k = ceil(density * n)`` entries at indices drawn from ``(seed, call seed)``.

    Every rank draws the same indices, so only the values travel and payloads add up under an
    allreduce (``summable``). If ``x`` holds inf/NaN anywhere, every value sent is NaN, so an
    overflow is never sampled away. ``unbiased=True`` scales by ``n / k`` so ``E[C(x)] = x``; the
    default (False) is the contraction ``E||C(x) - x||^2 = (1 - k/n) ||x||^2`` suited to
    error feedback. The global RNG is never touched.

    Arguments:
        density: fraction kept, in (0, 1].
        seed: base seed; hooks mix in the step and the layer so indices change every step.
        unbiased: scale by n / k.

    Example::

        >>> import torch
        >>> from commlib.compress import RandomK
        >>> c = RandomK(density=0.25, seed=0)
        >>> t = torch.arange(8.0)
        >>> p = c.compress(t, seed=7)
        >>> p.wire_bytes(), c.nbytes(t.shape)
        (8, 8)
    """

    summable = True
    name = "randomk"

    def __init__(self, density: float = 0.01, seed: int = 0, unbiased: bool = False):
        self.density = fraction("density", density)
        self.seed = integer("seed", seed, 0)
        flag("unbiased", unbiased)
        self.unbiased = unbiased

    def config(self):
        return {"density": self.density, "seed": self.seed, "unbiased": self.unbiased}

    def compress(self, tensor, *, seed=0):
        n = tensor.numel()
        k = topk_count(n, self.density)

        indices = random_indices(n, k, derive_seed(self.seed, seed), tensor.device)
        flat = tensor.reshape(-1)
        values = flat[indices]
        if self.unbiased and k:
            values = values * (n / k)
        # A non-finite value outside the sample must still reach the receiver (GradScaler has to
        # see the overflow): a guard that is 0 for finite input and NaN otherwise (not sum * 0,
        # which overflows to NaN for large finite values).
        low, high = torch.aminmax(flat) if n else (flat.new_zeros(()), flat.new_zeros(()))
        guard = torch.where(torch.isfinite(low) & torch.isfinite(high), 0.0, math.nan).to(values.dtype)
        values = values + guard
        return Payload((values,), tensor.shape, tensor.dtype, context=(indices,))

    def compress_ef(self, grad, residual, *, seed=0, numel=None):
        """Fused pass 1 (``ops.ef_gather``): the sampled values of ``grad + residual`` and the
        non-finite guard over all of it, in one read."""
        n = grad.numel()
        if numel not in (None, n) or grad.dtype == torch.float64:
            return super().compress_ef(grad, residual, seed=seed, numel=numel)
        k = topk_count(n, self.density)
        indices = random_indices(n, k, derive_seed(self.seed, seed), grad.device)
        values, guard = ops.ef_gather(grad.reshape(-1), None if residual is None else residual.reshape(-1), indices)
        if self.unbiased and k:
            values = values * (n / k)
        return Payload((values + guard.to(values.dtype),), grad.shape, grad.dtype, context=(indices,))

    def update_residual_(self, residual, grad, payload, accumulate=True):
        """Fused pass 2 (``ops.ef_sparse_residual_``)."""
        if numel_of(payload.shape) != grad.numel() or grad.dtype == torch.float64:
            return super().update_residual_(residual, grad, payload, accumulate)
        (values,), (indices,) = payload.tensors, payload.context
        ops.ef_sparse_residual_(residual.view(-1), grad.reshape(-1), indices, values, accumulate)
        return residual

    def touched_indices(self, payload):
        return payload.context[0]

    def decompress(self, payload):
        out = torch.zeros(numel_of(payload.shape), dtype=payload.dtype, device=payload.tensors[0].device)
        return self.decompress_add_(out, payload).view(payload.shape)

    def decompress_add_(self, out, payload):
        (values,), (indices,) = payload.tensors, payload.context
        flat = out.view(-1)
        flat.index_add_(0, indices, values.to(flat.dtype))
        return out

    def nbytes(self, shape, dtype=torch.float32):
        return topk_count(numel_of(shape), self.density) * torch.empty((), dtype=dtype).element_size()
