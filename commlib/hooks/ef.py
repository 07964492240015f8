"""Classic error feedback with any compressor (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD)."""

from __future__ import annotations

import torch

from commlib import compress
from commlib.comm.patterns import TwoPhaseEF, allgather_payloads, allreduce_mean_, split_like
from commlib.comm.queue import Comm
from commlib.compress.base import Compressor, Payload
from commlib.hooks.registry import register
from commlib.hooks.state import HookState, ParamView
from commlib.validation import flag, one_of

COLLECTIVES = ("auto", "allreduce", "allgather", "two_phase")


def ef_step(grad: torch.Tensor, residual: torch.Tensor | None, compressor: Compressor, seed: int):
    r"""One rank's classic-EF compression (EF-SGD, Alg. 2 of Karimireddy et al.):

    ``v = g + e``, ``p = C(v)``, ``e' = v - decompress(p)``. Returns ``(p, e')``; ``e' + decompress(p)``
    equals ``v`` exactly in exact arithmetic, so nothing the compressor drops is lost.
    """
    corrected = grad + residual if residual is not None else grad.clone()
    payload = compressor.compress(corrected, seed=seed)
    return payload, corrected - compressor.decompress(payload)


def check_compressor(compressor) -> Compressor:
    if not isinstance(compressor, Compressor):
        raise ValueError(f"compressor must be a commlib.compress.Compressor, got {compressor!r}")
    if isinstance(compressor, compress.PowerSGD):
        raise ValueError("compressor PowerSGD needs two rounds per bucket: use hooks.make('powersgd', rank=...)")
    return compressor


