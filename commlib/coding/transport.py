"""Point-to-point message transports for the coded master/worker runtime: gloo and MPI.

A message is ``(kind, meta, payload)``: ``kind`` a small int, ``meta`` a 1-D int64 array, ``payload``
a 1-D float32/float64 array (possibly empty). ``post(dst, ...)`` never blocks the caller;
``poll(timeout)`` returns the next :class:`Message` from any peer, or None when nothing came in
``timeout`` seconds. A peer whose connection breaks shows up once as a message of kind ``FAILED``.

* :class:`GlooTransport` (torch.distributed, gloo): gloo has no probe and a timed-out wait closes the
  pair, so each peer gets a receiving thread (blocking ``recv``) and a sending thread; a crashed peer
  raises "connection closed" in its receiving thread, which is reported as ``FAILED``.
* :class:`MPITransport` (mpi4py): typed ``Isend``/``Recv`` of the header, meta and payload (no
  pickle) and ``Iprobe`` polling; under Open MPI a crashed process ends the whole job (its default
  error handler), so only silent peers are detectable, by the runtime's deadline.

Every header is checked before the sizes it announces are trusted (:func:`check_header`): a
malformed one reports its sender as ``FAILED``, which the runtime treats as a dead worker.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

FAILED = -1
_DTYPES = {0: np.float32, 1: np.float64}
_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
MAX_META = 1 << 20  # header values a message may announce
MAX_PAYLOAD = 1 << 31  # payload values a message may announce


def check_header(header, max_payload: int = MAX_PAYLOAD) -> tuple[int, int, int, int]:
    """``(kind, meta count, payload count, dtype code)`` of a 4-value header, or ValueError: a peer
    that announces a negative or absurd size or an unknown dtype is not followed (its stream can
    no longer be parsed), it is reported as failed."""
    values = [int(v) for v in header]
    if len(values) != 4:
        raise ValueError(f"a header has 4 values, got {len(values)}")
    kind, n_meta, n_payload, code = values
    if kind < 0:
        raise ValueError(f"message kind {kind} is negative")
    if not 0 <= n_meta <= MAX_META:
        raise ValueError(f"header announces {n_meta} meta values (allowed 0..{MAX_META})")
    if not 0 <= n_payload <= max_payload:
        raise ValueError(f"header announces {n_payload} payload values (allowed 0..{max_payload})")
    if code not in _DTYPES:
        raise ValueError(f"header announces payload dtype code {code} (known: {sorted(_DTYPES)})")
    return kind, n_meta, n_payload, code


@dataclass
class Message:
    src: int
    kind: int
    meta: np.ndarray
    payload: np.ndarray
    error: str = ""


def _payload(payload) -> np.ndarray:
    if payload is None:
        return np.zeros(0, dtype=np.float32)
    out = np.ascontiguousarray(payload)
    if out.dtype not in _CODES:
        raise ValueError(f"payload dtype must be float32 or float64, got {out.dtype}")
    return out.reshape(-1)


class GlooTransport:
    """Messages between this rank and ``peers`` over an initialised gloo process group."""

    def __init__(self, peers, group=None):
        import torch.distributed as dist

        self._dist, self._group = dist, group
        self.rank = dist.get_rank(group)
        self.peers = [int(p) for p in peers]
        self._inbox: queue.Queue = queue.Queue()
        self._outboxes = {p: queue.Queue() for p in self.peers}
        self._broken: set[int] = set()
        for p in self.peers:
            threading.Thread(target=self._receive_from, args=(p,), daemon=True).start()
            threading.Thread(target=self._send_to, args=(p,), daemon=True).start()

    def post(self, dst: int, kind: int, meta, payload=None) -> None:
        self._outboxes[dst].put((kind, np.asarray(meta, dtype=np.int64).reshape(-1), _payload(payload)))

    def poll(self, timeout: float | None) -> Message | None:
        try:
            if timeout is not None and timeout <= 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every posted message to a reachable peer has left; False if some did not."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(box.unfinished_tasks == 0 for p, box in self._outboxes.items() if p not in self._broken):
                return True
            time.sleep(0.005)
        return False

    def _send_to(self, peer: int) -> None:
        dist = self._dist
        while True:
            kind, meta, payload = self._outboxes[peer].get()
            header = torch.tensor([kind, meta.size, payload.size, _CODES[payload.dtype]], dtype=torch.int64)
            try:
                dist.send(header, peer, group=self._group)
                if meta.size:
                    dist.send(torch.from_numpy(meta), peer, group=self._group)
                if payload.size:
                    dist.send(torch.from_numpy(payload), peer, group=self._group)
            except RuntimeError:
                self._broken.add(peer)
                return  # the receiving thread reports the broken connection
            finally:
                self._outboxes[peer].task_done()

    def _receive_from(self, peer: int) -> None:
        dist = self._dist
        while True:
            try:
                header = torch.zeros(4, dtype=torch.int64)
                dist.recv(header, peer, group=self._group)
                try:
                    kind, n_meta, n_payload, code = check_header(header.tolist())
                except ValueError as bad:  # the stream cannot be followed past a bad header
                    self._inbox.put(Message(peer, FAILED, np.zeros(0, np.int64), np.zeros(0),
                                            f"malformed message: {bad}"))
                    return
                meta = torch.zeros(n_meta, dtype=torch.int64)
                if n_meta:
                    dist.recv(meta, peer, group=self._group)
                payload = torch.from_numpy(np.zeros(n_payload, dtype=_DTYPES[code]))
                if n_payload:
                    dist.recv(payload, peer, group=self._group)
            except RuntimeError as error:
                self._inbox.put(Message(peer, FAILED, np.zeros(0, np.int64), np.zeros(0), str(error)))
                return
            self._inbox.put(Message(peer, kind, meta.numpy(), payload.numpy()))


class MPITransport:
    """Messages between this rank and ``peers`` of an mpi4py communicator: typed buffers, no pickle.

    A message is three typed sends with their own tags (MPI keeps the order of messages between two
    ranks on one tag): a 4-value int64 header, the int64 meta, the float payload. The receiver
    probes for headers only, checks each (:func:`check_header`) and then receives exactly the
    announced sizes and types; a malformed header reports its sender ``FAILED`` and that sender's
    later messages are dropped. Nothing a peer sends is ever unpickled."""

    TAG = 7301
    META_TAG = 7302
    PAYLOAD_TAG = 7303

    def __init__(self, comm, peers, poll_interval: float = 5e-4):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.peers = [int(p) for p in peers]
        self.poll_interval = poll_interval
        self._pending: list = []
        self._failed: set[int] = set()

    def post(self, dst: int, kind: int, meta, payload=None) -> None:
        from mpi4py import MPI

        meta = np.ascontiguousarray(np.asarray(meta, dtype=np.int64).reshape(-1))
        payload = _payload(payload)
        header = np.asarray([int(kind), meta.size, payload.size, _CODES[payload.dtype]], dtype=np.int64)
        requests = [self.comm.Isend([header, MPI.INT64_T], dest=dst, tag=self.TAG)]
        if meta.size:
            requests.append(self.comm.Isend([meta, MPI.INT64_T], dest=dst, tag=self.META_TAG))
        if payload.size:
            mpi_type = MPI.FLOAT if payload.dtype == np.float32 else MPI.DOUBLE
            requests.append(self.comm.Isend([payload, mpi_type], dest=dst, tag=self.PAYLOAD_TAG))
        for request in requests:  # the buffers live until their send completed
            self._pending.append((request, (header, meta, payload)))

    def poll(self, timeout: float | None) -> Message | None:
        from mpi4py import MPI

        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        status = MPI.Status()
        while True:
            self._pending = [(req, bufs) for req, bufs in self._pending if not req.Test()]
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=status):
                src = status.Get_source()
                message = self._receive(src, status.Get_count(MPI.INT64_T))
                if message is not None:
                    return message
                continue
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(self.poll_interval)

    def _receive(self, src: int, count: int) -> Message | None:
        from mpi4py import MPI

        header = np.zeros(max(count, 0), dtype=np.int64)
        self.comm.Recv([header, MPI.INT64_T], source=src, tag=self.TAG)
        if src in self._failed:
            return None  # already reported: its stream cannot be followed
        try:
            kind, n_meta, n_payload, code = check_header(header)
        except ValueError as bad:
            self._failed.add(src)
            return Message(src, FAILED, np.zeros(0, np.int64), np.zeros(0), f"malformed message: {bad}")
        meta = np.zeros(n_meta, dtype=np.int64)
        if n_meta:
            self.comm.Recv([meta, MPI.INT64_T], source=src, tag=self.META_TAG)
        payload = np.zeros(n_payload, dtype=_DTYPES[code])
        if n_payload:
            self.comm.Recv([payload, MPI.FLOAT if code == 0 else MPI.DOUBLE], source=src, tag=self.PAYLOAD_TAG)
        return Message(src, kind, meta, payload)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every posted message has left; False if some did not."""
        end = time.monotonic() + timeout
        while self._pending and time.monotonic() < end:
            self._pending = [(req, bufs) for req, bufs in self._pending if not req.Test()]
            time.sleep(self.poll_interval)
        return not self._pending
