"""The compressor contract: pure functions of a tensor, no communication, no global RNG."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from commlib.ops._common import ef_corrected, hash32_int


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


def tensor_is_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or inf (integer tensors always are). ``aminmax`` propagates both
    in one read; ``isfinite(t).all()`` is 10x slower on CPU (a bool tensor and three passes)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def finite_flag(tensors) -> torch.Tensor | None:
    """A 0-dim bool tensor, on the tensors' device: no float tensor among ``tensors`` holds inf or
    NaN. Nothing is read on the host (no synchronization); None when there is no float element."""
    flags = [torch.isfinite(torch.stack(torch.aminmax(t))).all() for t in tensors
             if t.numel() and t.is_floating_point()]
    return torch.stack(flags).all() if flags else None


def derive_seed(base: int, *keys: int) -> int:
    """A 63-bit seed from ``base`` and integer keys (step, layer, ...): same on every rank, no RNG state."""
    h = hash32_int(base & 0xFFFFFFFF) ^ ((base >> 32) & 0xFFFFFFFF)
    for key in keys:
        h = hash32_int(h ^ hash32_int(key & 0xFFFFFFFF) ^ ((key >> 32) & 0xFFFFFFFF))
    h2 = hash32_int(h ^ 0x68E31DA4)
    return ((h << 31) ^ h2) & 0x7FFFFFFFFFFFFFFF


def numel_of(shape) -> int:
    return math.prod(shape)


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

    def decompress_into_(self, out: torch.Tensor, payload: Payload) -> torch.Tensor:
        """``out <- decompress(payload)``, the first ``out.numel()`` values of a padded payload (Sign
        and QSGD write straight into ``out``, without a temporary)."""
        return out.copy_(self.decompress(payload).reshape(-1)[: out.numel()].view_as(out))

    # ------------------------------------------------------------------ error feedback in two passes
    def compress_ef(self, grad: torch.Tensor, residual: torch.Tensor | None, *, seed: int = 0,
                    numel: int | None = None) -> Payload:
        """Pass 1 of error feedback: ``C(v)`` of ``v = pad(grad + residual, numel)`` (``grad`` alone
        without a residual; shaped like ``grad`` when ``numel`` is None, else 1-D of ``numel``).

        This default materializes ``v``; Sign, QSGD, TopK and RandomK override it with fused kernels
        that read ``grad`` and ``residual`` once and write only the payload.
        """
        corrected = ef_corrected(grad, residual, numel)
        return self.compress(corrected.view(grad.shape) if numel is None else corrected, seed=seed)

    def update_residual_(self, residual: torch.Tensor, grad: torch.Tensor, payload: Payload,
                         accumulate: bool = True) -> torch.Tensor:
        """Pass 2, once the step is known to be kept: ``residual <- (grad + residual) - decompress(payload)``
        in place (the first ``grad.numel()`` values of a padded payload); ``accumulate=False`` takes
        the residual as zero without reading it. Returns ``residual``."""
        corrected = ef_corrected(grad, residual if accumulate else None)
        hat = self.decompress(payload).reshape(-1)[: grad.numel()]
        return residual.copy_((corrected - hat).view_as(residual))

    def touched_indices(self, payload: Payload) -> torch.Tensor | None:
        """The flat indices ``decompress`` writes (sparse compressors); None when it writes them all."""
        return None

    def payload_finite(self, payload: Payload) -> bool:
        """True when ``decompress(payload)`` holds no inf or NaN. Reads the payload's float tensors
        only (a few scales for Sign and QSGD, k values for the sparsifiers), not the dense result."""
        return all(tensor_is_finite(t) for t in payload.tensors)

    def payload_finite_flag(self, payload: Payload) -> torch.Tensor | None:
        """:meth:`payload_finite` as a 0-dim bool tensor on the payload's device, read nowhere (the
        hooks' device gate); None when the payload has no float element."""
        return finite_flag(payload.tensors)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({fields})"

    def config(self) -> dict:
        return {}
