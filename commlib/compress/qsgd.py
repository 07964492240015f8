"""QSGD-style b-bit stochastic quantization per bucket (Alistarh et al., 2017)."""

import torch

from commlib import ops
from commlib.compress.base import Compressor, Payload, numel_of
from commlib.validation import integer


class QSGD(Compressor):
    r"""Unbiased stochastic quantization to ``2**bits`` levels per bucket.

    Each bucket of ``bucket_size`` consecutive values is scaled by its max-norm ``s = max|x|``
    (the ∞-norm variant of QSGD, lower variance than the 2-norm at the same bits) and every value
    is rounded stochastically to one of its two neighbours on the grid
    ``s * (2c - L) / L``, ``c = 0..L``, ``L = 2**bits - 1``. Hence ``E[Q(x)] = x`` and each
    value's error is below the grid step ``2 s / L``; the variance is at most ``(s / L)**2``.
    Codes are bit-packed (``bits`` bits per value) with one float32 scale per bucket.
    Randomness is a counter-based hash of ``(seed, index)``: no generator state.

    Arguments:
        bits: 1..8. 8 bits loses little; 2-4 bits need error feedback.
        bucket_size: multiple of 8 (default 512). Smaller buckets track local scale better at
            4 bytes of scale per bucket.

    Example::

        >>> import torch
        >>> from commlib.compress import QSGD
        >>> c = QSGD(bits=4, bucket_size=512)
        >>> t = torch.randn(1000)
        >>> p = c.compress(t, seed=1)
        >>> p.wire_bytes() == c.nbytes(t.shape)
        True
        >>> bool((c.decompress(p) - t).abs().max() <= 2 * t.abs().max() / 15)
        True
    """

    summable = False
    name = "qsgd"

    def __init__(self, bits: int = 8, bucket_size: int = 512):
        self.bits = integer("bits", bits, 1, 8)
        integer("bucket_size", bucket_size, 8)
        if bucket_size % 8:
            raise ValueError(f"bucket_size must be a positive multiple of 8, got {bucket_size!r}")
        self.bucket_size = bucket_size

    def config(self):
        return {"bits": self.bits, "bucket_size": self.bucket_size}

    def compress(self, tensor, *, seed=0):
        codes, scales = ops.qsgd_quantize(tensor, self.bits, self.bucket_size, seed)
        return Payload((codes, scales), tensor.shape, tensor.dtype)

    def decompress(self, payload):
        codes, scales = payload.tensors
        n = numel_of(payload.shape)
        flat = ops.qsgd_dequantize(codes, scales, self.bits, self.bucket_size, n, payload.dtype)
        return flat.view(payload.shape)

    def _dequantize_into(self, out, payload, accumulate):
        codes, scales = payload.tensors
        ops.qsgd_dequantize_into_(out.view(-1), codes, scales, self.bits, self.bucket_size, numel_of(payload.shape),
                                  payload.dtype, accumulate)
        return out

    def decompress_add_(self, out, payload):
        """``out += decompress(payload)`` in one pass (``ops.qsgd_dequantize_into_``)."""
        if not out.is_contiguous() or out.numel() != numel_of(payload.shape):
            return super().decompress_add_(out, payload)
        return self._dequantize_into(out, payload, True)

    def decompress_into_(self, out, payload):
        if not out.is_contiguous():
            return super().decompress_into_(out, payload)
        return self._dequantize_into(out, payload, False)

    def compress_ef(self, grad, residual, *, seed=0, numel=None):
        """Fused pass 1 (``ops.ef_qsgd_quantize``): codes and scales of ``pad(grad + residual)``."""
        flat = grad.reshape(-1)
        total = flat.numel() if numel is None else numel
        codes, scales = ops.ef_qsgd_quantize(flat, None if residual is None else residual.reshape(-1), self.bits,
                                             self.bucket_size, seed, total)
        return Payload((codes, scales), grad.shape if numel is None else torch.Size([numel]), grad.dtype)

    def update_residual_(self, residual, grad, payload, accumulate=True):
        """Fused pass 2 (``ops.ef_qsgd_residual_``)."""
        codes, scales = payload.tensors
        ops.ef_qsgd_residual_(residual.view(-1), grad.reshape(-1), codes, scales, self.bits, self.bucket_size,
                              numel_of(payload.shape), accumulate)
        return residual

    def nbytes(self, shape, dtype=torch.float32):
        n = numel_of(shape)
        return -(-n // 8) * self.bits + 4 * -(-n // self.bucket_size)