@register("ef")
class ErrorFeedbackState(HookState):
    r"""Any compressor with classic error feedback, one residual per parameter.

    Per step and parameter on rank i: ``v = g_i + e_i``, send ``C(v)``, keep
    ``e_i = v - decompress(C(v))``; the hook returns the mean over ranks of the decompressed
    payloads. 1-D tensors and tensors the compressor would not shrink are averaged densely.

    Memory: one gradient-sized residual per compressed parameter (in the gradient's dtype), plus
    for ``two_phase`` a 1/n-sized server residual per parameter.

    Arguments:
        compressor: a :mod:`commlib.compress` compressor (default ``TopK(0.01)``).
        collective: ``"auto"`` (allreduce for summable compressors, else allgather),
            ``"allreduce"`` (summable only), ``"allgather"``, or ``"two_phase"`` (reduce-scatter and
            all-gather of compressed chunks with server-side error feedback, as 1-bit Adam; bytes
            per rank stay flat as the world grows).
        error_feedback: keep residuals (default True). False gives plain compressed averaging.

    Example::

        >>> from commlib import compress, hooks
        >>> state, hook = hooks.make("ef", compressor=compress.Sign(), model=model)  # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)                                 # doctest: +SKIP
    """

    name = "ef"
    per_rank_buffers = ("residuals", "server_errors")

    def __init__(self, process_group=None, compressor: Compressor | None = None, *, collective: str = "auto",
                 error_feedback: bool = True, **kwargs):
        self.compressor = check_compressor(compressor if compressor is not None else compress.TopK(0.01))
        one_of("collective", collective, COLLECTIVES)
        if collective == "allreduce" and not self.compressor.summable:
            raise ValueError(f"collective 'allreduce' needs a summable compressor; {self.compressor!r} is not")
        flag("error_feedback", error_feedback)
        if collective == "auto":
            collective = "allreduce" if self.compressor.summable else "allgather"
        self.collective = collective
        self.error_feedback = error_feedback
        self.residuals: dict[str, torch.Tensor] = {}
        self.server_errors: dict[str, torch.Tensor] = {}
        super().__init__(process_group, **kwargs)

    def options(self) -> dict:
        return {"compressor": repr(self.compressor), "collective": self.collective,
                "error_feedback": self.error_feedback}

    def compressor_for(self, key: str) -> Compressor:
        """The compressor of one parameter (L-GreCo assigns one per layer)."""
        return self.compressor

    def compressible(self, view: ParamView) -> bool:
        return view.grad.dim() > 1 and self.compressor_for(view.key).shrinks(view.grad.shape, view.grad.dtype)

    def compressed_job(self, buffer, views, step, bucket_index):
        def job(comm: Comm):
            chosen = [v for v in views if self.compressible(v)]  # decided here: a retune may precede
            dense = [v for v in views if not self.compressible(v)]
            self.average_dense(comm, dense)
            if chosen:
                self.reduce_compressed(comm, chosen, step)
            return buffer

        return job

    supports_hierarchy = True

    def hierarchical_job(self, buffer, views, step, bucket_index):
        """Two levels (:meth:`~commlib.hooks.state.HookState.two_level`): each compressible parameter
        is reduced densely inside the node; local rank j compresses piece j of the node's mean of
        every parameter with error feedback on that piece (1/L of the residual memory) and exchanges
        it across its rail with this state's collective; the node all-gathers the pieces. 1-D and
        unshrinkable parameters take the same path densely."""
        def compressed(rail: Comm, pieces: list[torch.Tensor], group) -> None:
            self.reduce_compressed(rail, [ParamView(self.piece_key(v.key), piece, 0)
                                          for v, piece in zip(group, pieces)], step)

        def dense(rail: Comm, pieces: list[torch.Tensor], group) -> None:
            self.dense_pieces(rail, pieces)

        def job(comm: Comm):
            chosen = [v for v in views if self.compressible(v)]
            plain = [v for v in views if not self.compressible(v)]
            for group, reduce_pieces in ((plain, dense), (chosen, compressed)):
                if group:
                    self.two_level([v.grad for v in group],
                                   lambda rail, pieces, group=group, f=reduce_pieces: f(rail, pieces, group))
            return buffer

        return job

    def reduce_compressed(self, comm: Comm, chosen: list[ParamView], step: int) -> None:
        """Error feedback in two passes per parameter (the fused kernels where the compressor has
        them): compress ``g + e`` reading both in place, run the collective, and only then, if every
        rank's result is finite, write ``e <- (g + e) - decompress(sent)`` (rule 5: a non-finite step
        leaves the residuals as they were); the result overwrites the gradient last."""
        compressors = [self.compressor_for(v.key) for v in chosen]
        for v, c in zip(chosen, compressors):
            self.book_layer(v, c.nbytes(v.grad.shape, v.grad.dtype))
        if self.collective == "two_phase":
            self._two_phase(comm, chosen, step)
            return
        previous = [self.residuals.get(v.key) if self.error_feedback else None for v in chosen]
        payloads = [c.compress_ef(v.grad, e, seed=self.layer_seed(step, v.key))
                    for v, c, e in zip(chosen, compressors, previous)]
        like = chosen[0].grad
        if self.collective == "allreduce":
            means = sum_summable_payloads(comm, payloads)
            finite = self.finite_gate(zip(compressors, means, strict=True), like)
            results = [c.decompress(p) for c, p in zip(compressors, means)]
        else:
            gathered = allgather_payloads(comm, payloads)
            finite = self.finite_gate(((c, rank_payloads[i]) for rank_payloads in gathered
                                       for i, c in enumerate(compressors)), like)
            results = []
            for i, (v, c) in enumerate(zip(chosen, compressors)):
                if v.grad.dtype == torch.float32 and c.touched_indices(payloads[i]) is not None:
                    results.append([rank_payloads[i] for rank_payloads in gathered])  # written in place below
                    continue
                out = torch.zeros(v.grad.shape, dtype=torch.float32, device=v.grad.device)
                for rank_payloads in gathered:  # rank order: the same float sum on every rank
                    c.decompress_add_(out, rank_payloads[i])
                results.append(out.div_(comm.world_size))
        if isinstance(finite, torch.Tensor):  # device gate: both branches computed, selected on the device
            if self.error_feedback:
                for v, c, p, e in zip(chosen, compressors, payloads, previous):
                    self.residuals[v.key] = gated_residual(c, v.grad, p, e, finite)
        elif finite:
            if self.error_feedback:
                for v, c, p, e in zip(chosen, compressors, payloads, previous):
                    target = torch.empty_like(v.grad) if e is None else e
                    self.residuals[v.key] = c.update_residual_(target, v.grad, p, accumulate=e is not None)
        self.record_finite(step, finite)
        for v, c, result in zip(chosen, compressors, results):
            if isinstance(result, list):
                write_sparse_mean(v.grad, c, result, comm.world_size)
            else:
                v.grad.copy_(result)

    def _two_phase(self, comm, chosen, step):
        """Two-phase reduction of the EF-corrected values (:class:`TwoPhaseEF`): worker residuals
        against the per-chunk compression actually sent, server residuals per parameter chunk."""
        previous = [self.residuals.get(v.key) if self.error_feedback else None for v in chosen]
        reduction = TwoPhaseEF(comm, [v.grad for v in chosen], previous, self.compressor,
                               [self.server_errors.get(v.key) for v in chosen],
                               [self.layer_seed(step, v.key) for v in chosen])
        if reduction.finite:
            residuals, server_errors = reduction.commit_residuals(previous, workers=self.error_feedback)
            if self.error_feedback:
                self.residuals.update(zip((v.key for v in chosen), residuals))
            self.server_errors.update(zip((v.key for v in chosen), server_errors))
        else:
            self.mark_skipped(step)
        reduction.write_results([v.grad for v in chosen])

    def buffers_state(self) -> dict:
        return {"residuals": dict(self.residuals), "server_errors": dict(self.server_errors)}

    def load_buffers_state(self, buffers: dict) -> None:
        self.residuals = dict(buffers["residuals"])
        self.server_errors = dict(buffers["server_errors"])


