"""The compressor contract: pure functions of a tensor, no communication, no global RNG."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from commlib.ops._reference import hash32_int


@dataclass
class Payload:
    """What a compressor produces for one tensor.

    ``tensors`` is what goes on the wire (``Compressor.nbytes`` counts exactly these bytes);
    ``context`` holds local-only data every rank can rebuild itself (e.g. random-k indices drawn
    from the shared seed), which is never sent.
    """

    tensors: tuple[torch.Tensor, ...]
    shape: torch.Size
    dtype: torch.dtype
    context: tuple = field(default_factory=tuple)

    def wire_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def derive_seed(base: int, *keys: int) -> int:
    """A 63-bit seed from ``base`` and integer keys (step, layer, ...): same on every rank, no RNG state."""
    h = hash32_int(base & 0xFFFFFFFF) ^ ((base >> 32) & 0xFFFFFFFF)
    for key in keys:
        h = hash32_int(h ^ hash32_int(key & 0xFFFFFFFF) ^ ((key >> 32) & 0xFFFFFFFF))
    h2 = hash32_int(h ^ 0x68E31DA4)
    return ((h << 31) ^ h2) & 0x7FFFFFFFFFFFFFFF


def numel_of(shape) -> int:
    return math.prod(shape)


def require_int(name: str, value, low: int, high: int | None = None) -> int:
    """Validate an integer hyper-parameter; the message names the argument and the allowed range."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer in {allowed}, got {value!r}")
    return value


def require_fraction(name: str, value) -> float:
    """Validate a density in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class Compressor:
    """Base class. Subclasses implement ``compress``, ``decompress`` and ``nbytes``.

    ``summable``: payloads of different ranks can be added element-wise on the wire, i.e. the
    sum of payloads decompresses to the sum of the decompressed tensors, so an allreduce can carry
    them (Cast, RandomK with a shared seed). Otherwise payloads are all-gathered (TopK, QSGD,
    Sign) or exchanged in PowerSGD's two rounds.
    """

    summable: bool = False
    name: str = "compressor"

    def compress(self, tensor: torch.Tensor, *, seed: int = 0) -> Payload:
        raise NotImplementedError

    def decompress(self, payload: Payload) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, shape, dtype: torch.dtype = torch.float32) -> int:
        """Bytes this compressor puts on the wire for one tensor of ``shape`` and ``dtype``."""
        raise NotImplementedError

    def dense_nbytes(self, shape, dtype: torch.dtype = torch.float32) -> int:
        return numel_of(shape) * torch.empty((), dtype=dtype).element_size()

    def shrinks(self, shape, dtype: torch.dtype = torch.float32) -> bool:
        """True when compressing this tensor sends fewer bytes than sending it dense."""
        return self.nbytes(shape, dtype) < self.dense_nbytes(shape, dtype)

    def decompress_add_(self, out: torch.Tensor, payload: Payload) -> torch.Tensor:
        """``out += decompress(payload)``; sparse compressors override this to scatter-add."""
        return out.add_(self.decompress(payload).view_as(out))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({fields})"

    def config(self) -> dict:
        return {}
