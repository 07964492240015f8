"""What the op families share: the counter-based randomness (identical to
``csrc/include/commlib/elementwise.h``), dtype and chunk checks, and the error-feedback and
decompress-into patterns of the references.

Each reference computes the same float32 operations, in the same order, as the element logic in
``elementwise.h``; so C++/CUDA kernels agree with them bit for bit on codes, bits and indices. The
only float reductions (sign scales) are accumulated in float64 here and in float32-then-float64
blocks in C++: they agree to about 1e-7 relative.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


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


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"commlib::{name}: expected float32, bfloat16 or float16, got {x.dtype}")


def chunking(numel: int, chunk_size: int) -> tuple[int, int]:
    """(chunk length, number of chunks); chunk_size 0 means one chunk for the whole tensor."""
    chunk = max(numel, 1) if chunk_size == 0 or chunk_size >= numel else chunk_size
    return chunk, (0 if numel == 0 else -(-numel // chunk))


# --------------------------------------------------------------------------------------------
# Fused error feedback (EF-SGD, Karimireddy et al. 2019, Alg. 2): v = g + e is compressed, and
# after the collective e' = v - decompress(C(v)). The kernels compute v where they read it; these
# references materialize it, in the gradient's dtype, exactly as ``ErrorFeedbackState`` always has.
def ef_corrected(grad: torch.Tensor, residual: torch.Tensor | None, numel: int | None = None) -> torch.Tensor:
    """``pad(g + e, numel)`` flat, in the gradient's dtype (``g`` alone without a residual)."""
    check_float("ef", grad)
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


def write_residual(residual: torch.Tensor, grad: torch.Tensor, accumulate: bool, hat: torch.Tensor) -> None:
    corrected = ef_corrected(grad, residual if accumulate else None)
    residual.copy_((corrected - hat[: grad.numel()]).view_as(residual))



# --------------------------------------------------------------------------------------------
# Decompression into an existing tensor: the reference's out.add_(decompress(p).to(out.dtype))
# (or out.copy_(...)), over the first out.numel() values of a possibly padded payload.
def store_into(out: torch.Tensor, hat: torch.Tensor, accumulate: bool) -> None:
    hat = hat[: out.numel()].view_as(out).to(out.dtype)
    if accumulate:
        out.add_(hat)
    else:
        out.copy_(hat)
