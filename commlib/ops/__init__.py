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


__all__ = ["qsgd_dequantize", "qsgd_quantize", "sign_pack", "sign_unpack", "topk_abs"]
