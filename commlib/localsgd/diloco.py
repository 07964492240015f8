"""DiLoCo (Douillard et al., arXiv 2311.08105) and Streaming DiLoCo (arXiv 2501.18512): local
steps, then an outer optimizer on the averaged, optionally compressed, outer gradient."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import nn

from commlib.comm.agree import agree_across_ranks
from commlib.comm.patterns import TwoPhaseEF, allgather_payloads, allreduce_mean_, split_like
from commlib.comm.queue import Comm, OrderedQueue
from commlib.comm.rank_state import byte_books, stable_hash, tensor_keys
from commlib.compress.base import Compressor, derive_seed
from commlib.hooks.ef import COLLECTIVES, check_compressor, sum_summable_payloads, write_sparse_mean
from commlib.validation import flag, integer, number, one_of

FORMAT = "commlib.localsgd/1"


# ---------------------------------------------------------------------- the math, in small pieces
def outer_gradient(synced: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """DiLoCo's outer gradient of one replica (Alg. 1, line 8): ``delta = theta_synced - theta_local``
    in float32 (the direction the replica moved, negated, so that an SGD step with lr 1 lands on it)."""
    return synced - local.detach().float()


def fragment_of(index: int, fragments: int) -> int:
    """Streaming DiLoCo's strided fragments: parameter ``index`` (in ``named_parameters`` order)
    belongs to fragment ``index mod fragments``, so each fragment spans the whole depth."""
    return index % fragments


def fragment_offset(fragment: int, fragments: int, sync_every: int) -> int:
    """The inner step (mod ``sync_every``) at which ``fragment`` syncs: fragment f at
    ``(f + 1) H / k``, so with one fragment every H steps and with k fragments evenly staggered."""
    return ((fragment + 1) * sync_every // fragments) % sync_every


def fragments_due(step: int, fragments: int, sync_every: int) -> list[int]:
    """The fragments whose sync starts after inner step ``step`` (counted from 1)."""
    return [f for f in range(fragments) if step > 0 and step % sync_every == fragment_offset(f, fragments, sync_every)]


def mix_(local: torch.Tensor, synced: torch.Tensor, alpha: float) -> None:
    """Streaming DiLoCo's merge of a late sync: ``theta_local <- alpha theta_local + (1 - alpha) theta_synced``."""
    if alpha == 0.0:
        local.copy_(synced)
    else:
        local.copy_(local.float().mul_(alpha).add_(synced, alpha=1.0 - alpha))


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of a parameter: the local shard of an FSDP2 DTensor, else itself."""
    return p.to_local() if hasattr(p, "to_local") else p


class DiLoCo:
    r"""Local steps with an outer optimizer: H inner steps per replica, then the outer gradient
    ``delta = theta_synced - theta_local`` is averaged across replicas (compressed, with error
    feedback, where a compressor is given) and applied to ``theta_synced`` by the outer optimizer,
    and every replica restarts from it (DiLoCo, Alg. 1)::

        outer = DiLoCo(model, inner_optimizer, sync_every=H)
        for batch in data:
            loss(model(batch)).backward(); inner_optimizer.step(); inner_optimizer.zero_grad()
            outer.step()   # counts inner steps; syncs (a fragment) when due

    Per sync and parameter on replica i: ``v = delta_i + e_i``; the replicas average ``C(v)``
    through the compressor's collective (all-reduce for summable compressors and for none,
    all-gather otherwise, or ``collective="two_phase"``: reduce-scatter of compressed chunks,
    recompressed means all-gathered, with server-side error feedback); ``e_i <- v - C(v)``.
    The outer optimizer takes the mean as ``theta_synced``'s gradient: SGD with Nesterov
    momentum (``outer_lr``, ``outer_momentum``, ``nesterov``) by default, or
    ``outer_optimizer(params)`` for any ``torch.optim`` optimizer.

    Streaming (``fragments=k``): parameter j belongs to fragment ``j mod k``, and fragment f syncs
    every H steps at offset ``(f + 1) H / k``. ``delay=tau`` overlaps a sync with tau inner steps:
    the outer gradient is taken when the sync is due, exchanged on a worker thread (the
    collectives of a hook state, on a private process group with a timeout) while the replica
    keeps training, and merged tau steps later as
    ``theta_local <- mix theta_local + (1 - mix) theta_synced`` (``mix=0``, the default, replaces
    the local parameters, so every replica is identical after each merge; the paper's 0.5 keeps
    some of the local progress and lets replicas differ). What overlaps on a CPU: the exchange
    and the compression run on the worker thread, next to the inner steps on the main thread.

    Overflow (rule 5): a sync whose averaged outer gradient is non-finite on any replica (every
    replica sees it: the all-reduce carries it, gathered payloads are checked) skips the outer
    step on every replica, keeps the residuals and outer momentum, and every replica restarts
    from ``theta_synced``. ``stats()["skipped_syncs"]`` counts them.

    Replicas inside a node: pass the inter-node group as ``process_group`` (with DDP or FSDP2
    inside the node, every rank of a node holds the same replica; a rail group, e.g. from
    :func:`commlib.comm.topology.node_groups`, syncs it across nodes; FSDP2 shards are synced as
    their local tensors).

    Memory: ``theta_synced`` and the outer momentum are two float32 copies of the parameters,
    plus one residual copy with error feedback (``stats()["memory_bytes"]``).

    State (``state_dict``/``load_state_dict``, :func:`commlib.hooks.gather_state_dict` for one
    file from rank 0): the synced copy, outer optimizer, schedule, syncs in flight, and each
    rank's residuals under ``rank{r}``; a state of another world size, rank, option set or
    parameter layout is refused.

    Example::

        >>> model = nn.Linear(4, 2); inner = torch.optim.AdamW(model.parameters())  # doctest: +SKIP
        >>> outer = DiLoCo(model, inner, sync_every=50, compressor=QSGD(bits=4))    # doctest: +SKIP
    """

    name = "diloco"

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer | None = None, *,
                 sync_every: int = 500, outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 outer_optimizer=None, compressor: Compressor | None = None, error_feedback: bool = True,
                 collective: str = "auto", fragments: int = 1, delay: int = 0, mix: float = 0.0,
                 process_group=None, seed: int = 0, timeout: float | None = 600.0):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value, low in [("sync_every", sync_every, 1), ("fragments", fragments, 1), ("delay", delay, 0)]:
            integer(name, value, low)
        if fragments > sync_every:
            raise ValueError(f"fragments must be <= sync_every ({sync_every}) so each has its own offset, "
                             f"got {fragments}")
        if delay >= sync_every // fragments:
            raise ValueError(f"delay must be < sync_every / fragments ({sync_every // fragments}): a fragment's "
                             f"sync ends before the next one starts; got {delay}")
        number("outer_lr", outer_lr, low=0, low_open=True)
        number("outer_momentum", outer_momentum, low=0, high=1, high_open=True)
        number("mix", mix, low=0, high=1, high_open=True)
        flag("nesterov", nesterov)
        flag("error_feedback", error_feedback)
        if nesterov and outer_momentum == 0 and outer_optimizer is None:
            raise ValueError("nesterov=True needs outer_momentum > 0 (torch's SGD rule); pass nesterov=False")
        if outer_optimizer is not None and not callable(outer_optimizer):
            raise ValueError("outer_optimizer must be a callable params -> torch.optim.Optimizer")
        if compressor is not None:
            check_compressor(compressor)
        one_of("collective", collective, COLLECTIVES)
        if collective == "allreduce" and compressor is not None and not compressor.summable:
            raise ValueError(f"collective 'allreduce' needs a summable compressor; {compressor!r} is not")
        if collective == "auto":
            collective = "allreduce" if compressor is None or compressor.summable else "allgather"
        if timeout is not None:
            number("timeout", timeout, low=0, low_open=True, why=" (seconds) or None")
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.sync_every, self.fragments, self.delay, self.mix = sync_every, fragments, delay, float(mix)
        self.outer_lr, self.outer_momentum, self.nesterov = float(outer_lr), float(outer_momentum), nesterov
        self.compressor, self.error_feedback, self.collective = compressor, error_feedback, collective
        self.process_group, self.seed, self.timeout = process_group, int(seed), timeout
        self.custom_outer = outer_optimizer is not None
        self.params = dict(model.named_parameters())
        if not self.params:
            raise ValueError("model has no parameters")
        self.keys = list(self.params)
        self.fragment_keys = [[k for i, k in enumerate(self.keys) if fragment_of(i, fragments) == f]
                              for f in range(fragments)]
        if any(not keys for keys in self.fragment_keys):
            raise ValueError(f"fragments ({fragments}) must be <= the number of parameters ({len(self.keys)})")
        # theta_synced: float32 copies, the outer optimizer's parameters
        self.synced = {k: _local(p).detach().float().clone() for k, p in self.params.items()}
        for t in self.synced.values():
            t.requires_grad_(False)
        outer_params = [self.synced[k] for k in self.keys]
        self.outer_optimizer = (outer_optimizer(outer_params) if outer_optimizer is not None else
                                torch.optim.SGD(outer_params, lr=self.outer_lr, momentum=self.outer_momentum,
                                                nesterov=nesterov))
        self.residuals: dict[str, torch.Tensor] = {}
        self.server_errors: dict[str, torch.Tensor] = {}
        self.inner_steps = 0
        self.syncs = 0  # fragment syncs started
        self.skipped_syncs = 0
        self.history: list[tuple[int, int]] = []  # (inner step, fragment) of every sync started
        # fragment -> (merge step, Future of (means, finite)); a loaded sync in flight is a completed Future
        self._in_flight: dict[int, tuple[int, torch.futures.Future]] = {}
        # books
        self.payload_bytes_total = 0
        self.dense_bytes_total = 0
        self.last_sync_payload_bytes = self.last_sync_dense_bytes = 0
        self.queue: OrderedQueue | None = None
        self.closed = False
        if dist.is_available() and dist.is_initialized():
            self.bind()

    # ------------------------------------------------------------------ binding
    def options(self) -> dict:
        return {"sync_every": self.sync_every, "fragments": self.fragments, "delay": self.delay, "mix": self.mix,
                "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum, "nesterov": self.nesterov,
                "outer_optimizer": type(self.outer_optimizer).__name__ if self.custom_outer else "SGD",
                "compressor": repr(self.compressor), "error_feedback": self.error_feedback,
                "collective": self.collective, "seed": self.seed}

    def layout(self) -> list:
        return [[k, list(_local(p).shape), str(p.dtype)] for k, p in self.params.items()]

    def bind(self) -> DiLoCo:
        """The private group, its worker thread, and the check that every replica configured the
        same run and starts from the same parameters (rule 7). Called at construction when the
        process group exists, else at the first :meth:`step`."""
        if self.closed:
            raise RuntimeError("this DiLoCo was closed")
        if self.queue is None:
            timeout = datetime.timedelta(seconds=self.timeout) if self.timeout else None
            self.queue = OrderedQueue(self.process_group, timeout)
            agree_across_ranks({"method": self.name, "options": self.options(), "layout": self.layout()},
                               self.queue.group, "commlib DiLoCo")
            self._check_same_start()
        return self

    def _check_same_start(self) -> None:
        """Replicas must start from the same parameters (a seeded init on every rank, or a broadcast)."""
        digest = torch.tensor([sum(float(t.double().sum()) for t in self.synced.values())], dtype=torch.float64)
        everyone = self.queue.comm.all_gather(digest)
        if any(not torch.equal(d, everyone[0]) for d in everyone):
            raise ValueError("commlib DiLoCo: the replicas start from different parameters (sums "
                             f"{[float(d) for d in everyone]}); seed the model alike on every rank or broadcast it")

    @property
    def rank(self) -> int:
        return self.bind().queue.rank

    @property
    def world_size(self) -> int:
        return self.bind().queue.world_size

    def close(self) -> None:
        """Merge nothing further, finish the worker and release the private group (idempotent)."""
        if self.queue is not None and not self.closed:
            self.queue.close()
        self.closed = True

    # ------------------------------------------------------------------ the outer loop
    def step(self) -> list[int]:
        """Count one inner step; merge the syncs that are due, then start the ones that are due.
        Returns the fragments whose sync started after this step."""
        self.bind()
        self.inner_steps += 1
        t = self.inner_steps
        for f in sorted(f for f, (due, _) in list(self._in_flight.items()) if due <= t):
            _, fut = self._in_flight.pop(f)
            means, finite = fut.wait()
            self._merge(f, means, finite)
        started = fragments_due(t, self.fragments, self.sync_every)
        for f in started:
            self._start(f)
        return started

    def _start(self, fragment: int) -> None:
        keys = self.fragment_keys[fragment]
        with torch.no_grad():
            deltas = [outer_gradient(self.synced[k], _local(self.params[k])) for k in keys]
        index = self.syncs
        self.syncs += 1
        self.history.append((self.inner_steps, fragment))
        fut = self.queue.submit(lambda comm: self._exchange(comm, keys, deltas, index), raw=True)
        if self.delay == 0:
            means, finite = fut.wait()
            self._merge(fragment, means, finite)
        else:
            self._in_flight[fragment] = (self.inner_steps + self.delay, fut)

    def _merge(self, fragment: int, means: list[torch.Tensor], finite: bool) -> None:
        """Apply the averaged outer gradient with the outer optimizer (if finite) and restart the
        fragment's local parameters from the synced ones (mixed when the sync was late)."""
        keys = self.fragment_keys[fragment]
        with torch.no_grad():
            if finite:
                for k, mean in zip(keys, means):
                    self.synced[k].grad = mean
                self.outer_optimizer.step()
                for k in keys:
                    self.synced[k].grad = None
            else:
                self.skipped_syncs += 1
            alpha = self.mix if self.delay > 0 and finite else 0.0
            for k in keys:
                mix_(_local(self.params[k]).data, self.synced[k], alpha)

    # ------------------------------------------------------------------ the exchange (worker thread)
    def _exchange(self, comm: Comm, keys: list[str], deltas: list[torch.Tensor], index: int):
        """The mean over replicas of each outer gradient (compressed with error feedback where a
        compressor is set), and whether it is finite everywhere."""
        dense = sum(d.numel() * d.element_size() for d in deltas)
        if self.compressor is None:
            flat = torch.cat([d.reshape(-1) for d in deltas])
            allreduce_mean_(comm, flat)
            self._book(dense, dense)
            return [m.clone() for m in split_like(flat, deltas)], bool(torch.isfinite(flat).all())
        c = self.compressor
        seeds = [derive_seed(self.seed, index, stable_hash(k)) for k in keys]
        previous = [self.residuals.get(k) if self.error_feedback else None for k in keys]
        self._book(sum(c.nbytes(d.shape, d.dtype) for d in deltas), dense)
        if self.collective == "two_phase":
            reduction = TwoPhaseEF(comm, deltas, previous, c, [self.server_errors.get(k) for k in keys], seeds)
            if reduction.finite:
                residuals, errors = reduction.commit_residuals(previous, workers=self.error_feedback)
                if self.error_feedback:
                    self.residuals.update(zip(keys, residuals))
                self.server_errors.update(zip(keys, errors))
            means = [torch.empty_like(d) for d in deltas]
            reduction.write_results(means)
            return means, reduction.finite
        payloads = [c.compress_ef(d, e, seed=s) for d, e, s in zip(deltas, previous, seeds)]
        if self.collective == "allreduce":
            summed = sum_summable_payloads(comm, payloads)
            means = [c.decompress(p).view(d.shape).float() for p, d in zip(summed, deltas)]
            finite = all(bool(torch.isfinite(m).all()) for m in means)
        else:
            gathered = allgather_payloads(comm, payloads)
            finite = all(c.payload_finite(p) for rank_payloads in gathered for p in rank_payloads)
            means = []
            for i, d in enumerate(deltas):
                out = torch.zeros(d.shape, dtype=torch.float32, device=d.device)
                if c.touched_indices(payloads[i]) is not None:
                    write_sparse_mean(out, c, [rank_payloads[i] for rank_payloads in gathered], comm.world_size)
                else:
                    for rank_payloads in gathered:  # rank order: the same float sum on every replica
                        c.decompress_add_(out, rank_payloads[i])
                    out.div_(comm.world_size)
                means.append(out)
        if finite and self.error_feedback:
            for k, d, p, e in zip(keys, deltas, payloads, previous):
                target = torch.empty_like(d) if e is None else e
                self.residuals[k] = c.update_residual_(target, d, p, accumulate=e is not None)
        return means, finite

    def _book(self, payload: int, dense: int) -> None:
        self.payload_bytes_total += payload
        self.dense_bytes_total += dense
        self.last_sync_payload_bytes = payload
        self.last_sync_dense_bytes = dense

    # ------------------------------------------------------------------ books
    def memory_bytes(self) -> dict:
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        outer = [v for s in self.outer_optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return {"synced": size(self.synced.values()), "outer_state": size(outer),
                "residuals": size(self.residuals.values()) + size(self.server_errors.values()),
                "parameters": size(_local(p) for p in self.params.values())}

    def stats(self) -> dict:
        """Bytes per sync and per inner step (this replica's payload, by the algorithm's count),
        the compression ratio, syncs and skips, and the extra memory."""
        syncs = max(self.syncs, 1)
        # the common books count per sync: "step" is the inner step, "bytes_*" the last sync's
        return {**byte_books(self.name, self.inner_steps, self.last_sync_payload_bytes, self.last_sync_dense_bytes,
                             self.payload_bytes_total, self.dense_bytes_total, self.skipped_syncs),
                "inner_steps": self.inner_steps, "syncs": self.syncs, "skipped_syncs": self.skipped_syncs,
                "bytes_per_sync": self.payload_bytes_total / syncs,
                "bytes_per_inner_step": self.payload_bytes_total / max(self.inner_steps, 1),
                "memory_bytes": self.memory_bytes()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's state: the replicated part (synced copy, outer optimizer, schedule, syncs in
        flight) and ``rank{r}`` (its residuals). Tensors and primitives only."""
        self.bind()
        pending = {}  # the syncs in flight, waited for (their results are merged later, as without a save)
        for f, (due, fut) in self._in_flight.items():
            means, finite = fut.wait()
            pending[str(f)] = {"due": due, "finite": finite, "means": dict(zip(self.fragment_keys[f], means))}
        replicated = {"synced": dict(self.synced), "outer_optimizer": self.outer_optimizer.state_dict(),
                      "pending": pending}
        mine = {"residuals": dict(self.residuals), "server_errors": dict(self.server_errors)}
        # the tensors a load must bring back: DCP loads in place, into what a fresh state holds
        # (no residuals, no momentum yet), so a missing one is refused rather than lost
        return {"format": FORMAT, "method": self.name, "world_size": self.world_size, "options": self.options(),
                "layout": self.layout(), "inner_steps": self.inner_steps, "syncs": self.syncs,
                "skipped_syncs": self.skipped_syncs, "history": [list(h) for h in self.history], **replicated,
                "tensor_keys": "\n".join(tensor_keys(replicated)),
                "books": {"payload": self.payload_bytes_total, "dense": self.dense_bytes_total,
                          "last": self.last_sync_payload_bytes},
                f"rank{self.rank}": {"rank": self.rank, **mine, "tensor_keys": "\n".join(tensor_keys(mine))}}

    def load_state_dict(self, state: dict, on_mismatch: str = "error") -> None:
        """Load a state saved by :meth:`state_dict` or :func:`commlib.hooks.gather_state_dict`
        (every rank may load the same file: each takes its own ``rank{r}`` part), or through
        ``torch.distributed.checkpoint`` with :class:`commlib.checkpoint.HookStateful`. Refused with
        ``ValueError`` when it is not a DiLoCo state, or was saved with another world size, option
        set or parameter layout, holds no part for this rank, or lacks tensors it saved (DCP into a
        fresh state without the wrapper). There is no reset policy: ``on_mismatch`` must be "error"."""
        if on_mismatch != "error":
            raise ValueError(f"DiLoCo has no reset policy: on_mismatch must be 'error', got {on_mismatch!r}")
        self.bind()
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("method") != self.name:
            raise ValueError("not a commlib DiLoCo state (format/method missing or different)")
        if state["world_size"] != self.world_size:
            raise ValueError(f"this DiLoCo state was saved with world size {state['world_size']}, "
                             f"this run has {self.world_size}")
        if state["options"] != self.options():
            differ = sorted(k for k in set(state["options"]) | set(self.options())
                            if state["options"].get(k) != self.options().get(k))
            raise ValueError(f"this DiLoCo state was saved with other options: {differ}")
        if state["layout"] != self.layout():
            raise ValueError("this DiLoCo state was saved for another model (parameter names, shapes or dtypes differ)")
        mine = state.get(f"rank{self.rank}")
        if mine is None or mine.get("rank") != self.rank:
            held = sorted(k for k in state if k.startswith("rank"))
            raise ValueError(f"this DiLoCo state holds no part for rank {self.rank} (it holds {held}): save it "
                             "with commlib.hooks.gather_state_dict(outer) on every rank, then rank 0 writes it")
        lost = (_missing(state, ("synced", "outer_optimizer", "pending"))
                + _missing(mine, ("residuals", "server_errors")))
        if lost:
            raise ValueError(f"this DiLoCo state lacks {len(lost)} saved tensors (e.g. {lost[0]}): "
                             "torch.distributed.checkpoint loads in place into a fresh state; wrap it in "
                             "commlib.checkpoint.HookStateful(outer)")
        for _, fut in self._in_flight.values():
            fut.wait()  # the worker must be done with this run's residuals before they are replaced
        with torch.no_grad():
            for k in self.keys:
                self.synced[k].copy_(state["synced"][k])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.inner_steps, self.syncs = int(state["inner_steps"]), int(state["syncs"])
        self.skipped_syncs = int(state["skipped_syncs"])
        self.history = [tuple(h) for h in state["history"]]
        self._in_flight = {int(f): (int(p["due"]), _completed(([p["means"][k] for k in self.fragment_keys[int(f)]],
                                                               bool(p["finite"]))))
                           for f, p in state["pending"].items()}
        self.payload_bytes_total = int(state["books"]["payload"])
        self.dense_bytes_total = int(state["books"]["dense"])
        self.last_sync_payload_bytes = int(state["books"]["last"])
        self.residuals = {k: v.clone() for k, v in mine["residuals"].items()}
        self.server_errors = {k: v.clone() for k, v in mine["server_errors"].items()}


def _missing(part: dict, keys) -> list[str]:
    """Tensors ``part["tensor_keys"]`` lists under ``keys`` but ``part`` does not hold."""
    held = set(tensor_keys({k: part[k] for k in keys}))
    return sorted(set(filter(None, part["tensor_keys"].split("\n"))) - held)


def _completed(value) -> torch.futures.Future:
    """A Future that already holds ``value`` (a loaded sync in flight)."""
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut
