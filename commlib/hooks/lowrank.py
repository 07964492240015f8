"""The low-rank optimizers' projection on the wire: all-reduce ``R = P^T G`` instead of ``G``.

Projection is linear and every rank projects with the same basis, so ``mean_i(P^T G_i) = P^T
mean_i(G_i)``: averaging the projected gradients gives GaLore the ``R`` it would compute from the
dense average, while a projected (m x n) matrix sends ``r n`` (or ``m r``) values instead of
``m n``. The optimizer says, per parameter and step, which basis it will use
(:meth:`~commlib.optim.lowrank.LowRankAdamW.wire_projection`); steps that refresh the projector,
and parameters it does not project, are averaged densely. ``P R`` goes to ``p.grad``, and the
optimizer projects whatever ``p.grad`` holds at its step (rule 9: ``clip_grad_norm_``, a
``GradScaler``'s ``unscale_`` or accumulation scaling reach the update, exactly as over dense DDP,
since ``Pᵀ (c P R) = c R`` for an orthonormal basis). The hook tells the optimizer whether it sent
a residual (:meth:`~commlib.optim.lowrank.LowRankAdamW.receive_projected`): without one, the part of
the gradient outside the subspace is zero by construction, not the rounding noise of ``G - P Pᵀ G``.

Fira's residual ``G - P R`` and FRUGAL's state-free ``sign(G - P R)`` need the part of the averaged
gradient outside the subspace, which ``R`` does not carry: ``residual="exact"`` averages those
optimizers' matrices densely (exact, no saving), ``residual="none"`` sends ``R`` only (the residual
is then zero: Fira's update becomes GaLore's with ``alpha``, FRUGAL's state-free step vanishes), and
``residual=<compressor>`` sends ``R`` plus the compressed local residual ``S_i = G_i - P R_i`` with
classic error feedback (``v = S_i + e_i``, send ``C(v)``, keep ``e_i = v - D(C(v))``;
e.g. ``compress.Sign()``: 1 bit per value), the mean of the decoded residuals added to ``P R``.
"""

from __future__ import annotations

import torch

from commlib.comm.patterns import allgather_payloads, allreduce_mean_, split_like
from commlib.comm.queue import Comm
from commlib.comm.rank_state import numel_bytes
from commlib.compress.base import Compressor
from commlib.hooks.registry import register
from commlib.hooks.state import HookState, ParamView
from commlib.optim import projectors as pj

RESIDUALS = ("exact", "none")


