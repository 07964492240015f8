"""The low-rank optimizers' projection on the wire: all-reduce ``R = P^T G`` instead of ``G``.

Projection is linear and every rank projects with the same basis, so ``mean_i(P^T G_i) = P^T
mean_i(G_i)``: averaging the projected gradients gives GaLore the ``R`` it would compute from the
dense average, while a projected (m x n) matrix sends ``r n`` (or ``m r``) values instead of
``m n``. The optimizer says, per parameter and step, which basis it will use
(:meth:`~commlib.optim.lowrank.LowRankAdamW.wire_projection`); steps that refresh the projector,
and parameters it does not project, are averaged densely. The averaged ``R`` goes to the optimizer
(:meth:`~commlib.optim.lowrank.LowRankAdamW.receive_projected`) and ``P R`` to ``p.grad``.

Fira's residual ``G - P R`` and FRUGAL's state-free ``sign(G - P R)`` need the part of the averaged
gradient outside the subspace, which ``R`` does not carry: ``residual="exact"`` averages those
optimizers' matrices densely (exact, no saving), ``residual="none"`` sends ``R`` only (the residual
is then zero: Fira's update becomes GaLore's with ``alpha``, FRUGAL's state-free step vanishes).
"""

from __future__ import annotations

import torch

from commlib.comm.patterns import allreduce_mean_, split_like
from commlib.comm.queue import Comm
from commlib.hooks.state import HookState, ParamView
from commlib.optim import projectors as pj

RESIDUALS = ("exact", "none")


class LowRankState(HookState):
    r"""A DDP hook bound to a :class:`~commlib.optim.GaLoreAdamW`, :class:`~commlib.optim.FiraAdamW`
    or :class:`~commlib.optim.FrugalAdamW`: projected gradients on the wire.

    Arguments:
        optimizer: the low-rank optimizer that steps the DDP model's parameters.
        residual: ``"exact"`` (default) or ``"none"``, for the optimizers whose update uses the
            residual ``G - P R`` (Fira; FRUGAL unless ``inactive_update_rule="no"``); GaLore is exact
            either way.

    Example::

        >>> opt = GaLoreAdamW([{"params": rest}, {"params": matrices, "rank": 64}], lr=1e-3)  # doctest: +SKIP
        >>> state, hook = hooks.make("lowrank", optimizer=opt, model=model)
        >>> ddp_model.register_comm_hook(state, hook)
    """

    name = "lowrank"
    stateful = False

    def __init__(self, process_group=None, optimizer=None, *, residual: str = "exact", **kwargs):
        from commlib.optim.lowrank import LowRankAdamW

        if not isinstance(optimizer, LowRankAdamW):
            raise ValueError("optimizer must be a commlib GaLoreAdamW, FiraAdamW or FrugalAdamW, got "
                             f"{type(optimizer).__name__}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.optimizer = optimizer
        self.residual = residual
        self.params: dict[str, torch.Tensor] = {}
        kwargs.setdefault("start_iter", 0)
        super().__init__(process_group, **kwargs)

    def options(self) -> dict:
        return {"optimizer": self.optimizer.method, "residual": self.residual}

    def param_views(self, bucket) -> list[ParamView]:
        views = super().param_views(bucket)
        for view, param in zip(views, bucket.parameters()):
            self.params[view.key] = param
        return views

    def plan(self, view: ParamView):
        """``(basis, side)`` when this parameter's projected gradient goes on the wire, else None."""
        if self.residual == "exact" and self.optimizer.needs_residual():
            return None
        return self.optimizer.wire_projection(self.params[view.key])

    def compressed_job(self, buffer, views, step, bucket_index):
        def job(comm: Comm):
            plans = [(v, self.plan(v)) for v in views]
            self.average_dense(comm, [v for v, plan in plans if plan is None])
            projected = [(v, plan) for v, plan in plans if plan is not None]
            if projected:
                lows = [pj.project(pj.as_matrix(v.grad), basis, side) for v, (basis, side) in projected]
                flat = torch.cat([low.reshape(-1) for low in lows])
                allreduce_mean_(comm, flat)
                for (v, (basis, side)), mean in zip(projected, split_like(flat, lows)):
                    v.grad.copy_(pj.project_back(mean, basis, side).view_as(v.grad))
                    self.optimizer.receive_projected(self.params[v.key], mean.clone())
                    self.book_layer(v, mean.numel() * mean.element_size(), compressed=True,
                                    side="right" if side == pj.RIGHT else "left", rank=min(mean.shape))
            return buffer

        return job
