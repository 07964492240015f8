"""Pure-PyTorch references of every commlib op: the readable spec and the fallback kernel.

Each function computes the same float32 operations, in the same order, as the element logic in
``csrc/include/commlib/elementwise.h``; so C++/CUDA kernels agree with these bit for bit on codes,
bits and indices. The only float reductions (sign scales) are accumulated in float64 here and in
float32-then-float64 blocks in C++: they agree to about 1e-7 relative.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
TOPK_SAMPLES = 65536


# --------------------------------------------------------------------------------------------
# Counter-based randomness (lowbias32 hash), identical to elementwise.h.
def hash32(x: torch.Tensor) -> torch.Tensor:
    """32-bit avalanche hash of an int64 tensor holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def hash32_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    s = seed & 0xFFFFFFFFFFFFFFFF
    return hash32_int(hash32_int((s & MASK32) ^ 0x9E3779B9) ^ (s >> 32))


def uniform24(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) with 24 random bits for each int64 element index."""
    high = hash32((index >> 32) ^ key)
    h = hash32((index & MASK32) ^ high)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def _check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"commlib::{name}: expected float32, bfloat16 or float16, got {x.dtype}")


def _chunking(numel: int, chunk_size: int) -> tuple[int, int]:
    """(chunk length, number of chunks); chunk_size 0 means one chunk for the whole tensor."""
    chunk = max(numel, 1) if chunk_size == 0 or chunk_size >= numel else chunk_size
    return chunk, (0 if numel == 0 else -(-numel // chunk))


# --------------------------------------------------------------------------------------------
# 1-bit signs, 32 to an int32 word (bit j of word w = sign bit of element 32 w + j).
def sign_pack(x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float("sign_pack", x)
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
    chunk, chunks = _chunking(n, chunk_size)
    absval = torch.nn.functional.pad(flat.abs().to(torch.float64), (0, chunks * chunk - n))
    counts = torch.full((chunks,), chunk, dtype=torch.float64, device=x.device)
    if chunks:
        counts[-1] = n - (chunks - 1) * chunk
    scales = (absval.view(chunks, chunk).sum(dim=1) / counts).to(torch.float32)
    return packed, scales


def sign_unpack(
    packed: torch.Tensor, scales: torch.Tensor, numel: int, chunk_size: int, dtype: torch.dtype
) -> torch.Tensor:
    words = -(-numel // 32)
    if packed.dtype != torch.int32 or packed.numel() != words:
        raise RuntimeError(f"commlib::sign_unpack: packed must be {words} int32 words")
    chunk, chunks = _chunking(numel, chunk_size)
    if scales.dtype != torch.float32 or scales.numel() != chunks:
        raise RuntimeError(f"commlib::sign_unpack: expected {chunks} float32 scales, got {scales.numel()}")
    shifts = torch.arange(32, device=packed.device, dtype=torch.int64)
    bits = ((packed.to(torch.int64).view(words, 1) >> shifts) & 1).view(-1)[:numel].bool()
    per_element = scales.repeat_interleave(chunk)[:numel] if chunks else scales
    return torch.where(bits, -per_element, per_element).to(dtype)


# --------------------------------------------------------------------------------------------
# QSGD-style quantization: 2^bits levels on [-scale, scale], scale = max |x| per bucket.
def _check_qsgd(name: str, bits: int, bucket_size: int) -> None:
    if not 1 <= bits <= 8:
        raise RuntimeError(f"commlib::{name}: bits must be in [1, 8], got {bits}")
    if bucket_size < 8 or bucket_size % 8:
        raise RuntimeError(f"commlib::{name}: bucket_size must be a positive multiple of 8, got {bucket_size}")


def qsgd_code_bytes(numel: int, bits: int) -> int:
    return -(-numel // 8) * bits


def qsgd_quantize(x: torch.Tensor, bits: int, bucket_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float("qsgd_quantize", x)
    _check_qsgd("qsgd_quantize", bits, bucket_size)
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


def qsgd_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, bucket_size: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    _check_qsgd("qsgd_dequantize", bits, bucket_size)
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


# --------------------------------------------------------------------------------------------
# Top-k by magnitude. Key = bits of |x| as float32 (NaN > inf > finite); ties by lower index.
INT32_INDEX_LIMIT = 2**31


def check_int32_indexable(op: str, numel: int) -> None:
    """Top-k payloads carry int32 indices (the wire format, the same on CPU and CUDA): a tensor of
    2^31 or more elements is refused instead of wrapping its indices around."""
    if numel >= INT32_INDEX_LIMIT:
        raise RuntimeError(f"commlib::{op}: int32 indices need numel < 2^31, got {numel}; split the tensor "
                           "(a smaller DDP bucket_cap_mb or per-parameter compression)")


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    return (x.reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF).to(torch.int64)


def topk_sample_threshold(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The ceil(k m / n)-th largest key among m hashed sample positions."""
    n = keys.numel()
    m = min(n, TOPK_SAMPLES)
    rank = min(max(-(-k * m // n), 1), m)
    positions = hash32(torch.arange(m, device=keys.device, dtype=torch.int64) ^ 0x5BD1E995) % n
    return torch.topk(keys[positions], rank).values[-1]


def topk_abs(x: torch.Tensor, k: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float("topk_abs", x)
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


# --------------------------------------------------------------------------------------------
# Fused error feedback (EF-SGD, Karimireddy et al. 2019, Alg. 2): v = g + e is compressed, and
# after the collective e' = v - decompress(C(v)). The kernels compute v where they read it; these
# references materialize it, in the gradient's dtype, exactly as ``ErrorFeedbackState`` always has.
def ef_corrected(grad: torch.Tensor, residual: torch.Tensor | None, numel: int | None = None) -> torch.Tensor:
    """``pad(g + e, numel)`` flat, in the gradient's dtype (``g`` alone without a residual)."""
    _check_float("ef", grad)
    flat = grad.reshape(-1)
    if residual is not None:
        if residual.dtype != grad.dtype or residual.numel() != grad.numel():
            raise RuntimeError("commlib::ef: residual must match grad's dtype and size")
        flat = flat + residual.reshape(-1)
    if numel is not None:
        if numel < flat.numel():
            raise RuntimeError(f"commlib::ef: numel {numel} is below grad's {flat.numel()}")
        flat = torch.nn.functional.pad(flat, (0, numel - flat.numel()))
    return flat


def _write_residual(residual: torch.Tensor, grad: torch.Tensor, accumulate: bool, hat: torch.Tensor) -> None:
    corrected = ef_corrected(grad, residual if accumulate else None)
    residual.copy_((corrected - hat[: grad.numel()]).view_as(residual))


def ef_sign_pack(grad, residual, chunk_size: int, numel: int):
    return sign_pack(ef_corrected(grad, residual, numel), chunk_size)


def ef_sign_residual_(residual, grad, packed, scales, chunk_size: int, numel: int, accumulate: bool) -> None:
    _write_residual(residual, grad, accumulate, sign_unpack(packed, scales, numel, chunk_size, grad.dtype))


def ef_qsgd_quantize(grad, residual, bits: int, bucket_size: int, seed: int, numel: int):
    return qsgd_quantize(ef_corrected(grad, residual, numel), bits, bucket_size, seed)


def ef_qsgd_residual_(residual, grad, codes, scales, bits: int, bucket_size: int, numel: int,
                      accumulate: bool) -> None:
    _write_residual(residual, grad, accumulate, qsgd_dequantize(codes, scales, bits, bucket_size, numel, grad.dtype))


def ef_topk_abs(grad, residual, k: int, exact: bool):
    return topk_abs(ef_corrected(grad, residual), k, exact)


def ef_sparse_residual_(residual, grad, indices, values, accumulate: bool) -> None:
    if values.dtype != grad.dtype or values.numel() != indices.numel():
        raise RuntimeError("commlib::ef_sparse_residual_: values must match grad's dtype and the indices' count")
    check_indices_in_range("ef_sparse_residual_", indices, grad.numel())
    hat = torch.zeros(grad.numel(), dtype=grad.dtype, device=grad.device).index_add_(0, indices.long(), values)
    _write_residual(residual, grad, accumulate, hat)


def check_indices_in_range(op: str, indices: torch.Tensor, numel: int) -> None:
    """Every index in [0, numel), checked before anything is written (a host read)."""
    if indices.numel() and not bool(((indices >= 0) & (indices < numel)).all()):
        bad = indices[(indices < 0) | (indices >= numel)][0]
        raise RuntimeError(f"commlib::{op}: index {int(bad)} out of range [0, {numel})")


def ef_gather(grad, residual, indices):
    check_indices_in_range("ef_gather", indices, grad.numel())
    flat = ef_corrected(grad, residual)
    low, high = torch.aminmax(flat) if flat.numel() else (flat.new_zeros(()), flat.new_zeros(()))
    finite = torch.isfinite(low) & torch.isfinite(high)
    guard = torch.where(finite, 0.0, math.nan).to(torch.float32)
    return flat[indices.long()], guard


# --------------------------------------------------------------------------------------------
# PowerSGD (Vogels et al. 2019, Alg. 1): M = G + E, P = M Q; later hat = P Q^T, E' = M - hat.
def _check_powersgd(op: str, m: torch.Tensor, q: torch.Tensor) -> None:
    if m.dtype != torch.float32 or q.dtype != torch.float32:
        raise RuntimeError(f"commlib::{op}: expected float32 tensors")
    if m.dim() != 2 or q.dim() != 2 or q.shape[0] != m.shape[1]:
        raise RuntimeError(f"commlib::{op}: shapes {tuple(m.shape)} and {tuple(q.shape)} do not chain "
                           "(M is rows x cols, Q is cols x r)")


def powersgd_project(grad, residual, q, m):
    _check_powersgd("powersgd_project", grad, q)
    for name, t in (("m", m), ("residual", residual)):
        if t is not None and (t.shape != grad.shape or t.dtype != torch.float32):
            raise RuntimeError(f"commlib::powersgd_project: {name} must be a float32 matrix shaped like grad")
    if residual is None:
        m.copy_(grad)
    else:
        torch.add(grad, residual, out=m)
    return m @ q


def powersgd_backproject_(m, p, q, out) -> None:
    _check_powersgd("powersgd_backproject_", m, q)
    if p.dtype != torch.float32 or p.shape != (m.shape[0], q.shape[1]):
        raise RuntimeError(f"commlib::powersgd_backproject_: p must be float32 of shape ({m.shape[0]}, {q.shape[1]})")
    if out.shape != m.shape or out.dtype != torch.float32:
        raise RuntimeError("commlib::powersgd_backproject_: out must be a float32 matrix shaped like m")
    torch.mm(p, q.t(), out=out)
    m.sub_(out)


# --------------------------------------------------------------------------------------------
# Decompression into an existing tensor: the reference's out.add_(decompress(p).to(out.dtype))
# (or out.copy_(...)), over the first out.numel() values of a possibly padded payload.
def _store(out: torch.Tensor, hat: torch.Tensor, accumulate: bool) -> None:
    hat = hat[: out.numel()].view_as(out).to(out.dtype)
    if accumulate:
        out.add_(hat)
    else:
        out.copy_(hat)


def sign_unpack_into_(out, packed, scales, chunk_size: int, numel: int, dtype, accumulate: bool) -> None:
    _store(out, sign_unpack(packed, scales, numel, chunk_size, dtype), accumulate)


def qsgd_dequantize_into_(out, codes, scales, bits: int, bucket_size: int, numel: int, dtype,
                          accumulate: bool) -> None:
    _store(out, qsgd_dequantize(codes, scales, bits, bucket_size, numel, dtype), accumulate)
