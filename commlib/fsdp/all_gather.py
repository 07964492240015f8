"""A block-quantized parameter all-gather for FSDP2 (``FSDPModule.set_custom_all_gather``): ZeRO++'s qwZ.

Each rank quantizes its parameter shard to int8 with one float32 scale per block of ``block_size``
values (symmetric, round to nearest: ``q = round(x / s)``, ``s = max|x| / 127``), all-gathers codes
and scales, and every rank dequantizes every slot, its own included, so all ranks compute with the
same weights. The optimizer keeps stepping the full-precision sharded parameters (the master
copy); only the gathered copy used by forward and backward is rounded, by at most ``s / 2`` per
value. Wang et al. 2023 (ZeRO++), Sec. 4.1.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from commlib.comm.rank_state import byte_books
from commlib.fsdp.codec import BufferPool
from commlib.fsdp.torch_internals import AllGather
from commlib.validation import integer


def quantize_int8_blocks(x: torch.Tensor, block_size: int, codes_out: torch.Tensor | None = None,
                         scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 (nblocks * block_size,), scales float32 (nblocks,))`` of a flat tensor, zero-padded.

    ``s = max|x| / 127`` per block and ``q = round(x / s)``, so ``|q| <= 127`` and ``|x - s q| <= s / 2``.
    ``codes_out`` (int8) and ``scratch`` (float32, same size) are optional reused buffers."""
    n = x.numel()
    blocks = -(-n // block_size)
    flat = x.reshape(-1)
    if n != blocks * block_size or flat.dtype != torch.float32:
        padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=x.device)
        padded[:n] = flat
        flat = padded
    view = flat.view(blocks, block_size)
    scales = torch.maximum(view.amax(dim=1), view.amin(dim=1).neg_()).div_(127.0)
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    scaled = torch.mul(view, inverse[:, None], out=None if scratch is None else scratch.view(blocks, block_size))
    codes = torch.empty(blocks * block_size, dtype=torch.int8, device=x.device) if codes_out is None else codes_out
    codes.view(blocks, block_size).copy_(scaled.round_())
    return codes, scales


def dequantize_int8_blocks(codes: torch.Tensor, scales: torch.Tensor, numel: int, block_size: int,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """``s q`` as float32 ``(numel,)`` from :func:`quantize_int8_blocks`'s output (into ``out`` if given)."""
    grid = codes.view(-1, block_size)
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and numel == codes.numel():
        torch.mul(grid, scales[:, None], out=out.view(-1, block_size))
        return out
    values = (grid.float() * scales[:, None]).view(-1)[:numel]
    if out is not None:
        out.copy_(values.view_as(out))
        return out
    return values


def message_bytes(numel: int, block_size: int) -> int:
    blocks = -(-numel // block_size)
    return blocks * block_size + 4 * blocks


class QuantizedAllGather(AllGather):
    """The all-gather of one FSDP module. Inputs that are not floating point (FSDP's uint8 byte view
    of mixed-dtype groups) are gathered unchanged."""

    def __init__(self, block_size: int = 256, pool: BufferPool | None = None):
        self.block_size = integer("block_size", block_size, 8)
        if self.block_size % 8:  # the float32 scales follow the int8 codes in one 8-byte aligned message
            raise ValueError(f"block_size must be a multiple of 8 (>= 8), got {block_size!r}")
        self.pool = pool if pool is not None else BufferPool()
        self.bytes_sent = self.bytes_dense = 0
        self.total_bytes_sent = self.total_bytes_dense = 0
        self.calls = 0
        self.seconds = 0.0

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def buffers(self, world: int, size: int, ncodes: int, device):
        """Send, receive and float scratch buffers from the pool shared by all modules."""
        return (self.pool.get("send", size, device), self.pool.get("recv", world * size, device),
                self.pool.get("scratch", 4 * ncodes, device).view(torch.float32))

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        started = time.perf_counter()
        world = dist.get_world_size(group)
        numel = input_tensor.numel()
        dense = (world - 1) * numel * input_tensor.element_size()
        if not input_tensor.is_floating_point():
            dist.all_gather_single(output_tensor, input_tensor.contiguous(), group=group)
            sent = dense
        else:
            size = message_bytes(numel, self.block_size)
            ncodes = -(-numel // self.block_size) * self.block_size
            send, recv, scratch = self.buffers(world, size, ncodes, input_tensor.device)
            _, scales = quantize_int8_blocks(input_tensor, self.block_size, codes_out=send[:ncodes].view(torch.int8),
                                             scratch=scratch)
            send[ncodes:].copy_(scales.view(torch.uint8))
            dist.all_gather_single(recv, send, group=group)
            slots = output_tensor.view(world, numel)
            for r, msg in enumerate(recv.view(world, size)):
                dequantize_int8_blocks(msg[:ncodes].view(torch.int8), msg[ncodes:].view(torch.float32), numel,
                                       self.block_size, out=slots[r])
            sent = (world - 1) * size
        self.bytes_sent, self.bytes_dense = sent, dense
        self.total_bytes_sent += sent
        self.total_bytes_dense += dense
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return None


class QuantizedGathers:
    """The books of :func:`quantize_all_gather`: bytes per call and in total over every module."""

    def __init__(self, comms: list[tuple[str, QuantizedAllGather]], modules: list | None = None):
        self.comms = comms
        self.modules = modules or []

    def remove(self) -> None:
        """Put FSDP2's own all-gather back on every module (full-precision weights again)."""
        from commlib.fsdp.torch_internals import restore_default_all_gather

        for m in self.modules:
            restore_default_all_gather(m)
        self.modules = []

    def buffer_bytes(self) -> int:
        return self.comms[0][1].pool.nbytes() if self.comms else 0

    def stats(self) -> dict:
        sent = sum(c.total_bytes_sent for _, c in self.comms)
        dense = sum(c.total_bytes_dense for _, c in self.comms)
        last_sent = sum(c.bytes_sent for _, c in self.comms)
        last_dense = sum(c.bytes_dense for _, c in self.comms)
        return {**byte_books("fsdp_quantized_all_gather", max((c.calls for _, c in self.comms), default=0),
                             last_sent, last_dense, sent, dense, 0),
                "calls": sum(c.calls for _, c in self.comms), "seconds": sum(c.seconds for _, c in self.comms)}


def quantize_all_gather(module: torch.nn.Module, block_size: int = 256) -> QuantizedGathers:
    r"""Install :class:`QuantizedAllGather` on every ``fully_shard``-ed module under ``module``.

    Off by default in commlib: it changes the forward pass (weights rounded to int8 blocks, about
    0.4% of a block's max per value), so measure its effect on the loss (``benchmarks/bench_fsdp.py``).

    Example::

        >>> from commlib.fsdp import compress_gradients, quantize_all_gather      # doctest: +SKIP
        >>> gathers = quantize_all_gather(model)                 # int8 weights on the wire (qwZ)   # doctest: +SKIP
        >>> state = compress_gradients(model, QSGD(bits=8))      # int8 gradients on the wire (qgZ) # doctest: +SKIP
    """
    from commlib.fsdp.state import fsdp_modules

    found = fsdp_modules(module)
    if not found:
        raise ValueError("module has no fully_shard-ed (FSDPModule) parts: call fully_shard first")
    comms = []
    pool = BufferPool()
    for name, m in found:
        comm = QuantizedAllGather(block_size, pool)
        m.set_custom_all_gather(comm)
        comms.append((name, comm))
    return QuantizedGathers(comms, [m for _, m in found])
