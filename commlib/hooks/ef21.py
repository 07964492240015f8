"""EF21 (Richtárik, Sokolov, Fatkhullin; NeurIPS 2021) and EF21-W (Richtárik, Gasanov, Burlachenko; ICLR 2024)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from commlib import compress
from commlib.comm.patterns import allgather_payloads, two_phase_allreduce_like
from commlib.comm.queue import Comm
from commlib.compress.base import Compressor, Payload
from commlib.hooks.ef import COLLECTIVES, check_compressor, sum_summable_payloads
from commlib.hooks.ef21_theory import ef21w_weights
from commlib.hooks.registry import register
from commlib.hooks.state import HookState, ParamView
from commlib.validation import integer, number, one_of


def ef21_message(target: torch.Tensor, estimate: torch.Tensor, compressor: Compressor, seed: int):
    r"""One worker's EF21 message (EF21, Alg. 1, line 5): ``c_i = C(target - g_i)``.

    ``target`` is the local gradient (EF21) or ``grad_i / (n w_i)`` (EF21-W). Returns the payload
    and its decompression ``c_i``; the worker's new estimate is ``g_i + c_i``.
    """
    payload = compressor.compress(target - estimate, seed=seed)
    return payload, compressor.decompress(payload)


def scale_payload(payload: Payload, factor: float) -> Payload:
    """``factor`` x a summable payload (its decompression is linear in the wire tensors)."""
    tensors = tuple(t * factor if t.is_floating_point() else t for t in payload.tensors)
    return Payload(tensors, payload.shape, payload.dtype, payload.context)


@register("ef21")
class EF21State(HookState):
    r"""EF21 with any compressor: each rank keeps its gradient estimate ``g_i``, all ranks the same ``g``.

    Per compressed step and parameter (EF21, Alg. 1)::

        c_i = C(grad_i - g_i);   g_i <- g_i + c_i;   g <- g + mean_j c_j;   return g

    The first compressed step of a parameter is one dense round: ``g_i = grad_i``, ``g = mean grad``.
    Summable compressors (Cast, RandomK) are reduced with one allreduce, the others with an
    all-gather (or ``collective="two_phase"``: reduce-scatter/all-gather of compressed chunks; the
    server's recompression then enters ``g`` exactly as every rank sees it, so all ranks still agree,
    but ``g`` is no longer exactly ``mean g_i``). With :class:`~commlib.compress.Identity`, EF21 is
    plain averaging (``g_i = grad_i``, ``g = mean grad``) and the state does exactly that.

    Memory: two gradient-sized buffers per compressed parameter, ``g_i`` and ``g`` (the least any
    EF21 implementation can keep: ``g`` cannot be rebuilt from local data), in the gradient's dtype.
    Classic EF (``hooks.make("ef")``) keeps one.

    Arguments:
        compressor: a contractive :mod:`commlib.compress` compressor (default ``TopK(0.01)``);
            :func:`commlib.hooks.compressor_alpha` gives its alpha for the theory step size.
        collective: ``"auto"``, ``"allreduce"`` (summable only), ``"allgather"`` or ``"two_phase"``.

    Example::

        >>> from commlib import compress, hooks
        >>> state, hook = hooks.make("ef21", compressor=compress.TopK(0.01), model=model)  # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)                                      # doctest: +SKIP
    """

    name = "ef21"
    # g_i and g reset together: the next compressed step is EF21's dense first round again
    per_rank_buffers = ("local_estimates", "aggregates", "server_errors")

    def __init__(self, process_group=None, compressor: Compressor | None = None, *, collective: str = "auto",
                 **kwargs):
        self.compressor = check_compressor(compressor if compressor is not None else compress.TopK(0.01))
        one_of("collective", collective, COLLECTIVES)
        if collective == "allreduce" and not self.compressor.summable:
            raise ValueError(f"collective 'allreduce' needs a summable compressor; {self.compressor!r} is not")
        if collective == "auto":
            collective = "allreduce" if self.compressor.summable else "allgather"
        self.collective = collective
        self.local_estimates: dict[str, torch.Tensor] = {}  # g_i
        self.aggregates: dict[str, torch.Tensor] = {}  # g (identical on every rank)
        self.server_errors: dict[str, torch.Tensor] = {}
        super().__init__(process_group, **kwargs)

    def options(self) -> dict:
        return {"compressor": repr(self.compressor), "collective": self.collective}

    # ------------------------------------------------------------------ weights (EF21-W overrides)
    def worker(self) -> int:
        """This rank's worker index: its rank, or on the two-level path its node (its rail rank)."""
        return self.rail.rank if self.layout is not None else self.rank

    def workers(self) -> int:
        """EF21's n: the ranks, or on the two-level path the nodes."""
        return self.layout.node_count if self.layout is not None else self.world_size

    def weight(self, worker: int) -> float:
        """``w_worker``; EF21 is EF21-W with ``w = 1/n``."""
        return 1.0 / self.workers()

    def target(self, grad: torch.Tensor) -> torch.Tensor:
        """What ``g_i`` estimates: ``grad_i`` (EF21); EF21-W overrides with ``grad_i / (n w_i)``."""
        return grad

    # ------------------------------------------------------------------ the job
    def compressible(self, view: ParamView) -> bool:
        return view.grad.dim() > 1 and self.compressor.shrinks(view.grad.shape, view.grad.dtype)

    supports_hierarchy = True

    def hierarchical_job(self, buffer, views, step, bucket_index):
        """Two levels: the node is EF21's worker. Each compressible parameter is reduced densely in
        the node; local rank j runs EF21 on piece j of the node's mean (``g_i`` and ``g`` per piece:
        1/L of the memory) across its rail; the node all-gathers the pieces. EF21's weights are then
        per node (1 / nodes)."""
        def job(comm: Comm):
            chosen = [v for v in views if self.compressible(v)]
            plain = [v for v in views if not self.compressible(v)]
            if plain:
                self.two_level([v.grad for v in plain], self.dense_pieces)
            if chosen:
                def rounds(rail: Comm, pieces: list[torch.Tensor]) -> None:
                    self.ef21_round(rail, [ParamView(self.piece_key(v.key), piece, 0) for v, piece in
                                           zip(chosen, pieces)], step, all_compressible=True)

                self.two_level([v.grad for v in chosen], rounds)
            return buffer

        return job

    def compressed_job(self, buffer, views, step, bucket_index):
        def job(comm: Comm):
            self.ef21_round(comm, views, step)
            return buffer

        return job

    def ef21_round(self, comm: Comm, views: list[ParamView], step: int, all_compressible: bool = False) -> None:
        """One EF21 round of ``views`` over ``comm`` (the first round of a parameter is dense)."""
        compressible = (lambda v: True) if all_compressible else self.compressible
        identity = isinstance(self.compressor, compress.Identity)
        fresh = [v for v in views if not compressible(v) or v.key not in self.aggregates or identity]
        chosen = [v for v in views if v not in fresh]
        # dense: 1-D tensors, tensors compression would not shrink, and every parameter's first
        # EF21 round (g_i = target_i, g = mean grad); EF21 with Identity stays here exactly.
        starting = [v for v in fresh if compressible(v)]
        targets = {v.key: self.target(v.grad).clone() for v in starting}
        self.average_dense(comm, fresh)
        if starting and all(self.all_finite(v.grad) for v in starting):
            for v in starting:
                if not identity:
                    self.local_estimates[v.key] = targets[v.key]
                    self.aggregates[v.key] = v.grad.clone()
        elif starting:
            self.mark_skipped(step)
        if chosen:
            self.reduce_compressed(comm, chosen, step)

    def reduce_compressed(self, comm: Comm, chosen: list[ParamView], step: int) -> None:
        n = comm.world_size
        own = self.weight(comm.rank) * n  # n w_i: 1 for EF21
        for v in chosen:
            self.book_layer(v, self.compressor.nbytes(v.grad.shape, v.grad.dtype))
        messages, updates, server_errors = [], [], {}  # c_i (local) and sum_j w_j c_j (aggregate)
        if self.collective == "two_phase":
            values = []
            for v in chosen:
                diff = self.target(v.grad) - self.local_estimates[v.key]
                values.append(diff * own if own != 1.0 else diff)
            updates, local_hat, errors = two_phase_allreduce_like(
                comm, values, self.compressor, [self.server_errors.get(v.key) for v in chosen],
                [self.layer_seed(step, v.key) for v in chosen])
            messages = [hat / own if own != 1.0 else hat for hat in local_hat]
            server_errors = dict(zip((v.key for v in chosen), errors))
        else:
            payloads = []
            for v in chosen:
                payload, message = ef21_message(self.target(v.grad), self.local_estimates[v.key], self.compressor,
                                                self.layer_seed(step, v.key))
                payloads.append(payload)
                messages.append(message)
            if self.collective == "allreduce":
                if own != 1.0:  # mean_j (n w_j c_j) = sum_j w_j c_j; decompression is linear for summable payloads
                    payloads = [scale_payload(p, own) for p in payloads]
                for v, p in zip(chosen, sum_summable_payloads(comm, payloads)):
                    updates.append(self.compressor.decompress(p).to(v.grad.dtype))
            else:
                gathered = allgather_payloads(comm, payloads)
                weights = [self.weight(r) for r in range(n)]
                for i, v in enumerate(chosen):
                    update = torch.zeros(v.grad.shape, dtype=torch.float32, device=v.grad.device)
                    for r, rank_payloads in enumerate(gathered):  # rank order: the same sum everywhere
                        update.add_(self.compressor.decompress(rank_payloads[i]).float(), alpha=weights[r])
                    updates.append(update)
        new_aggregates = [self.aggregates[v.key] + u.to(v.grad.dtype) for v, u in zip(chosen, updates)]
        for v, g in zip(chosen, new_aggregates):
            v.grad.copy_(g)
        # Rule 5: a non-finite aggregate (any rank overflowed) propagates and commits nothing.
        if all(self.all_finite(g) for g in new_aggregates):
            for v, c, g in zip(chosen, messages, new_aggregates):
                self.local_estimates[v.key] = self.local_estimates[v.key] + c.to(v.grad.dtype)
                self.aggregates[v.key] = g
            self.server_errors.update(server_errors)
        else:
            self.mark_skipped(step)

    # ------------------------------------------------------------------ checkpoints
    def buffers_state(self) -> dict:
        return {"local_estimates": dict(self.local_estimates), "aggregates": dict(self.aggregates),
                "server_errors": dict(self.server_errors)}

    def load_buffers_state(self, buffers: dict) -> None:
        self.local_estimates = dict(buffers["local_estimates"])
        self.aggregates = dict(buffers["aggregates"])
        self.server_errors = dict(buffers["server_errors"])


