"""The base of every commlib hook state: step counter, warm-up, per-parameter views, books, checkpoints.

It keeps the rules of ``docs/invariants.md`` (cited as "rule N")."""

from __future__ import annotations

import collections
import datetime
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from commlib.comm.agree import agree_across_ranks
from commlib.comm.patterns import allreduce_mean_, split_like
from commlib.comm.queue import Comm, OrderedQueue, PeerFailure, carrying_errors, future_for
from commlib.comm.rank_state import (
    FORMAT,
    agree_on_load,
    byte_books,
    check_format,
    check_on_mismatch,
    cloned_tensors,
    missing_tensors,
    numel_bytes,
    options_differ,
    pick_rank_state,
    require_initialized,
    settle_load,
    stable_hash,
    tensor_keys,
    tensors_of,
    tree_to,
    without_per_rank,
)
from commlib.comm.topology import Layout, Topology, check_against_environment, node_groups
from commlib.compress.base import derive_seed, tensor_is_finite
from commlib.validation import integer, number, one_of


@dataclass
class ParamView:
    """One parameter's gradient inside a bucket: a view of the bucket buffer and a stable key."""

    key: str
    grad: torch.Tensor  # view into the bucket's flat buffer, shaped like the parameter
    offset: int  # element offset in the bucket buffer


def require_start_iter(value) -> int:
    return integer("start_iter", value, 2, why=" (DDP rebuilds its buckets after iteration 1)")


