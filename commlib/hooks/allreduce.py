"""Stateless hooks: dense mean (``allreduce``) and 16-bit casts (``fp16``, ``bf16``)."""

from __future__ import annotations

import torch

from commlib.comm.patterns import allreduce_mean_
from commlib.comm.queue import Comm
from commlib.hooks.registry import register
from commlib.hooks.state import HookState


@register("allreduce")
class AllreduceState(HookState):
    r"""Plain averaging of every bucket through commlib's ordered queue: DDP's own result, bit for bit.

    Example::

        >>> state, hook = commlib.hooks.make("allreduce")  # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)      # doctest: +SKIP
    """

    name = "allreduce"
    stateful = False

    def __init__(self, process_group=None, **kwargs):
        kwargs.setdefault("start_iter", 0)
        super().__init__(process_group, **kwargs)

    supports_hierarchy = True

    def compressed_job(self, buffer, views, step, bucket_index):
        return self._dense_job(buffer, views)

    def hierarchical_job(self, buffer, views, step, bucket_index):
        """Reduce-scatter inside the node, all-reduce of the 1/L slice across nodes, all-gather."""
        def job(comm: Comm):
            self.two_level([buffer.view(-1)], self.dense_pieces)
            return buffer

        return job


class CastState(HookState):
    r"""Averages in a 16-bit float on the wire: ``buffer.to(dtype) / world``, SUM, copy back.

    fp16 overflows above 65504: the inf propagates, so ``GradScaler`` skips the step and lowers its
    scale. bf16 keeps fp32's range (works on gloo and NCCL alike here, unlike PyTorch's bf16 hook
    which needs NCCL >= 2.9.6).

    Example::

        >>> state, hook = commlib.hooks.make("bf16")       # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)      # doctest: +SKIP
    """

    stateful = False

    def __init__(self, process_group=None, dtype: torch.dtype = torch.float16, **kwargs):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"
        kwargs.setdefault("start_iter", 0)
        super().__init__(process_group, **kwargs)

    supports_hierarchy = True

    def compressed_job(self, buffer, views, step, bucket_index):
        def job(comm: Comm):
            wire = buffer.to(self.dtype)
            self.count_bytes(wire.numel() * wire.element_size(), buffer.numel() * buffer.element_size())
            allreduce_mean_(comm, wire)
            return buffer.copy_(wire)

        return job

    def hierarchical_job(self, buffer, views, step, bucket_index):
        """Dense in the gradient's dtype inside the node; the 1/L slice crosses nodes in 16 bits."""
        def reduce_pieces(rail: Comm, pieces: list[torch.Tensor]) -> None:
            wire = torch.cat(pieces).to(self.dtype)
            self.count_bytes(wire.numel() * wire.element_size(), wire.numel() * pieces[0].element_size())
            allreduce_mean_(rail, wire)
            for piece, mean in zip(pieces, wire.split([p.numel() for p in pieces])):
                piece.copy_(mean)

        def job(comm: Comm):
            self.two_level([buffer.view(-1)], reduce_pieces)
            return buffer

        return job


@register("fp16")
def fp16_state(process_group=None, **options) -> CastState:
    """``hooks.make("fp16")``: the gradients cast to float16 on the wire."""
    return CastState(process_group, dtype=torch.float16, **options)


@register("bf16")
def bf16_state(process_group=None, **options) -> CastState:
    """``hooks.make("bf16")``: the gradients cast to bfloat16 on the wire."""
    return CastState(process_group, dtype=torch.bfloat16, **options)
