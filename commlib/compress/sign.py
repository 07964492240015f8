"""Scaled 1-bit sign compression (signSGD with a magnitude, as in 1-bit Adam / EF-signSGD)."""

import torch

from commlib import ops
from commlib.compress.base import Compressor, Payload, numel_of
from commlib.validation import flag, integer


def unscaled_guard(scales: torch.Tensor) -> torch.Tensor:
    """The one float of ``scaled=False``: 1; 0 if all zero; NaN if any |x| is inf/NaN."""
    total = scales.sum()
    return ((total > 0).float() + total * 0).reshape(1)


class Sign(Compressor):
    r"""One bit per value, 32 packed to a word, and one scale per chunk.

    ``decompress`` gives ``scale * sign(x)`` with ``scale = mean |x|`` over the chunk (Karimireddy
    et al., 2019, EF-signSGD: ``||x||_1 / d`` makes ``C`` a contraction, the right partner for
    error feedback). ``scaled=False`` reconstructs ``±1`` and sends one float32 guard per tensor
    (1; 0 for an all-zero tensor, which then stays zero; NaN when the input holds inf/NaN, so an
    overflow still reaches the receiver).

    Arguments:
        scaled: send the per-chunk scale (default True).
        chunk_size: values per scale; 0 (default) = one scale for the whole tensor; else a
            multiple of 32.

    Example::

        >>> import torch
        >>> from commlib.compress import Sign
        >>> c = Sign()
        >>> t = torch.tensor([0.5, -1.5, 2.0, -1.0])
        >>> c.decompress(c.compress(t))
        tensor([ 1.2500, -1.2500,  1.2500, -1.2500])
    """

    summable = False
    name = "sign"

    def __init__(self, scaled: bool = True, chunk_size: int = 0):
        flag("scaled", scaled)
        integer("chunk_size", chunk_size, 0)
        if chunk_size % 32:
            raise ValueError(f"chunk_size must be 0 or a positive multiple of 32, got {chunk_size!r}")
        self.scaled = scaled
        self.chunk_size = chunk_size

    def config(self):
        return {"scaled": self.scaled, "chunk_size": self.chunk_size}

    def _chunks(self, n: int) -> int:
        if n == 0:
            return 0
        return 1 if self.chunk_size == 0 or self.chunk_size >= n else -(-n // self.chunk_size)

    def compress(self, tensor, *, seed=0):
        packed, scales = ops.sign_pack(tensor, self.chunk_size)
        if not self.scaled:
            return Payload((packed, unscaled_guard(scales)), tensor.shape, tensor.dtype)
        return Payload((packed, scales), tensor.shape, tensor.dtype)

    def decompress(self, payload):
        n = numel_of(payload.shape)
        packed, scales = payload.tensors
        if not self.scaled:
            scales = scales.expand(self._chunks(n)).contiguous()
        return ops.sign_unpack(packed, scales, n, self.chunk_size, payload.dtype).view(payload.shape)

    def _unpack_into(self, out, payload, accumulate):
        packed, scales = payload.tensors
        n = numel_of(payload.shape)
        if not self.scaled:
            scales = scales.expand(self._chunks(n)).contiguous()
        ops.sign_unpack_into_(out.view(-1), packed, scales, self.chunk_size, n, payload.dtype, accumulate)
        return out

    def decompress_add_(self, out, payload):
        """``out += decompress(payload)`` in one pass (``ops.sign_unpack_into_``)."""
        if not out.is_contiguous() or out.numel() != numel_of(payload.shape):
            return super().decompress_add_(out, payload)
        return self._unpack_into(out, payload, True)

    def decompress_into_(self, out, payload):
        if not out.is_contiguous():
            return super().decompress_into_(out, payload)
        return self._unpack_into(out, payload, False)

    def compress_ef(self, grad, residual, *, seed=0, numel=None):
        """Fused pass 1 (``ops.ef_sign_pack``): the signs and scales of ``pad(grad + residual)``."""
        flat = grad.reshape(-1)
        total = flat.numel() if numel is None else numel
        packed, scales = ops.ef_sign_pack(flat, None if residual is None else residual.reshape(-1), self.chunk_size,
                                          total)
        shape = grad.shape if numel is None else torch.Size([numel])
        if not self.scaled:
            return Payload((packed, unscaled_guard(scales)), shape, grad.dtype)
        return Payload((packed, scales), shape, grad.dtype)

    def update_residual_(self, residual, grad, payload, accumulate=True):
        """Fused pass 2 (``ops.ef_sign_residual_``)."""
        packed, scales = payload.tensors
        n = numel_of(payload.shape)
        if not self.scaled:
            scales = scales.expand(self._chunks(n)).contiguous()
        ops.ef_sign_residual_(residual.view(-1), grad.reshape(-1), packed, scales, self.chunk_size, n, accumulate)
        return residual

    def nbytes(self, shape, dtype=torch.float32):
        n = numel_of(shape)
        return 4 * -(-n // 32) + (4 * self._chunks(n) if self.scaled else 4)