def gated_residual(compressor: Compressor, grad: torch.Tensor, payload: Payload, residual: torch.Tensor | None,
                   ok: torch.Tensor) -> torch.Tensor:
    """Rule 5 without reading ``ok`` on the host: the new residual ``(g + e) - decompress(sent)``
    where ``ok`` (a 0-dim bool tensor) holds, else the old residual (zeros where there was none),
    written into ``residual`` when there is one. Equal to the host-gated update whenever ``ok`` is
    true; a skipped first step leaves zeros instead of no residual (the same values, up to the sign
    of a -0.0 gradient element)."""
    target = torch.empty_like(grad) if residual is None else residual.clone()
    new = compressor.update_residual_(target, grad, payload, accumulate=residual is not None)
    if residual is None:
        return torch.where(ok, new, torch.zeros((), dtype=new.dtype, device=new.device), out=new)
    return torch.where(ok, new, residual, out=residual)


def write_sparse_mean(grad: torch.Tensor, compressor: Compressor, payloads: list[Payload], world_size: int) -> None:
    """``grad <- mean of the decompressed sparse payloads`` (float32), in place: zero, scatter-add in
    rank order, divide only where something landed. Equal to summing into a zeroed buffer, dividing
    it all and copying it over, without the two extra passes."""
    grad.zero_()
    for payload in payloads:
        compressor.decompress_add_(grad, payload)
    flat = grad.view(-1)
    touched = torch.cat([compressor.touched_indices(p).reshape(-1) for p in payloads]).long()
    flat[touched] = flat[touched] / world_size


def sum_summable_payloads(comm: Comm, payloads: list[Payload]) -> list[Payload]:
    """Mean of summable payloads over ranks with one allreduce per wire dtype (divide first)."""
    by_dtype: dict[torch.dtype, list[tuple[int, int]]] = {}
    for i, p in enumerate(payloads):
        for j, t in enumerate(p.tensors):
            by_dtype.setdefault(t.dtype, []).append((i, j))
    out = [list(p.tensors) for p in payloads]
    for where in by_dtype.values():
        tensors = [payloads[i].tensors[j] for i, j in where]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        allreduce_mean_(comm, flat)
        for (i, j), mean in zip(where, split_like(flat, tensors)):
            out[i][j] = mean
    return [Payload(tuple(ts), p.shape, p.dtype, p.context) for ts, p in zip(out, payloads)]
