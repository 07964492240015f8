"""Gradient coding inside DDP: coded losses per rank and a hook that decodes before the SUM all-reduce.

The data is split into n parts (n = world size). Uncoded DDP has rank i train on part i and averages:
``(1/n) sum_i g_i``. With a gradient code, rank i computes the coded combination
``f_i = sum_j B[i, j] g_j`` of the parts ``code.parts(i)`` (:func:`commlib.coding.coded_loss` weights the part
losses), and the hook returns ``(1/n) sum_{i alive} a_i f_i = (1/n) sum_j g_j`` for the decoding
coefficients ``a`` of the ranks that did not straggle: the same update as uncoded DDP.

What it can and cannot save: NCCL/gloo all-reduce waits for every rank, so inside DDP a straggler's
contribution can only be *erased* (its coefficient is 0), not skipped in time: this form gives
exactly the decoded gradient under a straggler pattern (for testing codes on a real model, and for
ranks whose results are known to be bad), but no wall-clock saving. The wall-clock benefit needs the
master/worker runtime with deadlines, :mod:`commlib.coding.runtime`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from commlib.coding.codes import GradientCode
from commlib.comm.agree import agree_across_ranks
from commlib.comm.rank_state import byte_books
from commlib.hooks.registry import register
from commlib.hooks.state import check_flat_only


@register("gc")
class GradientCodingState:
    r"""DDP hook state: multiply the local (coded) gradient by this rank's decoding coefficient for the
    step's survivors, SUM all-reduce, divide by n. ``stragglers`` is a (steps, n) 0/1 array (1 =
    erased) or a function ``step -> iterable of ranks``; it must be the same on every rank. A pattern
    the code cannot decode raises :class:`commlib.coding.Undecodable` in ``backward()`` (never a wrong
    gradient).

    Example::

        >>> code = coding.CyclicRepetition(n=3, s=1)                                     # doctest: +SKIP
        >>> state, hook = hooks.make("gc", code=code, stragglers=lambda step: {step % 3})  # doctest: +SKIP
        >>> ddp.register_comm_hook(state, hook)                                          # doctest: +SKIP
        >>> loss = coding.coded_loss(code, rank, {j: loss_on_part(j) for j in code.parts(rank)})  # doctest: +SKIP
    """

    name = "gc"

    def __init__(self, process_group=None, *, code: GradientCode, stragglers=None, model=None, hierarchical="auto",
                 topology=None):
        check_flat_only(self.name, hierarchical, topology)  # the code's workers are ranks
        if not isinstance(code, GradientCode):
            raise ValueError(f"code must be a commlib.coding gradient code, got {code!r}")
        self.group = process_group
        self.code = code
        self.rank = None  # bound at the first hook call (or bind()): the state can be built before init
        if dist.is_available() and dist.is_initialized():
            self.bind()
        self.stragglers = stragglers
        self.step = 0
        self.total_bytes_sent = 0  # dense: the coded gradient is as large as the gradient
        self.last_step_bytes = self._bytes_this_step = 0

    def bind(self) -> GradientCodingState:
        if self.rank is None:
            world = dist.get_world_size(self.group)
            if self.code.n != world:
                raise ValueError(f"code.n ({self.code.n}) must equal the world size ({world})")
            self.rank = dist.get_rank(self.group)
            agree_across_ranks({"method": self.name, "code": type(self.code).__name__,
                                "B": np.asarray(self.code.B).round(12).tolist()}, self.group, "commlib gc hook")
        return self

    def close(self) -> None:
        """Nothing to release: the state issues its all-reduce on the user's group."""

    def stragglers_at(self, step: int) -> set[int]:
        if self.stragglers is None:
            return set()
        if callable(self.stragglers):
            return {int(i) for i in self.stragglers(step)}
        pattern = np.asarray(self.stragglers)
        return set() if step >= len(pattern) else {int(i) for i in np.flatnonzero(pattern[step])}

    def coefficient(self, step: int) -> float:
        erased = self.stragglers_at(step)
        a = self.code.decode([i for i in range(self.code.n) if i not in erased])
        return float(a[self.rank])

    def run(self, bucket: dist.GradBucket) -> torch.futures.Future:
        self.bind()
        step = self.step
        if bucket.is_last():
            self.step += 1
        buffer = bucket.buffer()
        buffer.mul_(self.coefficient(step) / self.code.n)
        self._bytes_this_step += buffer.numel() * buffer.element_size()
        if bucket.is_last():
            self.total_bytes_sent += self._bytes_this_step
            self.last_step_bytes, self._bytes_this_step = self._bytes_this_step, 0
        work = dist.all_reduce(buffer, group=self.group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    def stats(self) -> dict:
        sent = self.last_step_bytes  # the coded gradient is as large as the gradient: ratio 1
        return byte_books(self.name, self.step, sent, sent, self.total_bytes_sent, self.total_bytes_sent, 0)

    def state_dict(self) -> dict:
        return {"method": self.name, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
