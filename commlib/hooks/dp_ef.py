"""``dp_ef``: the DDP hook for DiceSGD (:mod:`commlib.privacy`), which does its own aggregation."""

from __future__ import annotations

import torch
import torch.distributed as dist

from commlib.comm.rank_state import byte_books
from commlib.hooks.registry import register
from commlib.hooks.state import check_flat_only


@register("dp_ef")
class DPErrorFeedbackState:
    r"""Leaves each bucket's local gradient as it is: no collective.

    With DP training the optimizer, not DDP, must aggregate: :class:`commlib.privacy.DiceSGD` sums the
    per-sample-clipped gradients and the raw gradients of the global batch in one all-reduce of its
    own, then adds the noise once. DDP's mean of ``p.grad`` would be a wasted all-reduce of a tensor
    the optimizer overwrites. So, to keep DDP (for its parameter broadcast and module wrapping)::

        model = GradSampleModule(net)
        ddp = DistributedDataParallel(model)
        state, hook = hooks.make("dp_ef")
        ddp.register_comm_hook(state, hook)
        opt = privacy.DiceSGD(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=...,
                              max_grad_norm=C1, error_max_grad_norm=C2, expected_batch_size=global_batch)

    Without DDP, wrap nothing: DiceSGD(process_group=...) is all a data-parallel run needs (broadcast
    the initial parameters once).
    """

    name = "dp_ef"

    def __init__(self, process_group=None, *, model=None, hierarchical="auto", topology=None):
        check_flat_only(self.name, hierarchical, topology)  # no collective: nothing to split by node
        self.step = 0  # ``model`` is accepted (and unused) so every hook takes the same common options

    def bind(self) -> DPErrorFeedbackState:
        return self

    def close(self) -> None:
        """Nothing to release: the hook issues no collective."""

    def run(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if bucket.is_last():
            self.step += 1
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    def stats(self) -> dict:
        return byte_books(self.name, self.step, 0, 0, 0, 0, 0)  # the optimizer's all-reduce carries the gradients

    def state_dict(self) -> dict:
        return {"method": self.name, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
