"""Typed wrappers of commlib's custom ops (``torch.ops.commlib.*``).

The schemas live in :mod:`commlib.ops._schema`; the Python reference of each op is registered as
its ``CompositeExplicitAutograd`` kernel (the fallback on every device), and compiled CPU/CUDA
kernels, once loaded by :mod:`commlib._ext`, take over for their device through the dispatcher.
"""

from __future__ import annotations

import torch

from commlib import _ext
from commlib.ops import _reference, _schema  # noqa: F401  (_schema defines the ops)

for _name in _schema.SCHEMAS:
    torch.library.impl(f"commlib::{_name}", "CompositeExplicitAutograd")(getattr(_reference, _name))

from commlib.ops import _fake  # noqa: E402,F401  (registers the fake kernels)


def sign_pack(x: torch.Tensor, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the sign bits of ``x`` (1 = negative) 32 to an int32 word; scales = mean |x| per chunk.

    Returns ``(packed int32 [ceil(n/32)], scales float32 [chunks])``; ``chunk_size`` 0 = one chunk.
    """
    _ext.ensure_loaded()
    return torch.ops.commlib.sign_pack.default(x, chunk_size)


def sign_unpack(
    packed: torch.Tensor, scales: torch.Tensor, numel: int, chunk_size: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`sign_pack`: ``-scale`` where the bit is set, ``+scale`` elsewhere (1-D, ``numel``)."""
    _ext.ensure_loaded()
    return torch.ops.commlib.sign_unpack.default(packed, scales, numel, chunk_size, dtype)


def qsgd_quantize(x: torch.Tensor, bits: int, bucket_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastically round ``x`` onto 2^bits levels spanning [-max|x|, max|x|] per bucket.

    Randomness is a counter-based hash of ``(seed, element index)``. Returns
    ``(codes uint8 [ceil(n/8) * bits] bit-packed, scales float32 [ceil(n/bucket_size)])``.
    """
    _ext.ensure_loaded()
    return torch.ops.commlib.qsgd_quantize.default(x, bits, bucket_size, seed)


def qsgd_dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    bucket_size: int,
    numel: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`qsgd_quantize`: code c -> scale * (2c - L) / L with L = 2^bits - 1."""
    _ext.ensure_loaded()
    return torch.ops.commlib.qsgd_dequantize.default(codes, scales, bits, bucket_size, numel, dtype)


def topk_abs(x: torch.Tensor, k: int, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest magnitude of flattened ``x``: ``(values, int32 indices ascending)``.

    ``exact=False`` keeps the first ``k`` entries at or above a threshold estimated from 65536 hashed
    samples (faster, approximate; short results are padded with index 0 / value 0).
    """
    _ext.ensure_loaded()
    return torch.ops.commlib.topk_abs.default(x, k, exact)

# ------------------------------------------------------------------ fused error feedback
# Pass 1 compresses v = pad(g + e, numel) (g alone when ``residual`` is None) without writing v;
# pass 2, run after the collective once the step is known to be kept, writes
# e <- (g + e) - decompress(payload) in place (``accumulate=False``: e <- g - decompress, e's old
# contents unread). Both equal the reference's materialized ``ef_step`` bit for bit given the
# same payload (see commlib/ops/_reference.py).
def ef_sign_pack(grad: torch.Tensor, residual: torch.Tensor | None, chunk_size: int = 0,
                 numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sign_pack` of ``pad(grad + residual, numel)``."""
    _ext.ensure_loaded()
    return torch.ops.commlib.ef_sign_pack.default(grad, residual, chunk_size, grad.numel() if numel is None else numel)


def ef_sign_residual_(residual: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                      chunk_size: int = 0, numel: int | None = None, accumulate: bool = True) -> torch.Tensor:
    """``residual <- (grad + residual) - sign_unpack(packed, scales)`` in place; returns ``residual``."""
    _ext.ensure_loaded()
    torch.ops.commlib.ef_sign_residual_.default(residual, grad, packed, scales, chunk_size,
                                                grad.numel() if numel is None else numel, accumulate)
    return residual


def ef_qsgd_quantize(grad: torch.Tensor, residual: torch.Tensor | None, bits: int, bucket_size: int, seed: int,
                     numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qsgd_quantize` of ``pad(grad + residual, numel)``."""
    _ext.ensure_loaded()
    return torch.ops.commlib.ef_qsgd_quantize.default(grad, residual, bits, bucket_size, seed,
                                                      grad.numel() if numel is None else numel)


def ef_qsgd_residual_(residual: torch.Tensor, grad: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                      bits: int, bucket_size: int, numel: int | None = None, accumulate: bool = True) -> torch.Tensor:
    """``residual <- (grad + residual) - qsgd_dequantize(codes, scales)`` in place; returns ``residual``."""
    _ext.ensure_loaded()
    torch.ops.commlib.ef_qsgd_residual_.default(residual, grad, codes, scales, bits, bucket_size,
                                                grad.numel() if numel is None else numel, accumulate)
    return residual


def ef_topk_abs(grad: torch.Tensor, residual: torch.Tensor | None, k: int,
                exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_abs` of ``grad + residual``."""
    _ext.ensure_loaded()
    return torch.ops.commlib.ef_topk_abs.default(grad, residual, k, exact)


def ef_sparse_residual_(residual: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                        accumulate: bool = True) -> torch.Tensor:
    """``residual <- (grad + residual) - scatter_add(values at indices)`` in place (indices distinct
    except zero-valued padding); returns ``residual``."""
    _ext.ensure_loaded()
    torch.ops.commlib.ef_sparse_residual_.default(residual, grad, indices, values, accumulate)
    return residual


def ef_gather(grad: torch.Tensor, residual: torch.Tensor | None,
              indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad + residual)[indices]`` and a float32 guard: 0 when all of ``grad + residual`` is finite, else NaN."""
    _ext.ensure_loaded()
    return torch.ops.commlib.ef_gather.default(grad, residual, indices)


# ------------------------------------------------------------------ decompression in place
def sign_unpack_into_(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, chunk_size: int, numel: int,
                      dtype: torch.dtype, accumulate: bool) -> torch.Tensor:
    """``out <- (out +) sign_unpack(packed, scales, numel, chunk_size, dtype)[:out.numel()]``, rounded as
    ``out.add_(x.to(out.dtype))`` / ``out.copy_(x)`` round it; returns ``out``."""
    _ext.ensure_loaded()
    torch.ops.commlib.sign_unpack_into_.default(out, packed, scales, chunk_size, numel, dtype, accumulate)
    return out


def qsgd_dequantize_into_(out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                          bucket_size: int, numel: int, dtype: torch.dtype, accumulate: bool) -> torch.Tensor:
    """``out <- (out +) qsgd_dequantize(codes, scales, bits, bucket_size, numel, dtype)[:out.numel()]``;
    returns ``out``."""
    _ext.ensure_loaded()
    torch.ops.commlib.qsgd_dequantize_into_.default(out, codes, scales, bits, bucket_size, numel, dtype, accumulate)
    return out


# ------------------------------------------------------------------ PowerSGD, fused
def powersgd_project(grad: torch.Tensor, residual: torch.Tensor | None, q: torch.Tensor,
                     m: torch.Tensor) -> torch.Tensor:
    """``m <- grad + residual`` (``grad`` without a residual) and ``P = m q`` in one pass over the
    matrix (float32, ``grad`` rows x cols, ``q`` cols x r); returns ``P``."""
    _ext.ensure_loaded()
    return torch.ops.commlib.powersgd_project.default(grad, residual, q, m)


def powersgd_backproject_(m: torch.Tensor, p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out <- p q^T`` and ``m <- m - p q^T`` in one pass (float32); returns ``m``."""
    _ext.ensure_loaded()
    torch.ops.commlib.powersgd_backproject_.default(m, p, q, out)
    return m


__all__ = [
    "ef_gather", "ef_qsgd_quantize", "ef_qsgd_residual_", "ef_sign_pack", "ef_sign_residual_", "ef_sparse_residual_",
    "ef_topk_abs", "powersgd_backproject_", "powersgd_project", "qsgd_dequantize", "qsgd_dequantize_into_",
    "qsgd_quantize", "sign_pack", "sign_unpack", "sign_unpack_into_", "topk_abs",
]
