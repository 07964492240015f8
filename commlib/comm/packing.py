"""Tensors of any dtypes in one uint8 message and back: the one byte-packing of commlib.

``align=1`` packs back to back (the all-gathers of :mod:`commlib.comm.patterns`, whose books
count exactly the payload bytes); ``align=ALIGN`` starts every tensor at a multiple of 8 bytes so a
receiver views it in place (the fixed-size rows of FSDP2's compressed reduce-scatter). A tensor
that lands misaligned for its dtype is copied before it is viewed.
"""

from __future__ import annotations

import torch

ALIGN = 8

Layout = list[tuple[torch.dtype, torch.Size, int]]  # (dtype, shape, bytes) of each packed tensor


def aligned(nbytes: int, align: int = ALIGN) -> int:
    """``nbytes`` rounded up to a multiple of ``align``."""
    return -(-nbytes // align) * align


def packed_bytes(layout: Layout, align: int = 1) -> int:
    """The message length :func:`pack` writes for ``layout``."""
    return sum(aligned(nbytes, align) for _, _, nbytes in layout)


def layout_of(tensors) -> Layout:
    return [(t.dtype, t.shape, t.numel() * t.element_size()) for t in tensors]


def pack(tensors, out: torch.Tensor | None = None, align: int = 1) -> tuple[torch.Tensor, Layout]:
    """Write ``tensors`` into the uint8 vector ``out`` (a new one when None), each starting at a
    multiple of ``align``; returns ``(out, layout)``. ``out`` must have exactly the packed length."""
    tensors = [t.contiguous() for t in tensors]
    layout = layout_of(tensors)
    size = packed_bytes(layout, align)
    if out is None:
        if align == 1:  # back to back: one cat, no zero fill
            parts = [t.reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
            device = tensors[0].device if tensors else "cpu"
            return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)), layout
        out = torch.zeros(size, dtype=torch.uint8, device=tensors[0].device if tensors else "cpu")
    if out.numel() != size:
        raise RuntimeError(f"packing {size} bytes into a {out.numel()}-byte message")
    offset = 0
    for t, (_, _, nbytes) in zip(tensors, layout, strict=True):
        if nbytes:
            out[offset : offset + nbytes].copy_(t.reshape(-1).view(torch.uint8))
        offset += aligned(nbytes, align)
    return out, layout


def unpack(flat: torch.Tensor, layout: Layout, align: int = 1) -> list[torch.Tensor]:
    """The tensors :func:`pack` wrote into ``flat`` with ``layout``: views where the offset suits
    the dtype, copies where it does not (e.g. int32 indices after bf16 values)."""
    out, offset = [], 0
    for dtype, shape, nbytes in layout:
        if not nbytes:
            out.append(torch.empty(shape, dtype=dtype, device=flat.device))
        else:
            raw = flat[offset : offset + nbytes]
            if offset % torch.empty((), dtype=dtype).element_size():
                raw = raw.clone()
            out.append(raw.view(dtype).view(shape))
        offset += aligned(nbytes, align)
    return out
