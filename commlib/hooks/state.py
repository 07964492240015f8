"""The base of every commlib hook state: step counter, warm-up, per-parameter views, books, checkpoints."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from commlib.comm.patterns import allreduce_mean_, split_like
from commlib.comm.queue import Comm, OrderedQueue
from commlib.compress.base import derive_seed


@dataclass
class ParamView:
    """One parameter's gradient inside a bucket: a view of the bucket buffer and a stable key."""

    key: str
    grad: torch.Tensor  # view into the bucket's flat buffer, shaped like the parameter
    offset: int  # element offset in the bucket buffer


def require_start_iter(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(
            f"start_iter must be an integer >= 2 (DDP rebuilds its buckets after iteration 1), got {value!r}"
        )
    return value


def strip_ddp_prefix(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


class HookState:
    r"""Books shared by all commlib hooks. Subclasses implement :meth:`compressed_job`.

    Arguments:
        process_group: the group to reduce over (default: the world). The state makes a private
            copy of it for its ordered queue (see :mod:`commlib.comm.queue`).
        model: the module DDP wraps (or the DDP module). Parameter names then key every
            per-parameter buffer, which makes states robust to DDP's bucket rebuild and lets a
            checkpoint resume into a fresh DDP instance. Without it, keys are positions in the
            bucket, valid only while the bucket layout stays the same.
        start_iter: compressed steps start at this iteration (>= 2: DDP rebuilds buckets after
            iteration 1). Before it, buckets are averaged densely.
        seed: base of every random choice (mixed with step and parameter; the global RNG is never used).
        timeout: timeout of the private process group (default: the process group default).

    ``state_dict()`` holds tensors and primitives only (``torch.load(weights_only=True)`` reads
    it); ``load_state_dict`` restores it into a state built with the same arguments.
    """

    name = "base"
    stateful = True
    # True: hold a step's buckets and run one compressed_job(None, all views, step, -1) when the
    # last one arrives (for hooks whose job works on the views alone, not on the bucket buffer)
    one_round_per_step = False

    def __init__(self, process_group=None, *, model=None, start_iter: int = 2, seed: int = 0,
                 timeout: float | None = None):
        self.start_iter = require_start_iter(start_iter) if self.stateful else max(0, int(start_iter))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.seed = seed
        self.queue = OrderedQueue(process_group, datetime.timedelta(seconds=timeout) if timeout else None)
        self.world_size = self.queue.world_size
        self.rank = self.queue.rank
        self.step = 0
        self._names: dict[int, str] = {}
        if model is not None:
            self._names = {id(p): strip_ddp_prefix(n) for n, p in model.named_parameters()}
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
        self.per_layer: dict[str, dict] = {}
        self._held_buckets: list = []  # (buffer, views, Future) of the step so far (one_round_per_step)

    # ------------------------------------------------------------------ DDP entry point
    def run(self, bucket: dist.GradBucket) -> torch.futures.Future:
        step = self.step
        is_last = bucket.is_last()
        if is_last:
            self.step += 1
        buffer = bucket.buffer()
        views = self.param_views(bucket)
        if step < self.start_iter:
            job = self._dense_job(buffer, views)
        elif self.one_round_per_step:
            return self._aggregated(buffer, views, step, is_last)
        else:
            job = self.compressed_job(buffer, views, step, bucket.index())
        return self.queue.submit(self._with_books(job, views, step, is_last))

    def _aggregated(self, buffer: torch.Tensor, views: list[ParamView], step: int, is_last: bool):
        """Hold the step's buckets and reduce them all in one job when the last one arrives: one
        set of collectives per step instead of per bucket (for hooks whose payload is tiny, where
        the per-round synchronisation, not the bytes, costs the time). Each bucket's Future
        completes with its own buffer once that job is done; DDP waits for them all anyway."""
        fut: torch.futures.Future = torch.futures.Future()
        self._held_buckets.append((buffer, views, fut))
        if not is_last:
            return fut
        held, self._held_buckets = self._held_buckets, []
        all_views = [v for _, bucket_views, _ in held for v in bucket_views]
        job = self.compressed_job(None, all_views, step, -1)
        done = self.queue.submit(self._with_books(job, all_views, step, True))

        def release(result: torch.futures.Future) -> None:
            try:
                result.wait()
            except BaseException as exc:  # every bucket's backward() sees the failure
                for _, _, pending in held:
                    pending.set_exception(exc)
                return
            for held_buffer, _, pending in held:
                pending.set_result(held_buffer)

        done.add_done_callback(release)
        return fut

    def _with_books(self, job, views: list[ParamView], step: int, is_last: bool):
        def run(comm: Comm):
            start = time.perf_counter()
            self.prepare(comm, step)
            self.observe(views, step)
            result = job(comm)
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

    def prepare(self, comm: Comm, step: int) -> None:
        """Runs on the queue's thread before each bucket's job: the place for collectives that are
        not per bucket (L-GreCo's retune), at the same point of the sequence on every rank."""

    def observe(self, views: list[ParamView], step: int) -> None:
        """Sees each bucket's local gradients (before reduction), warm-up steps included."""

    # ------------------------------------------------------------------ helpers for subclasses
    def param_views(self, bucket: dist.GradBucket) -> list[ParamView]:
        buffer = bucket.buffer()
        views, offset = [], 0
        for position, (param, grad) in enumerate(zip(bucket.parameters(), bucket.gradients())):
            numel = grad.numel()
            view = buffer[offset : offset + numel].view(param.shape)
            key = self._names.get(id(param), f"bucket{bucket.index()}.{position}")
            views.append(ParamView(key, view, offset))
            offset += numel
        return views

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

    def book_layer(self, view: ParamView, payload_bytes: int, compressed: bool = True, **detail) -> None:
        """Count one parameter's bytes for this step and record its ``stats()["per_layer"]`` entry."""
        dense = numel_bytes(view.grad)
        self.count_bytes(payload_bytes, dense)
        self.per_layer[view.key] = {"numel": view.grad.numel(), "compressed": compressed, **detail,
                                    "payload_bytes": payload_bytes, "dense_bytes": dense}

    def count_bytes(self, payload: int, dense: int) -> None:
        self._step_payload += payload
        self._step_dense += dense

    def layer_seed(self, step: int, key: str) -> int:
        """Seed for (step, parameter): equal on every rank, independent of the global RNG."""
        return derive_seed(self.seed, step, _stable_hash(key))

    def mark_skipped(self, step: int) -> None:
        """Record that ``step``'s aggregate was non-finite (state updates were not committed)."""
        if step != self._last_skipped_step:
            self._last_skipped_step = step
            self.skipped_steps += 1

    @staticmethod
    def all_finite(tensor: torch.Tensor) -> bool:
        return bool(torch.isfinite(tensor).all())

    # ------------------------------------------------------------------ reporting and checkpoints
    def stats(self) -> dict:
        payload, dense = self.last_step_payload_bytes, self.last_step_dense_bytes
        return {
            "method": self.name,
            "step": self.step,
            "bytes_sent": payload,
            "bytes_dense": dense,
            "compression_ratio": dense / payload if payload else 1.0,
            "total_bytes_sent": self.total_payload_bytes,
            "total_bytes_dense": self.total_dense_bytes,
            "wire_bytes_total": self.queue.comm.bytes_sent,
            "skipped_steps": self.skipped_steps,
            "hook_seconds": self.last_step_hook_seconds,
            "hook_seconds_total": self.total_hook_seconds,
            "per_layer": {k: dict(v) for k, v in self.per_layer.items()},
        }

    def state_dict(self) -> dict:
        return {
            "method": self.name,
            "step": self.step,
            "seed": self.seed,
            "start_iter": self.start_iter,
            "total_payload_bytes": self.total_payload_bytes,
            "total_dense_bytes": self.total_dense_bytes,
            "skipped_steps": self.skipped_steps,
            "buffers": self.buffers_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"state_dict is for hook {state.get('method')!r}, not {self.name!r}")
        self.step = int(state["step"])
        self.total_payload_bytes = int(state["total_payload_bytes"])
        self.total_dense_bytes = int(state["total_dense_bytes"])
        self.skipped_steps = int(state["skipped_steps"])
        self.load_buffers_state(state["buffers"])

    def buffers_state(self) -> dict:
        return {}

    def load_buffers_state(self, buffers: dict) -> None:
        pass

    def __getstate__(self):
        raise TypeError(
            f"{type(self).__name__} holds a process group and a worker thread; save state.state_dict() instead"
        )


def _stable_hash(key: str) -> int:
    """A process-independent 32-bit hash of a parameter key (Python's hash() is salted)."""
    h = 2166136261
    for byte in key.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def numel_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

