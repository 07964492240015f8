"""QSGD-style quantization: 2^bits levels on [-scale, scale], scale = max |x| per bucket, stochastic
rounding from the counter-based hash of (seed, element index), codes bit-packed: quantize and
dequantize, their fused error-feedback passes and dequantize into an existing tensor. Per op: its
schema, its pure-PyTorch reference (the spec the kernels in ``csrc/*/qsgd.*`` match bit for bit),
its fake kernel and its typed wrapper."""

from __future__ import annotations

import torch

from commlib.ops._common import check_float, ef_corrected, seed_key, store_into, uniform24, write_residual
from commlib.ops._library import define, dispatch

__all__ = ["ef_qsgd_quantize", "ef_qsgd_residual_", "qsgd_dequantize", "qsgd_dequantize_into_", "qsgd_quantize"]


def check_qsgd(name: str, bits: int, bucket_size: int) -> None:
    if not 1 <= bits <= 8:
        raise RuntimeError(f"commlib::{name}: bits must be in [1, 8], got {bits}")
    if bucket_size < 8 or bucket_size % 8:
        raise RuntimeError(f"commlib::{name}: bucket_size must be a positive multiple of 8, got {bucket_size}")


def qsgd_code_bytes(numel: int, bits: int) -> int:
    return -(-numel // 8) * bits


def _quantized_fake(like: torch.Tensor, numel: int, bits: int, bucket_size: int):
    return (like.new_empty(qsgd_code_bytes(numel, bits), dtype=torch.uint8),
            like.new_empty(-(-numel // bucket_size), dtype=torch.float32))


# ------------------------------------------------------------------ qsgd_quantize
def qsgd_quantize_reference(x: torch.Tensor, bits: int, bucket_size: int,
                            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_float("qsgd_quantize", x)
    check_qsgd("qsgd_quantize", bits, bucket_size)
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    buckets = -(-n // bucket_size)
    padded = torch.nn.functional.pad(flat, (0, buckets * bucket_size - n)).view(buckets, bucket_size)
    scales = padded.abs().amax(dim=1) if buckets else torch.zeros(0, device=x.device)
    inv_scale = torch.where(scales > 0, torch.reciprocal(scales), torch.zeros_like(scales))
    levels = (1 << bits) - 1
    half_levels = torch.tensor(levels * 0.5, dtype=torch.float32, device=x.device)
    t = ((padded * inv_scale[:, None] + 1.0) * half_levels).view(-1)[:n]
    top = torch.tensor(float(levels), dtype=torch.float32, device=x.device)
    ts = torch.where(t > 0, torch.minimum(t, top), torch.zeros_like(t))  # NaN -> 0
    lower = torch.trunc(ts)
    u = uniform24(seed_key(seed), torch.arange(n, device=x.device, dtype=torch.int64))
    codes = (lower.to(torch.int64) + (u < (ts - lower)).to(torch.int64)).clamp(max=levels)
    groups = -(-n // 8)
    codes = torch.nn.functional.pad(codes, (0, groups * 8 - n)).view(groups, 8, 1)
    bit_index = torch.arange(bits, device=x.device, dtype=torch.int64)
    stream = ((codes >> bit_index) & 1).view(groups * bits, 8)  # bit p of a group = bit p%b of code p//b
    byte = (stream << torch.arange(8, device=x.device, dtype=torch.int64)).sum(dim=1)
    return byte.to(torch.uint8), scales.to(torch.float32)


define("qsgd_quantize(Tensor x, int bits, int bucket_size, int seed) -> (Tensor, Tensor)", qsgd_quantize_reference,
       lambda x, bits, bucket_size, seed: _quantized_fake(x, x.numel(), bits, bucket_size))


def qsgd_quantize(x: torch.Tensor, bits: int, bucket_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastically round ``x`` onto 2^bits levels spanning [-max|x|, max|x|] per bucket.

    Randomness is a counter-based hash of ``(seed, element index)``. Returns
    ``(codes uint8 [ceil(n/8) * bits] bit-packed, scales float32 [ceil(n/bucket_size)])``.
    """
    return dispatch("qsgd_quantize", x, bits, bucket_size, seed)


# ------------------------------------------------------------------ qsgd_dequantize
def qsgd_dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, bits: int, bucket_size: int, numel: int,
                              dtype: torch.dtype) -> torch.Tensor:
    check_qsgd("qsgd_dequantize", bits, bucket_size)
    if codes.dtype != torch.uint8 or codes.numel() != qsgd_code_bytes(numel, bits):
        raise RuntimeError(f"commlib::qsgd_dequantize: codes must be {qsgd_code_bytes(numel, bits)} uint8 bytes")
    buckets = -(-numel // bucket_size)
    if scales.dtype != torch.float32 or scales.numel() != buckets:
        raise RuntimeError(f"commlib::qsgd_dequantize: expected {buckets} float32 scales, got {scales.numel()}")
    groups = -(-numel // 8)
    bytes_ = codes.to(torch.int64).view(groups * bits, 1)
    stream = ((bytes_ >> torch.arange(8, device=codes.device, dtype=torch.int64)) & 1).view(groups, 8, bits)
    code = (stream << torch.arange(bits, device=codes.device, dtype=torch.int64)).sum(dim=2).view(-1)[:numel]
    levels = (1 << bits) - 1
    inv_levels = torch.tensor(1.0 / levels, dtype=torch.float32, device=codes.device)
    unit = (2.0 * code.to(torch.float32) - float(levels)) * inv_levels
    per_element = scales.repeat_interleave(bucket_size)[:numel] if buckets else scales
    return (per_element * unit).to(dtype)


def _qsgd_dequantize_fake(codes, scales, bits, bucket_size, numel, dtype):
    torch._check(codes.numel() == qsgd_code_bytes(numel, bits))
    return codes.new_empty(numel, dtype=dtype)


define("qsgd_dequantize(Tensor codes, Tensor scales, int bits, int bucket_size, int numel, ScalarType dtype)"
       " -> Tensor", qsgd_dequantize_reference, _qsgd_dequantize_fake)


def qsgd_dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, bucket_size: int, numel: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`qsgd_quantize`: code c -> scale * (2c - L) / L with L = 2^bits - 1."""
    return dispatch("qsgd_dequantize", codes, scales, bits, bucket_size, numel, dtype)


# ------------------------------------------------------------------ fused error feedback
# As in commlib.ops.sign: pass 1 quantizes v = pad(g + e, numel) without writing v, pass 2 writes
# e <- (g + e) - dequantize(payload) in place once the step is known to be kept.
def ef_qsgd_quantize_reference(grad, residual, bits: int, bucket_size: int, seed: int, numel: int):
    return qsgd_quantize_reference(ef_corrected(grad, residual, numel), bits, bucket_size, seed)


define("ef_qsgd_quantize(Tensor grad, Tensor? residual, int bits, int bucket_size, int seed, int numel)"
       " -> (Tensor, Tensor)", ef_qsgd_quantize_reference,
       lambda grad, residual, bits, bucket_size, seed, numel: _quantized_fake(grad, numel, bits, bucket_size))


def ef_qsgd_quantize(grad: torch.Tensor, residual: torch.Tensor | None, bits: int, bucket_size: int, seed: int,
                     numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qsgd_quantize` of ``pad(grad + residual, numel)``."""
    return dispatch("ef_qsgd_quantize", grad, residual, bits, bucket_size, seed,
                    grad.numel() if numel is None else numel)


def ef_qsgd_residual_reference(residual, grad, codes, scales, bits: int, bucket_size: int, numel: int,
                               accumulate: bool) -> None:
    write_residual(residual, grad, accumulate,
                   qsgd_dequantize_reference(codes, scales, bits, bucket_size, numel, grad.dtype))


define("ef_qsgd_residual_(Tensor(a!) residual, Tensor grad, Tensor codes, Tensor scales, int bits,"
       " int bucket_size, int numel, bool accumulate) -> ()", ef_qsgd_residual_reference, lambda *args: None)


def ef_qsgd_residual_(residual: torch.Tensor, grad: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                      bits: int, bucket_size: int, numel: int | None = None, accumulate: bool = True) -> torch.Tensor:
    """``residual <- (grad + residual) - qsgd_dequantize(codes, scales)`` in place; returns ``residual``."""
    dispatch("ef_qsgd_residual_", residual, grad, codes, scales, bits, bucket_size,
             grad.numel() if numel is None else numel, accumulate)
    return residual


# ------------------------------------------------------------------ dequantize into an existing tensor
def qsgd_dequantize_into_reference(out, codes, scales, bits: int, bucket_size: int, numel: int, dtype,
                                   accumulate: bool) -> None:
    store_into(out, qsgd_dequantize_reference(codes, scales, bits, bucket_size, numel, dtype), accumulate)


define("qsgd_dequantize_into_(Tensor(a!) out, Tensor codes, Tensor scales, int bits, int bucket_size, int numel,"
       " ScalarType dtype, bool accumulate) -> ()", qsgd_dequantize_into_reference, lambda *args: None)


def qsgd_dequantize_into_(out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                          bucket_size: int, numel: int, dtype: torch.dtype, accumulate: bool) -> torch.Tensor:
    """``out <- (out +) qsgd_dequantize(codes, scales, bits, bucket_size, numel, dtype)[:out.numel()]``;
    returns ``out``."""
    dispatch("qsgd_dequantize_into_", out, codes, scales, bits, bucket_size, numel, dtype, accumulate)
    return out
