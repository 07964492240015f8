"""1-bit signs, 32 to an int32 word (bit j of word w = the sign bit of element 32 w + j), with one
float32 scale, the mean |x|, per chunk: pack and unpack, their fused error-feedback passes and unpack
into an existing tensor. Per op: its schema, its pure-PyTorch reference (the spec the kernels in
``csrc/*/sign.*`` match), its fake kernel and its typed wrapper."""

from __future__ import annotations

import torch

from commlib.ops._common import check_float, chunking, ef_corrected, store_into, write_residual
from commlib.ops._library import define, dispatch

__all__ = ["ef_sign_pack", "ef_sign_residual_", "sign_pack", "sign_unpack", "sign_unpack_into_"]


def _chunks(numel: int, chunk_size: int) -> int:
    return chunking(numel, chunk_size)[1]


# ------------------------------------------------------------------ sign_pack
def sign_pack_reference(x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_float("sign_pack", x)
    if chunk_size < 0 or chunk_size % 32:
        raise RuntimeError(f"commlib::sign_pack: chunk_size must be 0 or a positive multiple of 32, got {chunk_size}")
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    words = -(-n // 32)
    bits = torch.signbit(flat).to(torch.int64)
    bits = torch.nn.functional.pad(bits, (0, words * 32 - n)).view(words, 32)
    shifts = torch.arange(32, device=x.device, dtype=torch.int64)
    packed = (bits << shifts).sum(dim=1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    chunk, chunks = chunking(n, chunk_size)
    absval = torch.nn.functional.pad(flat.abs().to(torch.float64), (0, chunks * chunk - n))
    counts = torch.full((chunks,), chunk, dtype=torch.float64, device=x.device)
    if chunks:
        counts[-1] = n - (chunks - 1) * chunk
    scales = (absval.view(chunks, chunk).sum(dim=1) / counts).to(torch.float32)
    return packed, scales


define("sign_pack(Tensor x, int chunk_size) -> (Tensor, Tensor)", sign_pack_reference,
       lambda x, chunk_size: (x.new_empty(-(-x.numel() // 32), dtype=torch.int32),
                              x.new_empty(_chunks(x.numel(), chunk_size), dtype=torch.float32)))


def sign_pack(x: torch.Tensor, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the sign bits of ``x`` (1 = negative) 32 to an int32 word; scales = mean |x| per chunk.

    Returns ``(packed int32 [ceil(n/32)], scales float32 [chunks])``; ``chunk_size`` 0 = one chunk.
    """
    return dispatch("sign_pack", x, chunk_size)


# ------------------------------------------------------------------ sign_unpack
def sign_unpack_reference(packed: torch.Tensor, scales: torch.Tensor, numel: int, chunk_size: int,
                          dtype: torch.dtype) -> torch.Tensor:
    words = -(-numel // 32)
    if packed.dtype != torch.int32 or packed.numel() != words:
        raise RuntimeError(f"commlib::sign_unpack: packed must be {words} int32 words")
    chunk, chunks = chunking(numel, chunk_size)
    if scales.dtype != torch.float32 or scales.numel() != chunks:
        raise RuntimeError(f"commlib::sign_unpack: expected {chunks} float32 scales, got {scales.numel()}")
    shifts = torch.arange(32, device=packed.device, dtype=torch.int64)
    bits = ((packed.to(torch.int64).view(words, 1) >> shifts) & 1).view(-1)[:numel].bool()
    per_element = scales.repeat_interleave(chunk)[:numel] if chunks else scales
    return torch.where(bits, -per_element, per_element).to(dtype)


def _sign_unpack_fake(packed, scales, numel, chunk_size, dtype):
    torch._check(packed.numel() == -(-numel // 32))
    return packed.new_empty(numel, dtype=dtype)


define("sign_unpack(Tensor packed, Tensor scales, int numel, int chunk_size, ScalarType dtype) -> Tensor",
       sign_unpack_reference, _sign_unpack_fake)


def sign_unpack(packed: torch.Tensor, scales: torch.Tensor, numel: int, chunk_size: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`sign_pack`: ``-scale`` where the bit is set, ``+scale`` elsewhere (1-D, ``numel``)."""
    return dispatch("sign_unpack", packed, scales, numel, chunk_size, dtype)


# ------------------------------------------------------------------ fused error feedback
# Pass 1 packs v = pad(g + e, numel) (g alone when ``residual`` is None) without writing v; pass 2,
# after the collective once the step is known to be kept, writes e <- (g + e) - unpack(payload) in
# place (``accumulate=False``: e <- g - unpack, e's old contents unread). The kernels equal these
# references bit for bit given the same payload.
def ef_sign_pack_reference(grad, residual, chunk_size: int, numel: int):
    return sign_pack_reference(ef_corrected(grad, residual, numel), chunk_size)


define("ef_sign_pack(Tensor grad, Tensor? residual, int chunk_size, int numel) -> (Tensor, Tensor)",
       ef_sign_pack_reference,
       lambda grad, residual, chunk_size, numel: (grad.new_empty(-(-numel // 32), dtype=torch.int32),
                                                  grad.new_empty(_chunks(numel, chunk_size), dtype=torch.float32)))


def ef_sign_pack(grad: torch.Tensor, residual: torch.Tensor | None, chunk_size: int = 0,
                 numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sign_pack` of ``pad(grad + residual, numel)``."""
    return dispatch("ef_sign_pack", grad, residual, chunk_size, grad.numel() if numel is None else numel)


def ef_sign_residual_reference(residual, grad, packed, scales, chunk_size: int, numel: int, accumulate: bool) -> None:
    write_residual(residual, grad, accumulate, sign_unpack_reference(packed, scales, numel, chunk_size, grad.dtype))


define("ef_sign_residual_(Tensor(a!) residual, Tensor grad, Tensor packed, Tensor scales, int chunk_size, "
       "int numel, bool accumulate) -> ()", ef_sign_residual_reference, lambda *args: None)


def ef_sign_residual_(residual: torch.Tensor, grad: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                      chunk_size: int = 0, numel: int | None = None, accumulate: bool = True) -> torch.Tensor:
    """``residual <- (grad + residual) - sign_unpack(packed, scales)`` in place; returns ``residual``."""
    dispatch("ef_sign_residual_", residual, grad, packed, scales, chunk_size,
             grad.numel() if numel is None else numel, accumulate)
    return residual


# ------------------------------------------------------------------ unpack into an existing tensor
def sign_unpack_into_reference(out, packed, scales, chunk_size: int, numel: int, dtype, accumulate: bool) -> None:
    store_into(out, sign_unpack_reference(packed, scales, numel, chunk_size, dtype), accumulate)


define("sign_unpack_into_(Tensor(a!) out, Tensor packed, Tensor scales, int chunk_size, int numel, "
       "ScalarType dtype, bool accumulate) -> ()", sign_unpack_into_reference, lambda *args: None)


def sign_unpack_into_(out: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, chunk_size: int, numel: int,
                      dtype: torch.dtype, accumulate: bool) -> torch.Tensor:
    """``out <- (out +) sign_unpack(packed, scales, numel, chunk_size, dtype)[:out.numel()]``, rounded as
    ``out.add_(x.to(out.dtype))`` / ``out.copy_(x)`` round it; returns ``out``."""
    dispatch("sign_unpack_into_", out, packed, scales, chunk_size, numel, dtype, accumulate)
    return out
