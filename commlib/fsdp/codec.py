"""Rows of FSDP's reduce-scatter buffer as fixed-size byte messages (pure functions, no communication).

FSDP2 hands a reduce-scatter the flat input viewed as ``(W, chunk)``: row ``j`` is every parameter's
dim-0 slice that rank ``j`` owns, padded. A compressed reduce-scatter sends ``C(row_j)`` to rank ``j``
(an all-to-all) and rank ``j`` sums the decoded rows it receives (ZeRO++'s qgZ, one hop). Compressed
payloads of one row length have one byte size, so every message of the all-to-all is equally long.

A row is cut into *segments* that are compressed separately: the whole row for element-wise
compressors (cast, QSGD, sign, top-k, random-k), or one matrix per parameter for PowerSGD, whose
low-rank factors need the parameter's shape (1-D parameters then travel dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from commlib.comm import packing
from commlib.comm.packing import ALIGN, aligned
from commlib.comm.patterns import payloads_like
from commlib.compress import Identity, Payload, PowerSGD


@dataclass(frozen=True)
class Segment:
    """``numel`` values of a row starting at ``offset``, compressed as a ``shape`` tensor."""

    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out


def row_segments(chunk: int, param_shapes: list[tuple[int, ...]] | None, matrix_wise: bool) -> list[Segment]:
    """How a row of ``chunk`` values is cut: one segment, or one per parameter (``param_shapes``
    are the padded per-rank shard shapes in FSDP's order) when the compressor is matrix-wise."""
    if not matrix_wise or not param_shapes:
        return [Segment(0, (chunk,))]
    out, offset = [], 0
    for shape in param_shapes:
        rows = shape[0] if shape else 1
        rest = 1
        for s in shape[1:]:
            rest *= s
        out.append(Segment(offset, (rows, rest) if len(shape) >= 2 else (rows * rest,)))
        offset += rows * rest
    if offset != chunk:
        raise ValueError(f"parameter shards cover {offset} values of a {chunk}-value reduce-scatter row")
    return out


def segment_compressor(compressor, segment: Segment):
    """PowerSGD compresses matrices only; its 1-D segments (biases, norms) go dense."""
    if isinstance(compressor, PowerSGD) and len(segment.shape) < 2:
        return Identity()
    return compressor


def pack(payloads: list[Payload], out: torch.Tensor) -> torch.Tensor:
    """Write the wire tensors of ``payloads`` into the uint8 vector ``out``, each 8-byte aligned."""
    return packing.pack([t for p in payloads for t in p.tensors], out, ALIGN)[0]


def unpack(buffer: torch.Tensor, templates: list[Payload]) -> list[Payload]:
    """The payloads in the uint8 ``buffer``, shaped like ``templates`` (this rank's own payloads of
    the same row: same shapes, dtypes, and the shared-seed context such as random-k's indices)."""
    tensors = packing.unpack(buffer, packing.layout_of(t for p in templates for t in p.tensors), ALIGN)
    return payloads_like(tensors, templates)


def message_bytes(payloads: list[Payload]) -> int:
    """Bytes of the packed payloads, alignment included (what :func:`pack` writes)."""
    return sum(aligned(t.numel() * t.element_size()) for p in payloads for t in p.tensors)


def overflow_value(row: torch.Tensor) -> torch.Tensor:
    """0 for a finite row, else its first non-finite value (float32): added to the receiver's sum it
    lets an overflow through every compressor (random-k would drop most of the row's values).
    min and max propagate NaN and inf in one pass (``isfinite(row).all()`` is 10x slower on CPU)."""
    if row.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=row.device)
    low, high = torch.aminmax(row)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return torch.zeros((), dtype=torch.float32, device=row.device)
    return row[~torch.isfinite(row)][0].float()


class BufferPool:
    """Grow-only byte buffers shared by the modules of one model: FSDP runs their collectives one at
    a time, so one buffer per name, as large as the largest module needs, serves them all (fresh
    multi-MB buffers cost page faults on every step; one per module would cost memory)."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, name: str, nbytes: int, device) -> torch.Tensor:
        key = (name, str(device))
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.buffers[key] = buf
        return buf[:nbytes]

    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers.values())