def strip_ddp_prefix(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


HIERARCHICAL = ("auto", True, False)
def check_hierarchy_options(hierarchical, topology) -> None:
    """Every hook's ``hierarchical=`` (``"auto"``, True or False) and ``topology=`` (a
    :class:`~commlib.comm.Topology` or None), or ``ValueError``."""
    one_of("hierarchical", hierarchical, HIERARCHICAL)
    if topology is not None and not isinstance(topology, Topology):
        raise ValueError(f"topology must be a commlib.comm.Topology, got {topology!r}")


def check_flat_only(name: str, hierarchical, topology) -> None:
    """The common ``hierarchical=``/``topology=`` options of a hook with no two-level form: ``"auto"``
    and ``False`` run flat, ``True`` is refused (``ValueError``) at construction."""
    check_hierarchy_options(hierarchical, topology)
    if hierarchical is True:
        raise ValueError(f"the {name} hook has no two-level (hierarchical) form; hierarchical hooks: "
                         f"{', '.join(HIERARCHICAL_HOOKS)}. Pass hierarchical=False or 'auto' (flat)")


HIERARCHICAL_HOOKS = ("allreduce", "fp16", "bf16", "ef", "ef21", "ef21w", "lowrank", "powersgd", "lgreco")


class HookState:
    r"""Books shared by all commlib hooks. Subclasses implement :meth:`compressed_job`.

    Arguments:
        process_group: the group to reduce over (default: the world). The state makes a private
            copy of it for its ordered queue (see :mod:`commlib.comm.queue`) when it binds.
        model: the module DDP wraps (or the DDP module). Parameter names then key every
            per-parameter buffer. Without it, parameters are keyed by their position in DDP's
            initial (unrebuilt) bucket layout, recorded in the state's first iteration: stable
            across DDP's bucket rebuild and across a fresh DDP built the same way, so a resumed
            run continues bit-identically either way.
        start_iter: compressed steps start at this iteration (>= 2: DDP rebuilds buckets after
            iteration 1). Before it, buckets are averaged densely.
        seed: base of every random choice (mixed with step and parameter; the global RNG is never used).
        timeout: timeout of the private process group (default: the process group default).
        finiteness: where rule 5's "is every rank's result finite?" is decided, for the hooks that
            support a device gate (``ef`` with ``allreduce`` or ``allgather``): ``"host"`` reads it
            (one read per bucket: free on CPU, a stream synchronization on CUDA), ``"device"`` keeps
            it a tensor and selects the residuals with ``torch.where`` (no synchronization; the
            skipped-step count is read when asked for). Default: device for CUDA buckets.

    Binding: the state needs no process group to be built (Lightning builds it before
    ``init_process_group``); it binds its group, queue and thread at the first hook call or at
    :meth:`bind`. An unbound state pickles (spawned workers receive it); a bound one refuses.
    :meth:`close` (or ``with state:``) stops the thread and destroys the private group.

    Checkpoints: ``state_dict()`` holds tensors and primitives only, under the key ``rank{r}`` of
    the rank that saved it, with the world size, method, buffer-shaping options and parameter
    layout. ``load_state_dict`` refuses (``ValueError`` naming the mismatch) a state of another rank,
    world size, method, options or layout, unless ``on_mismatch="reset"``: then the per-rank
    buffers (error-feedback residuals and the like) are dropped and the state restarts with
    ``start_iter`` dense steps, as DeepSpeed resets error feedback on load.
    :func:`gather_state_dict` makes one dict with every rank's state (rank 0 saves it, every rank
    loads it); :class:`commlib.checkpoint.HookStateful` is the form for ``torch.distributed.checkpoint``.
    """

    name = "base"
    stateful = True
    # True: hold a step's buckets and run one compressed_job(None, all views, step, -1) when the
    # last one arrives (for hooks whose job works on the views alone, not on the bucket buffer)
    one_round_per_step = False
    # names in buffers_state() whose tensors belong to one rank (dropped by on_mismatch="reset")
    per_rank_buffers: tuple[str, ...] = ()

    def __init__(self, process_group=None, *, model=None, start_iter: int = 2, seed: int = 0,
                 timeout: float | None = None, finiteness: str | None = None, hierarchical="auto",
                 topology: Topology | None = None):
        self.start_iter = require_start_iter(start_iter) if self.stateful else max(0, int(start_iter))
        integer("seed", seed, 0)
        if timeout is not None:
            number("timeout", timeout, low=0, low_open=True, finite=False, why=" (seconds)")
        one_of("finiteness", finiteness, (None, "host", "device"))  # None: device for CUDA buckets
        check_hierarchy_options(hierarchical, topology)
        self.hierarchical = hierarchical
        self.topology = topology
        self.layout: Layout | None = None  # set at bind when the two-level exchange is on
        self.intra: Comm | None = None  # the node's ranks (dense hops)
        self.rail: Comm | None = None  # this local index on every node (the compressed hop)
        self._piece_layers: dict[str, str] = {}  # piece key -> its parameter's key
        self.seed = seed
        self.process_group = process_group
        self.timeout = timeout
        self.queue: OrderedQueue | None = None
        self.closed = False
        self.model = model
        self.keyed_by = "name" if model is not None else "position"
        self._keys: dict[int, str] = {}  # id(parameter) -> key, filled at bind (names) or first iteration
        self.param_shapes: dict[str, list[int]] = {}  # key -> shape, as DDP reduced it
        self._layout_open = True  # the state's first iteration: positions are still being assigned
        self._expected_shapes: dict[str, list[int]] | None = None  # layout of a loaded checkpoint
        self._pending_load: tuple[dict, str] | None = None  # a load before the process group existed
        self.step = 0
        self.dense_until = 0  # dense warm-up after a reset load
        self.resets = 0
        # books (primitives only)
        self.total_payload_bytes = 0
        self.total_dense_bytes = 0
        self.last_step_payload_bytes = 0
        self.last_step_dense_bytes = 0
        self._step_payload = 0
        self._step_dense = 0
        self._step_seconds = 0.0
        self.last_step_hook_seconds = 0.0  # time the queue thread spent on the last step's buckets
        self.total_hook_seconds = 0.0
        self.skipped_steps = 0  # steps whose aggregated gradient was non-finite
        self._last_skipped_step = -1
        # "host": read rule 5's finiteness decision on the host; "device": keep it a 0-dim tensor and
        # select with torch.where (no host synchronization); None: device for CUDA buckets. Hooks
        # that support device gating consult uses_device_gate(); the others always read on the host.
        self.finiteness = finiteness
        self.per_layer: dict[str, dict] = {}
        self._held_buckets: list = []  # (buffer, views, Future) of the step so far (one_round_per_step)
        self._check_buffer_device = False  # set by a load: move the buffers to the gradients' device
        self._heartbeat_step = -1

    # ------------------------------------------------------------------ binding and lifetime
    @property
    def bound(self) -> bool:
        return self.queue is not None

    @property
    def rank(self) -> int:
        """This process's rank in the state's group (needs an initialized process group)."""
        if self.queue is not None:
            return self.queue.rank
        require_initialized()
        return dist.get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        if self.queue is not None:
            return self.queue.world_size
        require_initialized()
        return dist.get_world_size(self.process_group)

    def bind(self) -> HookState:
        """Create the private process group, the ordered queue and its thread (idempotent). Every
        rank must bind its states in the same order (the first hook call does, in DDP's order)."""
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} was closed; build a new state")
        if self.queue is None:
            require_initialized()
            self.queue = OrderedQueue(self.process_group,
                                      datetime.timedelta(seconds=self.timeout) if self.timeout else None)
            if self.model is not None:
                self._keys = {id(p): strip_ddp_prefix(n) for n, p in self.model.named_parameters()}
            self._resolve_hierarchy()
            agree_across_ranks(self.agreement_fields(), self.queue.group, f"commlib {self.name} hook")
            self.on_bind()
            if self._pending_load is not None:
                state, policy = self._pending_load
                self._pending_load = None
                self._apply_load(state, policy)
        return self

    def _resolve_hierarchy(self) -> None:
        """Decide, at bind, whether buckets take the two-level path (see :meth:`hierarchical_job`):
        ``hierarchical=True`` needs a topology with more than one rank per node and more than one
        node and a hook that has the two-level form (else ``ValueError``); ``"auto"`` takes it
        when all that holds and otherwise stays flat."""
        if self.hierarchical is False:
            return
        explicit = self.hierarchical is True
        topology = self.topology or Topology.detect()
        if topology is None:
            if explicit:
                raise ValueError(f"{self.name} hook: hierarchical=True needs a topology: pass topology="
                                 "commlib.comm.Topology(ranks_per_node=L), or launch with torchrun (LOCAL_WORLD_SIZE)")
            return
        check_against_environment(topology, dist.get_rank())
        try:
            layout = topology.layout(dist.get_process_group_ranks(self.queue.group))
        except ValueError:
            if explicit:
                raise
            return  # uneven nodes: "auto" keeps the flat exchange
        if not layout.hierarchical:
            return  # one rank per node, or one node: the flat exchange is the two-level one
        if not self.supports_hierarchy:
            if explicit:
                raise ValueError(f"the {self.name} hook has no two-level (hierarchical) form yet; hierarchical "
                                 f"hooks: {', '.join(HIERARCHICAL_HOOKS)}. Pass hierarchical=False")
            return
        intra, rail = node_groups(layout, base=self.queue.group,
                                  timeout=datetime.timedelta(seconds=self.timeout) if self.timeout else None)
        self.layout, self.intra, self.rail = layout, Comm(intra), Comm(rail)
        self.topology = topology

    @property
    def is_two_level(self) -> bool:
        """Whether this state's buckets take the hierarchical path (known once bound)."""
        return self.layout is not None

    def agreement_fields(self) -> dict:
        """What every rank must configure alike (rule 7), checked once at :meth:`bind`: method,
        options (compressor configuration and seed included), seed, warm-up, keying and, with
        ``model=``, the parameter layout. A position-keyed layout is compared when loaded states
        are (see :meth:`load_state_dict`)."""
        layout = None
        if self.model is not None:
            layout = [[strip_ddp_prefix(n), list(p.shape), str(p.dtype)] for n, p in self.model.named_parameters()
                      if p.requires_grad]
        return {"method": self.name, "options": self.options(), "seed": self.seed, "start_iter": self.start_iter,
                "keyed_by": self.keyed_by, "layout": layout,
                "topology": self.layout.describe() if self.layout is not None else None}

    def on_bind(self) -> None:
        """Subclasses: checks and buffers that need the world size (runs once, in :meth:`bind`)."""

    def close(self) -> None:
        """Stop the queue's thread and destroy the private process group (idempotent)."""
        if self.queue is not None:
            stopped = self.queue.close()
            for comm in (self.intra, self.rail) if stopped else ():
                if comm is not None and dist.is_initialized():
                    dist.destroy_process_group(comm.group)
            self.queue = None
        self.closed = True

    def __enter__(self) -> HookState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        if self.queue is not None:
            raise TypeError(f"{type(self).__name__} is bound to a process group and a worker thread; "
                            "pickle it before its first use, or save state.state_dict()")
        state = dict(self.__dict__)
        state["_keys"] = {}  # object ids mean nothing in another process
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ DDP entry point
    def run(self, bucket: dist.GradBucket) -> torch.futures.Future:
        try:
            step = self.step
            is_last = bucket.is_last()
            buffer = bucket.buffer()
            views = self.param_views(bucket)  # binds the state at its first call
            if is_last:
                self.step += 1
                self._close_layout()
        except Exception as exc:  # surfaces in backward(), not as a C++ abort inside the reducer
            failed: torch.futures.Future = torch.futures.Future()
            failed.set_exception(exc)
            return failed
        if step < self.start_iter or step < self.dense_until:
            job = self._dense_job(buffer, views)
        elif self.layout is not None:
            job = self.hierarchical_job(buffer, views, step, bucket.index())
        elif self.one_round_per_step:
            return self._aggregated(buffer, views, step, is_last)
        else:
            job = self.compressed_job(buffer, views, step, bucket.index())
        return self.queue.submit(self._with_books(job, views, step, is_last), device=buffer.device)

    def _aggregated(self, buffer: torch.Tensor, views: list[ParamView], step: int, is_last: bool):
        """Hold the step's buckets and reduce them all in one job when the last one arrives: one
        set of collectives per step instead of per bucket (for hooks whose payload is tiny, where
        the per-round synchronisation, not the bytes, costs the time). Each bucket's Future
        completes with its own buffer once that job is done; DDP waits for them all anyway."""
        fut = future_for(buffer.device)
        self._held_buckets.append((buffer, views, fut))
        fut = carrying_errors(fut)
        if not is_last:
            return fut
        held, self._held_buckets = self._held_buckets, []
        all_views = [v for _, bucket_views, _ in held for v in bucket_views]
        job = self.compressed_job(None, all_views, step, -1)
        done = self.queue.submit(self._with_books(job, all_views, step, True), raw=True, device=buffer.device)

        def release(result: torch.futures.Future) -> None:
            try:
                result.wait()
            except BaseException as exc:  # every bucket's backward() sees the failure
                for _, _, pending in held:
                    pending.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                return
            for held_buffer, _, pending in held:
                pending.set_result(held_buffer)

        done.add_done_callback(release)
        return fut

    def _with_books(self, job, views: list[ParamView], step: int, is_last: bool):
        first = step != self._heartbeat_step
        self._heartbeat_step = step

        device = views[0].grad.device if views else None

        def run(comm: Comm):
            start = time.perf_counter()
            if first:
                self.queue.heartbeat(step)
            if self._check_buffer_device and device is not None:
                self.move_buffers_to(device)
            try:
                self.prepare(comm, step)
                self.observe(views, step)
                result = job(comm)
            except PeerFailure as exc:  # a collective failed (not a bug of the job): say what and where
                raise PeerFailure(
                    f"commlib {self.name} hook: a collective failed at step {step} on rank {comm.rank} of "
                    f"{comm.world_size} ({self.queue.diagnose(step)}); timeout "
                    f"{self.timeout if self.timeout else 'of the process group'} s. Cause: {exc}") from exc
            self._step_seconds += time.perf_counter() - start
            if is_last:
                self.last_step_payload_bytes, self.last_step_dense_bytes = self._step_payload, self._step_dense
                self.total_payload_bytes += self._step_payload
                self.total_dense_bytes += self._step_dense
                self._step_payload = self._step_dense = 0
                self.last_step_hook_seconds, self._step_seconds = self._step_seconds, 0.0
                self.total_hook_seconds += self.last_step_hook_seconds
            return result

        return run

    def _dense_job(self, buffer: torch.Tensor, views: list[ParamView]):
        def job(comm: Comm):
            self.count_bytes(buffer.numel() * buffer.element_size(), buffer.numel() * buffer.element_size())
            return allreduce_mean_(comm, buffer)

        return job

    def compressed_job(self, buffer: torch.Tensor, views: list[ParamView], step: int, bucket_index: int):
        """A function ``job(comm) -> buffer`` that reduces the bucket (runs on the queue's thread)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the two-level (hierarchical) path
    supports_hierarchy = False  # states with a hierarchical_job of their own set this

    def hierarchical_job(self, buffer: torch.Tensor, views: list[ParamView], step: int, bucket_index: int):
        """Like :meth:`compressed_job`, through :meth:`two_level` (hooks that support it override)."""
        raise NotImplementedError

    def two_level(self, tensors: list[torch.Tensor], reduce_pieces, owners: list[int] | None = None) -> None:
        """The mean over every rank of each tensor in ``tensors`` (in place), in three hops:

        1. a dense reduce-scatter inside the node: local rank j receives piece j of every tensor
           (each cut into L pieces, the last zero-padded) summed over the node, divided by L; or,
           with ``owners`` (a local rank per tensor), the whole tensors that j owns;
        2. ``reduce_pieces(rail, pieces)`` turns this rank's pieces into their means over the nodes
           (in place), across the rail (the same local index on every node): the compressed hop;
        3. a dense all-gather inside the node puts every piece back.

        Tensors are cut (or owned) one by one, so the pieces (and their error-feedback residuals,
        keyed by :meth:`piece_key` or by the parameter) do not depend on how DDP groups parameters
        into buckets. Rule 5 across the levels: the reduce-scatter carries one more value per rank,
        0 or NaN for whether its tensors were finite, added to every piece; a node that saw inf/NaN
        anywhere poisons all its pieces, so every rail, every rank's result and every
        error-feedback gate see it alike."""
        intra, local_ranks, me = self.intra, self.intra.world_size, self.intra.rank
        like = tensors[0]
        # where each tensor's values go: (row, offset in the row, start, stop in the flat tensor)
        places: list[list[tuple[int, int, int, int]]] = []
        if owners is None:
            sizes = [-(-t.numel() // local_ranks) for t in tensors]
            offset = 0
            for t, size in zip(tensors, sizes):
                places.append([(j, offset, min(j * size, t.numel()), min((j + 1) * size, t.numel()))
                               for j in range(local_ranks)])
                offset += size
            total = offset
        else:
            used = [0] * local_ranks
            for t, owner in zip(tensors, owners):
                places.append([(owner, used[owner], 0, t.numel())])
                used[owner] += t.numel()
            total = max(used)
        rows = torch.zeros(local_ranks, total + 1, dtype=like.dtype, device=like.device)
        for t, spots in zip(tensors, places):
            flat = t.reshape(-1)
            for row, offset, lo, hi in spots:
                rows[row, offset : offset + hi - lo].copy_(flat[lo:hi])
        # 0 where this rank's tensors are finite, NaN otherwise: decided on the device, no host read
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        rows[:, total] = torch.where(finite, 0.0, float("nan")).to(like.dtype)
        summed = intra.reduce_scatter(rows)
        part = summed[:total].div_(local_ranks)
        part.add_(summed[total])  # + 0, or NaN when a rank of this node saw inf/NaN
        mine = [part[offset : offset + hi - lo] for spots in places for row, offset, lo, hi in spots if row == me]
        reduce_pieces(self.rail, mine)
        whole = intra.all_gather_into(part).view(local_ranks, total)
        for t, spots in zip(tensors, places):
            flat = t.view(-1)
            for row, offset, lo, hi in spots:
                flat[lo:hi].copy_(whole[row, offset : offset + hi - lo])

    def dense_pieces(self, rail: Comm, pieces: list[torch.Tensor]) -> None:
        """The dense rail hop of :meth:`two_level`: one all-reduce mean of every piece, booked."""
        flat = torch.cat(pieces)
        self.count_bytes(flat.numel() * flat.element_size(), flat.numel() * flat.element_size())
        allreduce_mean_(rail, flat)
        for piece, mean in zip(pieces, flat.split([p.numel() for p in pieces])):
            piece.copy_(mean)

    def piece_key(self, key: str) -> str:
        """The key of this rank's piece of parameter ``key`` on the two-level path."""
        piece = f"{key}/piece{self.intra.rank}of{self.intra.world_size}"
        self._piece_layers[piece] = key
        return piece

    def layer_of(self, key: str) -> str:
        """The parameter a key names: ``key`` itself, or the parameter of a :meth:`piece_key`."""
        return self._piece_layers.get(key, key)

    def prepare(self, comm: Comm, step: int) -> None:
        """Runs on the queue's thread before each bucket's job: the place for collectives that are
        not per bucket (L-GreCo's retune), at the same point of the sequence on every rank."""

    def observe(self, views: list[ParamView], step: int) -> None:
        """Sees each bucket's local gradients (before reduction), warm-up steps included."""

    # ------------------------------------------------------------------ helpers for subclasses
    def param_views(self, bucket: dist.GradBucket) -> list[ParamView]:
        self.bind()
        buffer = bucket.buffer()
        views, offset = [], 0
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            numel = grad.numel()
            view = buffer[offset : offset + numel].view(param.shape)
            views.append(ParamView(self.param_key(param), view, offset))
            offset += numel
        return views

    def param_key(self, param: torch.Tensor) -> str:
        """The stable key of a parameter DDP reduces: its name (``model=``) or its position in the
        state's first iteration, which runs on DDP's initial bucket layout."""
        key = self._keys.get(id(param))
        if key is None:
            if self.model is not None:
                raise ValueError(f"DDP reduces a parameter of shape {tuple(param.shape)} that is not in the model "
                                 "given as model=: pass the module DDP wraps")
            if not self._layout_open:
                raise RuntimeError(f"DDP reduces a parameter of shape {tuple(param.shape)} this state did not see "
                                   "in its first iteration; register a state on one DDP only, before its first step")
            key = f"param{len(self._keys)}"
            self._keys[id(param)] = key
        if key not in self.param_shapes:
            shape = list(param.shape)
            expected = (self._expected_shapes or {}).get(key)
            if self._expected_shapes is not None and expected != shape:
                raise ValueError(f"loaded {self.name} hook state does not fit this model: parameter {key!r} has shape "
                                 f"{shape}, the checkpoint {'has ' + str(expected) if expected else 'lacks it'}")
            self.param_shapes[key] = shape
        return key

    def _close_layout(self) -> None:
        """End of the first iteration: every parameter has its key; compare with a loaded layout."""
        if not self._layout_open:
            return
        self._layout_open = False
        if self._expected_shapes is not None and set(self._expected_shapes) != set(self.param_shapes):
            missing = sorted(set(self._expected_shapes) - set(self.param_shapes))
            raise ValueError(f"loaded {self.name} hook state does not fit this model: the checkpoint has parameters "
                             f"{missing[:5]} this DDP does not reduce")

    def average_dense(self, comm: Comm, dense: list[ParamView], source: dict | None = None) -> None:
        """Mean over ranks of the parameters that go uncompressed, in one allreduce, written into
        their gradients; ``source`` maps key -> tensor to average instead of the gradient."""
        if not dense:
            return
        grads = [v.grad for v in dense]
        flat = torch.cat([(source[v.key] if source else v.grad).reshape(-1) for v in dense])
        allreduce_mean_(comm, flat)
        for v, mean in zip(dense, split_like(flat, grads)):
            v.grad.copy_(mean)
            self.book_layer(v, numel_bytes(v.grad), compressed=False)

    def book_layer(self, view: ParamView, payload_bytes: int, compressed: bool = True, count: bool = True,
                   **detail) -> None:
        """Count one parameter's bytes for this step (unless ``count=False``: the two-level path
        counts its rail hop itself) and record its ``stats()["per_layer"]`` entry."""
        dense = numel_bytes(view.grad)
        if count:
            self.count_bytes(payload_bytes, dense)
        self.per_layer[view.key] = {"numel": view.grad.numel(), "compressed": compressed, **detail,
                                    "payload_bytes": payload_bytes, "dense_bytes": dense}

    def count_bytes(self, payload: int, dense: int) -> None:
        self._step_payload += payload
        self._step_dense += dense

    def layer_seed(self, step: int, key: str) -> int:
        """Seed for (step, parameter): equal on every rank, independent of the global RNG."""
        return derive_seed(self.seed, step, stable_hash(key))

    def mark_skipped(self, step: int) -> None:
        """Record that ``step``'s aggregate was non-finite (state updates were not committed)."""
        self._resolve_skips()
        if step != self._last_skipped_step:
            self._last_skipped_step = step
            self._skipped_steps += 1

    @property
    def skipped_steps(self) -> int:
        """Steps whose aggregate was non-finite (reads pending device flags: a host synchronization)."""
        self._resolve_skips()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._pending_skips: collections.deque = collections.deque()  # (step, 0-dim bool "finite")
        self._skipped_steps = int(value)

    def _resolve_skips(self) -> None:
        pending = self.__dict__.get("_pending_skips")
        while pending:
            step, ok = pending.popleft()  # thread-safe: the worker appends, any thread resolves
            if not bool(ok) and step != self._last_skipped_step:
                self._last_skipped_step = step
                self._skipped_steps += 1

    def uses_device_gate(self, like: torch.Tensor) -> bool:
        """Whether rule 5's decision stays on the device for buckets like ``like``."""
        mode = self.finiteness or ("device" if like.is_cuda else "host")
        if mode not in ("host", "device"):
            raise ValueError(f"finiteness must be 'host', 'device' or None, got {mode!r}")
        return mode == "device"

    def finite_gate(self, pairs, like: torch.Tensor):
        """Is every ``(compressor, payload)`` in ``pairs`` free of inf and NaN? A Python bool from
        ``payload_finite`` read on the host, or in device mode a 0-dim bool tensor from
        ``payload_finite_flag`` (nothing read back); :meth:`record_finite` books it either way."""
        pairs = list(pairs)
        if not self.uses_device_gate(like):
            return all(c.payload_finite(p) for c, p in pairs)
        flags = [f for f in (c.payload_finite_flag(p) for c, p in pairs) if f is not None]
        return torch.stack(flags).all() if flags else True

    def record_finite(self, step: int, ok) -> None:
        """Book ``step`` as skipped if ``ok`` (a bool, or a device flag resolved later) is false."""
        if isinstance(ok, torch.Tensor):
            self._pending_skips.append((step, ok))
        elif not ok:
            self.mark_skipped(step)

    @staticmethod
    def all_finite(tensor: torch.Tensor) -> bool:
        return tensor_is_finite(tensor)

    # ------------------------------------------------------------------ reporting and checkpoints
    def stats(self) -> dict:
        payload, dense = self.last_step_payload_bytes, self.last_step_dense_bytes
        return {
            **byte_books(self.name, self.step, payload, dense, self.total_payload_bytes, self.total_dense_bytes,
                         self.skipped_steps),
            "wire_bytes_total": self.queue.comm.bytes_sent if self.queue is not None else 0,
            "resets": self.resets,
            "hook_seconds": self.last_step_hook_seconds,
            "hook_seconds_total": self.total_hook_seconds,
            "per_layer": {k: dict(v) for k, v in self.per_layer.items()},
            "hierarchical": None if self.layout is None else {"nodes": self.layout.node_count,
                                                              "ranks_per_node": self.layout.ranks_per_node},
            "wire_bytes_intra_total": self.intra.bytes_sent if self.intra is not None else 0,
            "wire_bytes_inter_total": self.rail.bytes_sent if self.rail is not None else (
                self.queue.comm.bytes_sent if self.queue is not None else 0),
        }

    def options(self) -> dict:
        """The options that shape this state's buffers (primitives); a load with others is refused."""
        return {}

    def state_dict(self) -> dict:
        """This rank's state, under ``rank{r}``, with what a load needs to refuse a wrong one."""
        # a snapshot: hooks update their buffers in place, a held state_dict must not change with them
        buffers = cloned_tensors(self.buffers_state())
        mine = {
            "rank": self.rank,
            "world_size": self.world_size,
            "method": self.name,
            "keyed_by": self.keyed_by,
            "options": self.options(),
            "params": {k: list(v) for k, v in self.param_shapes.items()},
            "step": self.step,
            "dense_until": self.dense_until,
            "seed": self.seed,
            "start_iter": self.start_iter,
            "total_payload_bytes": self.total_payload_bytes,
            "total_dense_bytes": self.total_dense_bytes,
            "skipped_steps": self.skipped_steps,
            "resets": self.resets,
            "tensor_keys": "\n".join(tensor_keys(buffers)),
            "node_layout": self.layout.describe() if self.layout is not None else None,
            "buffers": buffers,
        }
        return {"format": FORMAT, "method": self.name, "world_size": self.world_size, f"rank{self.rank}": mine}

    def load_state_dict(self, state: dict, *, on_mismatch: str = "error") -> None:
        """Load a :meth:`state_dict` (or a :func:`gather_state_dict`). ``on_mismatch``: ``"error"``
        (a state of another rank or world size raises ValueError) or ``"reset"`` (drop the per-rank
        buffers and restart with ``start_iter`` dense steps). Options, method and parameter layout
        must always match. Before the process group exists, the load waits for :meth:`bind`."""
        check_on_mismatch(on_mismatch)
        check_format(state, self.name)
        if self.queue is None and not (dist.is_available() and dist.is_initialized()):
            self._pending_load = (state, on_mismatch)
            return
        self._apply_load(state, on_mismatch)

    def _apply_load(self, state: dict, on_mismatch: str) -> None:
        rank, world = self.rank, self.world_size
        mine, problems = pick_rank_state(state, rank, world, self.name)
        layout_now = self.layout.describe() if self.layout is not None else None
        if mine.get("node_layout") != layout_now:  # the residuals are of slices of another layout
            problems.append(f"saved with the node layout {mine.get('node_layout')}, loading with {layout_now} "
                            "(None: the flat exchange)")
        if not self.per_rank_buffers:
            problems = []  # nothing in this state belongs to one rank
        fatal = self._unfit(mine)
        verdict = agree_on_load(fatal, problems, self.queue.group if self.queue is not None else self.process_group)
        reset = settle_load(f"{self.name} hook", verdict, fatal, problems, on_mismatch,
                            "Its error-feedback buffers (dropped by a reset, which restarts the dense warm-up)")
        self.step = int(mine["step"])
        self.dense_until = int(mine["dense_until"])
        self.total_payload_bytes = int(mine["total_payload_bytes"])
        self.total_dense_bytes = int(mine["total_dense_bytes"])
        self.skipped_steps = int(mine["skipped_steps"])
        self.resets = int(mine["resets"])
        buffers = mine["buffers"]
        if reset:
            buffers = without_per_rank(buffers, self.per_rank_buffers)
            self.dense_until = self.step + self.start_iter
            self.resets += 1
        self.load_buffers_state(cloned_tensors(buffers))  # the state owns what it updates in place
        self._check_buffer_device = True  # map_location="cpu" and a GPU run: moved at the first job
        self._expected_shapes = {k: list(v) for k, v in mine["params"].items()} or None

    def _unfit(self, mine: dict) -> str | None:
        """Why a saved part cannot be loaded here under any policy (None if it can)."""
        if mine["keyed_by"] != self.keyed_by:
            return (f"{self.name} hook state was saved keyed by parameter {mine['keyed_by']}s, this state is keyed by "
                    f"{self.keyed_by}s: build it {'with' if mine['keyed_by'] == 'name' else 'without'} model= as "
                    "the saving run did")
        differ = options_differ(mine["options"], self.options())
        if differ:
            return f"{self.name} hook state was saved with other options: {differ}"
        for field in ("seed", "start_iter"):  # the random choices and the warm-up of a resumed run
            if field in mine and int(mine[field]) != getattr(self, field):
                return (f"{self.name} hook state was saved with {field}={mine[field]}, this state has "
                        f"{field}={getattr(self, field)}: a resumed run would not continue the saved one")
        saved = {k: list(v) for k, v in mine["params"].items()}
        if saved and not self._layout_open and saved != self.param_shapes:  # this state has seen its model
            differ = sorted(k for k in set(saved) | set(self.param_shapes) if saved.get(k) != self.param_shapes.get(k))
            return f"loaded {self.name} hook state does not fit this model (parameters {differ[:5]})"
        missing = missing_tensors(mine)
        if missing:
            return (f"{self.name} hook state lacks {len(missing)} saved tensors (e.g. {missing[0]!r}): "
                    "torch.distributed.checkpoint loads tensors in place, into buffers a fresh state does "
                    "not have yet; checkpoint hook states with commlib.checkpoint.HookStateful(state)")
        return None

    def move_buffers_to(self, device: torch.device) -> None:
        """Put every buffer on ``device`` (the gradients'): a state loaded with
        ``map_location="cpu"`` would otherwise hand host tensors to a CUDA kernel. Runs once, at the
        first job after a load."""
        self._check_buffer_device = False
        buffers = self.buffers_state()
        if any(t.device != torch.device(device) for t in tensors_of(buffers)):
            self.load_buffers_state(tree_to(buffers, device))

    def buffers_state(self) -> dict:
        return {}

    def load_buffers_state(self, buffers: dict) -> None:
        pass
