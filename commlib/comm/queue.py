"""One ordered issue queue per hook state: every collective a hook issues goes through it.

DDP calls a comm hook once per bucket, in bucket order, identically on every rank. A hook that
needs several collectives per bucket (PowerSGD's P then Q, a two-phase compressed allreduce) must
issue them in the same order on every rank whatever order earlier futures complete in; PyTorch's
own PowerSGD hook chains them with ``Future.then`` and on gloo the second round of one bucket can
cross the first round of the next ("Received data size doesn't match expected size").

Here each bucket becomes a *job*: a function run on a single worker thread, which issues its
collectives through :class:`Comm` and returns the bucket's result. Jobs run one at a time in
submission order, so the sequence of collectives is the same on every rank by construction. The
hook returns at once with a Future completed by the worker, so compression and communication
still overlap with the rest of the backward pass. Collectives run on the state's own process
group (a copy of the user's group made with ``dist.new_group``), so nothing DDP issues itself can
interleave with them. A dead peer surfaces as the process group's timeout error, delivered
through the Future to ``backward()``: never a silent hang.

CUDA streams (the rules, with their reasons, are in the README's "CUDA streams" section): the hook
runs on autograd's device thread with the AccumulateGrad stream current, which is not necessarily
the default stream. :meth:`OrderedQueue.submit` records an event on that producer stream and makes
the Future with ``devices=[device]``; the worker runs the job on its own per-device stream after
waiting on the event, and calls ``set_result`` with that stream still current, so the Future's
completion event lands on the stream that did the work and DDP's consumer stream waits on it.
Nothing on the hook's thread synchronizes the host.
"""

from __future__ import annotations

import datetime
import queue
import threading
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from commlib.comm.groups import private_group


class Comm:
    """Blocking collectives on one process group, for use inside a queue job."""

    def __init__(self, group):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes_sent = 0  # bytes this rank put on the wire, by the algorithm's count

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place SUM allreduce; counts 2 (n-1)/n of the tensor (ring allreduce traffic)."""
        if self.world_size > 1 and tensor.numel():
            _collective(dist.all_reduce, tensor, group=self.group)
        self.bytes_sent += _ring_bytes(tensor, self.world_size) * 2
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), in rank order."""
        tensor = tensor.contiguous()
        if self.world_size == 1:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        if tensor.numel():
            _collective(dist.all_gather, out, tensor, group=self.group)
        else:
            out = [tensor.clone() for _ in range(self.world_size)]
        self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world_size - 1)
        return out

    def all_to_all(self, flat: torch.Tensor) -> torch.Tensor:
        """Equal chunks of ``flat``: chunk j goes to rank j; returns the received chunks, in rank order."""
        flat = flat.contiguous()
        if self.world_size == 1:
            return flat
        out = torch.empty_like(flat)
        if flat.numel():
            _collective(dist.all_to_all_single, out, flat, group=self.group)
        self.bytes_sent += _ring_bytes(flat, self.world_size)
        return out

    def reduce_scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """SUM over ranks of ``rows`` (``(world, chunk)``), scattered: this rank's summed row.
        Counts (n-1)/n of the input (ring reduce-scatter traffic)."""
        rows = rows.contiguous()
        if self.world_size == 1:
            return rows[0].clone()
        out = torch.empty_like(rows[0])
        if rows.numel():
            _collective(_REDUCE_SCATTER, out, rows.view(-1), group=self.group)
        self.bytes_sent += _ring_bytes(rows, self.world_size)
        return out

    def all_gather_into(self, part: torch.Tensor) -> torch.Tensor:
        """Every rank's ``part`` concatenated in rank order, as one tensor (ring all-gather traffic:
        (n-1) parts)."""
        part = part.contiguous()
        if self.world_size == 1:
            return part.clone()
        out = torch.empty(self.world_size * part.numel(), dtype=part.dtype, device=part.device)
        if part.numel():
            _collective(_ALL_GATHER, out, part, group=self.group)
        self.bytes_sent += part.numel() * part.element_size() * (self.world_size - 1)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            _collective(dist.broadcast, tensor, src=dist.get_global_rank(self.group, src), group=self.group)
        if self.rank == src:
            self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world_size - 1)
        return tensor


# torch >= 2.10 names it reduce_scatter_single (reduce_scatter_tensor warns as deprecated there)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PeerFailure(RuntimeError):
    """A collective of a hook failed: a peer died, stopped answering, or the group broke. The
    message says which step, which rank saw it, and which ranks were behind (a heartbeat per step
    in the rendezvous store)."""