@register("lowrank")
class LowRankState(HookState):
    r"""A DDP hook bound to a :class:`~commlib.optim.GaLoreAdamW`, :class:`~commlib.optim.FiraAdamW`
    or :class:`~commlib.optim.FrugalAdamW`: projected gradients on the wire.

    Arguments:
        optimizer: the low-rank optimizer that steps the DDP model's parameters.
        residual: ``"exact"`` (default), ``"none"`` or a :mod:`commlib.compress` compressor (sent with
            error feedback), for the optimizers whose update uses the residual ``G - P R`` (Fira;
            FRUGAL unless ``inactive_update_rule="no"``); GaLore ignores it (it is exact).

    Example::

        >>> opt = GaLoreAdamW([{"params": rest}, {"params": matrices, "rank": 64}], lr=1e-3)  # doctest: +SKIP
        >>> state, hook = hooks.make("lowrank", optimizer=opt, model=model)    # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)    # doctest: +SKIP
    """

    name = "lowrank"
    stateful = False  # no dense warm-up needed: the first steps refresh (dense) or project a known basis
    per_rank_buffers = ("residuals",)

    def __init__(self, process_group=None, optimizer=None, *, residual: str = "exact", **kwargs):
        from commlib.optim.lowrank import LowRankAdamW

        if not isinstance(optimizer, LowRankAdamW):
            raise ValueError("optimizer must be a commlib GaLoreAdamW, FiraAdamW or FrugalAdamW, got "
                             f"{type(optimizer).__name__}")
        if not isinstance(residual, Compressor) and residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS} or a commlib.compress compressor, got {residual!r}")
        self.optimizer = optimizer
        self.residual = residual
        self.params: dict[str, torch.Tensor] = {}
        self.residuals: dict[str, torch.Tensor] = {}  # error feedback of a compressed residual
        kwargs.setdefault("start_iter", 0)
        super().__init__(process_group, **kwargs)

    def options(self) -> dict:
        return {"optimizer": self.optimizer.method, "residual": repr(self.residual) if isinstance(
            self.residual, Compressor) else self.residual}

    def buffers_state(self) -> dict:
        return {"residuals": dict(self.residuals)}

    def load_buffers_state(self, buffers: dict) -> None:
        self.residuals = dict(buffers.get("residuals", {}))

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

    supports_hierarchy = True

    def hierarchical_job(self, buffer, views, step, bucket_index):
        """The same exchange with both of its means (the dense parameters' and the projected
        gradients' R) taken on the two-level path: R is linear in G, so the node's sum of R is R of
        the node's sum. A compressed residual (``residual=<compressor>``) still travels over the
        whole group."""
        return self.compressed_job(buffer, views, step, bucket_index)

    def mean_of(self, comm: Comm, tensors: list[torch.Tensor]) -> None:
        """The mean over ranks of each tensor, in place: two-level when this state is, else one
        flat all-reduce."""
        if not tensors:
            return
        if self.layout is not None:
            self.two_level(tensors, self.dense_pieces)
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        allreduce_mean_(comm, flat)
        for t, mean in zip(tensors, split_like(flat, tensors)):
            t.copy_(mean)

    def compressed_job(self, buffer, views, step, bucket_index):
        def job(comm: Comm):
            plans = [(v, self.plan(v)) for v in views]
            for v, plan in plans:
                if plan is None:
                    self.optimizer.forget_wire(self.params[v.key])
            dense = [v for v, plan in plans if plan is None]
            if self.layout is not None:
                self.mean_of(comm, [v.grad for v in dense])
                for v in dense:
                    self.book_layer(v, numel_bytes(v.grad), compressed=False, count=False)
            else:
                self.average_dense(comm, dense)
            projected = [(v, plan) for v, plan in plans if plan is not None]
            if projected:
                lows = [pj.project(pj.as_matrix(v.grad), basis, side) for v, (basis, side) in projected]
                flat = torch.cat([low.reshape(-1) for low in lows])
                local_rest = None
                if isinstance(self.residual, Compressor) and self.optimizer.needs_residual():
                    local_rest = [pj.as_matrix(v.grad) - pj.project_back(low, basis, side)
                                  for (v, (basis, side)), low in zip(projected, lows)]
                means = split_like(flat, lows)
                self.mean_of(comm, means)
                extra = self.reduce_residuals(comm, [v for v, _ in projected], local_rest, step) \
                    if local_rest is not None else [(None, 0)] * len(projected)
                for (v, (basis, side)), mean, (rest, rest_bytes) in zip(projected, means, extra):
                    back = pj.project_back(mean, basis, side)
                    v.grad.copy_((back if rest is None else back + rest).view_as(v.grad))
                    self.optimizer.receive_projected(self.params[v.key], in_subspace=rest is None)
                    if self.layout is not None:  # the rail hop was counted by dense_pieces
                        self.count_bytes(rest_bytes, 0)
                    self.book_layer(v, mean.numel() * mean.element_size() + rest_bytes, compressed=True,
                                    count=self.layout is None, side="right" if side == pj.RIGHT else "left",
                                    rank=min(mean.shape))
            return buffer

        return job

    def reduce_residuals(self, comm: Comm, views: list[ParamView], local_rest: list[torch.Tensor], step: int):
        """Mean over ranks of the compressed residuals (classic EF per parameter): ``[(mean, bytes)]``.
        A non-finite mean leaves the error-feedback buffers as they were."""
        from commlib.hooks.ef import ef_step

        payloads, new_errors = [], []
        for v, rest in zip(views, local_rest):
            payload, error = ef_step(rest, self.residuals.get(v.key), self.residual, self.layer_seed(step, v.key))
            payloads.append(payload)
            new_errors.append(error)
        gathered = allgather_payloads(comm, payloads)
        out = []
        for i, rest in enumerate(local_rest):
            mean = torch.zeros(rest.shape, dtype=torch.float32, device=rest.device)
            for rank_payloads in gathered:  # rank order: the same float sum on every rank
                self.residual.decompress_add_(mean, rank_payloads[i])
            out.append((mean.div_(comm.world_size).to(rest.dtype), payloads[i].wire_bytes()))
        if all(self.all_finite(mean) for mean, _ in out):
            for v, error in zip(views, new_errors):
                self.residuals[v.key] = error
        else:
            self.mark_skipped(step)
        return out