@register("ef21w")
class EF21WState(EF21State):
    r"""EF21-W: EF21 with weights ``w_i = L_i / sum_j L_j`` (Richtárik, Gasanov, Burlachenko 2024, Alg. 1)::

        c_i = C(grad_i / (n w_i) - g_i);   g_i <- g_i + c_i;   g <- g + sum_j w_j c_j

    Its theory step size uses the arithmetic mean of the L_i instead of EF21's quadratic mean
    (:func:`commlib.hooks.ef21w_stepsize`). For positively homogeneous compressors (TopK, RandomK,
    scaled Sign) the iterates equal EF21's; the weights change the algorithm for the others (Cast,
    QSGD). ``g`` is ``mean grad`` after the dense first round, as in EF21.

    Weights: ``smoothness=[L_0, ..., L_{n-1}]`` (one per rank, as the user knows them), or, when
    not given, estimated online. The online estimator: every ``estimate_every`` steps, each rank
    snapshots its compressed parameters ``x`` and local gradients; one step later it computes
    ``L_hat_i = ||grad_i(x') - grad_i(x)|| / ||x' - x||`` over them (a secant estimate of the local
    smoothness; with minibatch noise it is biased upwards, equally on every rank in expectation),
    the ranks all-gather their ``L_hat`` (one float each, the same tensor on every rank), and every
    rank updates ``L_i <- s L_i + (1 - s) L_hat_i`` (``smoothing`` s, the first estimate taken as is)
    and ``w_i = L_i / sum L``. On a weight change ``g_i`` is rescaled by ``w_old / w_new`` so that
    ``n w_i g_i`` (the estimate of ``grad_i``) and ``g = sum w_i g_i`` are unchanged. The snapshots
    exist for one step in ``estimate_every``; otherwise memory is EF21's.

    On the two-level path (``hierarchical=``) the node is the worker: its gradient is the mean of
    its ranks', so its smoothness is taken as the mean of theirs (an upper bound: L of a mean of
    functions is at most the mean of their L), ``w_k = L_k / sum L`` over nodes, and ``smoothness``
    (given or estimated) stays one value per rank.

    Example::

        >>> state, hook = hooks.make("ef21w", compressor=compress.TopK(0.01), smoothness=[1.0, 4.0])  # doctest: +SKIP
    """

    name = "ef21w"
    per_rank_buffers = EF21State.per_rank_buffers + ("estimate_in_flight",)

    def __init__(self, process_group=None, compressor: Compressor | None = None, *, smoothness=None,
                 estimate_every: int = 50, smoothing: float = 0.9, **kwargs):
        integer("estimate_every", estimate_every, 2)
        number("smoothing", smoothing, low=0, high=1, high_open=True)
        super().__init__(process_group, compressor, **kwargs)
        if smoothness is not None:
            smoothness = [float(x) for x in smoothness]
            ef21w_weights(smoothness)  # validates: every L_i a finite number > 0
        self.online = smoothness is None
        self.estimate_every = estimate_every
        self.smoothing = float(smoothing)
        self.smoothness = None if smoothness is None else torch.tensor(smoothness, dtype=torch.float64)
        self.estimates_taken = 0
        self._params: dict[str, torch.Tensor] = {}
        self._snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._secant = [0.0, 0.0]  # sum ||dgrad||^2, sum ||dx||^2 of the current estimate
        self._pending_step = -1
        self._node_members = None  # on the two-level path: each node's ranks (set at bind)
        if self.smoothness is not None and dist.is_available() and dist.is_initialized():
            self.on_bind()  # the group exists already: refuse a wrong smoothness at construction

    def on_bind(self) -> None:
        if self.smoothness is None:
            self.smoothness = torch.ones(self.world_size, dtype=torch.float64)
        elif len(self.smoothness) != self.world_size:  # checked here when the state is built before init
            raise ValueError(f"smoothness must have one L_i per rank ({self.world_size}), got {len(self.smoothness)}")
        self._node_members = None
        if self.layout is not None:  # group indices of each node's ranks, for the nodes' L
            index = {g: i for i, g in enumerate(dist.get_process_group_ranks(self.queue.group))}
            self._node_members = [torch.tensor([index[g] for g in node]) for node in self.layout.nodes]

    def options(self) -> dict:
        return {**super().options(), "online": self.online}

    def worker_smoothness(self) -> torch.Tensor:
        """L per worker: ``smoothness``, or on the two-level path the mean over each node's ranks."""
        if self._node_members is None:
            return self.smoothness
        return torch.stack([self.smoothness[members].mean() for members in self._node_members])

    def weight(self, worker: int) -> float:
        smoothness = self.worker_smoothness()
        return float(smoothness[worker] / smoothness.sum())

    def weights(self) -> list[float]:
        return [self.weight(k) for k in range(self.workers())]

    def target(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / (self.workers() * self.weight(self.worker()))

    # ------------------------------------------------------------------ online L_i estimation
    def param_views(self, bucket):
        views = super().param_views(bucket)
        if self.online:
            for v, p in zip(views, bucket.parameters()):
                self._params[v.key] = p
        return views

    def observe(self, views: list[ParamView], step: int) -> None:
        if not self.online or step < self.start_iter:
            return
        phase = (step - self.start_iter) % self.estimate_every
        for v in views:
            if v.grad.dim() < 2 or v.key not in self._params:
                continue
            if phase == 0:
                self._snapshot[v.key] = (self._params[v.key].detach().clone(), v.grad.detach().clone())
                self._pending_step = step + 1
            elif phase == 1 and v.key in self._snapshot:
                x, g = self._snapshot.pop(v.key)
                self._secant[0] += float((v.grad.double() - g.double()).pow(2).sum())
                self._secant[1] += float((self._params[v.key].detach().double() - x.double()).pow(2).sum())

    def prepare(self, comm: Comm, step: int) -> None:
        if self.online and self._pending_step >= 0 and step > self._pending_step:
            self._pending_step = -1
            self._finish_estimate(comm)

    def _finish_estimate(self, comm: Comm) -> None:
        num, den = self._secant
        self._secant = [0.0, 0.0]
        self._snapshot.clear()
        local = num**0.5 / den**0.5 if den > 0 and num > 0 else float("nan")
        gathered = torch.cat(comm.all_gather(torch.tensor([local], dtype=torch.float64)))
        if not bool(torch.isfinite(gathered).all()) or not bool((gathered > 0).all()):
            return  # a rank saw no movement or an overflow: keep the weights (same verdict everywhere)
        old = self.weights()
        if self.estimates_taken == 0:
            self.smoothness = gathered.clone()
        else:
            self.smoothness = self.smoothing * self.smoothness + (1 - self.smoothing) * gathered
        self.estimates_taken += 1
        ratio = old[self.worker()] / self.weight(self.worker())
        for key, estimate in self.local_estimates.items():
            self.local_estimates[key] = estimate * ratio

    # ------------------------------------------------------------------ books and checkpoints
    def stats(self) -> dict:
        stats = super().stats()
        stats["ef21w"] = {"smoothness": [] if self.smoothness is None else self.smoothness.tolist(),
                          "weights": self.weights() if self.smoothness is not None else [],
                          "online": self.online, "estimates_taken": self.estimates_taken}
        return stats

    def buffers_state(self) -> dict:
        state = super().buffers_state()
        state["smoothness"] = self.smoothness.clone()
        state["estimates_taken"] = self.estimates_taken
        state["pending_step"] = self._pending_step
        # an estimate in flight (snapshot taken, secant not finished) resumes where it was
        state["estimate_in_flight"] = {
            "snapshot_params": {k: x for k, (x, _) in self._snapshot.items()},
            "snapshot_grads": {k: g for k, (_, g) in self._snapshot.items()},
            "secant": torch.tensor(self._secant, dtype=torch.float64)}
        return state

    def load_buffers_state(self, buffers: dict) -> None:
        super().load_buffers_state(buffers)
        self.smoothness = buffers["smoothness"].clone()
        self.estimates_taken = int(buffers["estimates_taken"])
        self._pending_step = int(buffers["pending_step"])
        flight = buffers["estimate_in_flight"] or {"snapshot_params": {}, "snapshot_grads": {},
                                                   "secant": torch.zeros(2, dtype=torch.float64)}
        self._snapshot = {k: (x, flight["snapshot_grads"][k]) for k, x in flight["snapshot_params"].items()}
        self._secant = [float(v) for v in flight["secant"]]
