"""Sparse payloads: top-k by magnitude (key = the bits of |x| as float32, so NaN > inf > finite;
ties go to the lower index; int32 indices), the fused error-feedback top-k, the residual of any
sparse payload (top-k or random-k) and the gather of ``g + e`` at given indices. Per op: its schema,
its pure-PyTorch reference (the spec the kernels in ``csrc/*/topk.*`` and ``ef_sparse.*`` match),
its fake kernel and its typed wrapper."""

from __future__ import annotations

import math

import torch

from commlib.ops._common import check_float, ef_corrected, hash32, write_residual
from commlib.ops._library import define, dispatch

__all__ = ["ef_gather", "ef_sparse_residual_", "ef_topk_abs", "topk_abs"]

TOPK_SAMPLES = 65536
INT32_INDEX_LIMIT = 2**31


def check_int32_indexable(op: str, numel: int) -> None:
    """Top-k payloads carry int32 indices (the wire format, the same on CPU and CUDA): a tensor of
    2^31 or more elements is refused instead of wrapping its indices around."""
    if numel >= INT32_INDEX_LIMIT:
        raise RuntimeError(f"commlib::{op}: int32 indices need numel < 2^31, got {numel}; split the tensor "
                           "(a smaller DDP bucket_cap_mb or per-parameter compression)")


def check_indices_in_range(op: str, indices: torch.Tensor, numel: int) -> None:
    """Every index in [0, numel), checked before anything is written (a host read)."""
    if indices.numel() and not bool(((indices >= 0) & (indices < numel)).all()):
        bad = indices[(indices < 0) | (indices >= numel)][0]
        raise RuntimeError(f"commlib::{op}: index {int(bad)} out of range [0, {numel})")


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    return (x.reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF).to(torch.int64)


def topk_sample_threshold(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The ceil(k m / n)-th largest key among m hashed sample positions."""
    n = keys.numel()
    m = min(n, TOPK_SAMPLES)
    rank = min(max(-(-k * m // n), 1), m)
    positions = hash32(torch.arange(m, device=keys.device, dtype=torch.int64) ^ 0x5BD1E995) % n
    return torch.topk(keys[positions], rank).values[-1]


def _topk_fake(like: torch.Tensor, k: int):
    return like.new_empty(k), like.new_empty(k, dtype=torch.int32)


# ------------------------------------------------------------------ topk_abs
def topk_abs_reference(x: torch.Tensor, k: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_float("topk_abs", x)
    flat = x.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise RuntimeError(f"commlib::topk_abs: k must be in [0, {n}], got {k}")
    check_int32_indexable("topk_abs", n)
    if k == 0:
        return flat.new_empty(0), torch.empty(0, dtype=torch.int32, device=x.device)
    keys = magnitude_key(flat)
    if exact:
        order = torch.sort(keys, descending=True, stable=True).indices[:k]
        indices = torch.sort(order).values
        return flat[indices], indices.to(torch.int32)
    chosen = torch.nonzero(keys >= topk_sample_threshold(keys, k)).view(-1)[:k]
    padding = k - chosen.numel()
    values = torch.nn.functional.pad(flat[chosen], (0, padding))
    indices = torch.nn.functional.pad(chosen, (0, padding))
    return values, indices.to(torch.int32)


define("topk_abs(Tensor x, int k, bool exact) -> (Tensor, Tensor)", topk_abs_reference,
       lambda x, k, exact: _topk_fake(x, k))


def topk_abs(x: torch.Tensor, k: int, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest magnitude of flattened ``x``: ``(values, int32 indices ascending)``.

    ``exact=False`` keeps the first ``k`` entries at or above a threshold estimated from 65536 hashed
    samples (faster, approximate; short results are padded with index 0 / value 0).
    """
    return dispatch("topk_abs", x, k, exact)


# ------------------------------------------------------------------ fused error feedback
def ef_topk_abs_reference(grad, residual, k: int, exact: bool):
    return topk_abs_reference(ef_corrected(grad, residual), k, exact)


define("ef_topk_abs(Tensor grad, Tensor? residual, int k, bool exact) -> (Tensor, Tensor)", ef_topk_abs_reference,
       lambda grad, residual, k, exact: _topk_fake(grad, k))


def ef_topk_abs(grad: torch.Tensor, residual: torch.Tensor | None, k: int,
                exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_abs` of ``grad + residual``."""
    return dispatch("ef_topk_abs", grad, residual, k, exact)


def ef_sparse_residual_reference(residual, grad, indices, values, accumulate: bool) -> None:
    if values.dtype != grad.dtype or values.numel() != indices.numel():
        raise RuntimeError("commlib::ef_sparse_residual_: values must match grad's dtype and the indices' count")
    check_indices_in_range("ef_sparse_residual_", indices, grad.numel())
    hat = torch.zeros(grad.numel(), dtype=grad.dtype, device=grad.device).index_add_(0, indices.long(), values)
    write_residual(residual, grad, accumulate, hat)


define("ef_sparse_residual_(Tensor(a!) residual, Tensor grad, Tensor indices, Tensor values, bool accumulate) -> ()",
       ef_sparse_residual_reference, lambda *args: None)


def ef_sparse_residual_(residual: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                        accumulate: bool = True) -> torch.Tensor:
    """``residual <- (grad + residual) - scatter_add(values at indices)`` in place (indices distinct
    except zero-valued padding); returns ``residual``."""
    dispatch("ef_sparse_residual_", residual, grad, indices, values, accumulate)
    return residual


def ef_gather_reference(grad, residual, indices):
    check_indices_in_range("ef_gather", indices, grad.numel())
    flat = ef_corrected(grad, residual)
    low, high = torch.aminmax(flat) if flat.numel() else (flat.new_zeros(()), flat.new_zeros(()))
    finite = torch.isfinite(low) & torch.isfinite(high)
    guard = torch.where(finite, 0.0, math.nan).to(torch.float32)
    return flat[indices.long()], guard


define("ef_gather(Tensor grad, Tensor? residual, Tensor indices) -> (Tensor, Tensor)", ef_gather_reference,
       lambda grad, residual, indices: (grad.new_empty(indices.numel()), grad.new_empty((), dtype=torch.float32)))


def ef_gather(grad: torch.Tensor, residual: torch.Tensor | None,
              indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad + residual)[indices]`` and a float32 guard: 0 when all of ``grad + residual`` is finite, else NaN."""
    return dispatch("ef_gather", grad, residual, indices)