def _collective(fn, *args, **kwargs):
    """Run a blocking collective; a failure (gloo raises plain RuntimeErrors) becomes PeerFailure."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise PeerFailure(f"{fn.__name__} failed: {exc}") from exc


def _ring_bytes(tensor: torch.Tensor, world_size: int) -> int:
    return tensor.numel() * tensor.element_size() * (world_size - 1) // max(world_size, 1)


def carrying_errors(fut: torch.futures.Future) -> torch.futures.Future:
    """A Future that completes like ``fut`` but marks a failure as an error in C++: DDP's reducer
    reads a Python ``set_exception`` as a value and reports "Unable to cast <message> to Tensor";
    an exception raised in a ``then`` callback reaches ``backward()`` as itself."""
    return fut.then(lambda done: done.wait())


_queues_made = 0  # every rank binds its states in the same order: equal tags across ranks


class OrderedQueue:
    """A worker thread that runs jobs ``fn(comm) -> result`` one at a time, in submission order."""

    def __init__(self, process_group=None, timeout: datetime.timedelta | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("commlib hooks need an initialized torch.distributed process group")
        base = process_group if process_group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(base)
        # A private copy of the group: only this queue's thread issues collectives on it (named so
        # that another subgroup's copy can never share its rendezvous keys: commlib.comm.groups)
        self.group = private_group(base, timeout)
        # every rank's side of the new mesh is connected before any rank may use or destroy it
        # (a peer closing its group while another still connects: "Connection closed by peer")
        if dist.get_backend(base) == "gloo" and len(ranks) > 1:
            _collective(dist.barrier, group=self.group)
        self.comm = Comm(self.group)
        global _queues_made
        _queues_made += 1
        self.tag = f"commlib/queue{_queues_made}"
        self.ranks = ranks
        try:  # diagnostics only: a heartbeat per step, read when a collective fails
            self._store = dist.distributed_c10d._get_default_store()
        except Exception:
            self._store = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.group_destroyed = False

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank(self) -> int:
        return self.comm.rank

    def submit(self, job: Callable[[Comm], object], raw: bool = False,
               device: torch.device | None = None) -> torch.futures.Future:
        """Queue ``job``; the returned Future holds its result or its exception (``raw``: the
        Python Future itself, for callers that chain it before DDP sees it). ``device``: the
        bucket's device; for CUDA the job is ordered after the current (producer) stream's work."""
        if self._closed:
            raise RuntimeError("this hook state was closed")
        ready = None
        if device is not None and device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))  # the gradients' kernels, as enqueued so far
        fut = future_for(device)
        self._ensure_thread()
        self._jobs.put((job, fut, device if ready is not None else None, ready))
        return fut if raw else carrying_errors(fut)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="commlib-ordered-queue", daemon=True)
                self._thread.start()

    def heartbeat(self, step: int) -> None:
        """Record in the rendezvous store that this rank started ``step`` (one small write per step)."""
        if self._store is not None:
            try:
                self._store.set(f"{self.tag}/started/{self.rank}", str(step))
            except Exception:
                self._store = None

    def diagnose(self, step: int) -> str:
        """Which ranks were behind this one when a collective failed, from their heartbeats."""
        if self._store is None:
            return "no rendezvous store to ask which rank failed"
        try:
            behind = []
            for r in range(self.world_size):
                key = f"{self.tag}/started/{r}"
                last = int(self._store.get(key)) if self._store.check([key]) else -1
                if last < step and r != self.rank:
                    behind.append(f"rank {r} (global rank {self.ranks[r]}) last started step {last}")
            if not behind:
                return "every rank had started this step: the failing peer broke off during it"
            return "; ".join(behind) + ": it crashed, was killed or stopped answering"
        except Exception as exc:  # the store's host (rank 0's process under torchrun) is gone too
            return f"the rendezvous store is unreachable too ({type(exc).__name__}): its host is likely down"

    def close(self, timeout: float = 30.0) -> bool:
        """Finish the queued jobs, stop the thread and destroy the private group (idempotent).

        The group is destroyed only once the worker has stopped: a worker still inside a
        collective after ``timeout`` seconds (a peer that stopped answering; the collective ends
        at the group's own timeout) keeps its group, which is then left to the process's exit,
        with a warning. Returns whether the group was destroyed."""
        with self._lock:
            thread, self._thread = self._thread, None
            closing, self._closed = not self._closed, True
        if thread is not None and thread.is_alive():
            self._jobs.put((None, None, None, None))
            thread.join(timeout)
            if thread.is_alive():
                warnings.warn(f"commlib: the hook's worker thread is still inside a collective after {timeout} s; "
                              "its private process group is not destroyed while in use (it ends with the process)",
                              RuntimeWarning, stacklevel=2)
                return False
        if closing and dist.is_initialized() and not self.group_destroyed:
            dist.destroy_process_group(self.group)
            self.group_destroyed = True
        return self.group_destroyed

    def _work(self) -> None:
        streams: dict[torch.device, torch.cuda.Stream] = {}  # the worker's own stream per device
        while True:
            job, fut, device, ready = self._jobs.get()
            if job is None:  # close()
                return
            try:
                if device is None:
                    _run_and_settle(job, self.comm, fut)
                    continue
                # current device and stream are per thread: set both here, on the worker
                with torch.cuda.device(device):
                    if device not in streams:
                        streams[device] = torch.cuda.Stream(device)
                    with torch.cuda.stream(streams[device]):
                        streams[device].wait_event(ready)
                        # set_result records the Future's event on this thread's current stream: ours
                        _run_and_settle(job, self.comm, fut)
            except BaseException as exc:  # noqa: BLE001 - the worker outlives any failure, every Future settles
                _settle_failed(fut, exc)


def future_for(device: torch.device | None) -> torch.futures.Future:
    """A Future for a result on ``device``: with ``devices=[device]`` on CUDA, so that completing it
    records an event on the completing thread's current stream and DDP's consumer waits on it (a
    Future without devices records none)."""
    if device is not None and device.type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


def _settle_failed(fut: torch.futures.Future, exc: BaseException) -> None:
    """Complete ``fut`` with ``exc`` unless it is already complete (backward() must never wait on
    a Future nobody will settle)."""
    if fut.done():
        return
    try:
        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
    except RuntimeError:  # completed meanwhile
        pass


def _run_and_settle(job, comm: Comm, fut: torch.futures.Future) -> None:
    try:
        result = job(comm)
    except BaseException as exc:  # delivered to the waiting backward()
        fut.set_exception(exc)
    else:
        fut.set_result(result)
