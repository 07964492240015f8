"""Point-to-point message transports for the coded master/worker runtime: gloo and MPI.

A message is ``(kind, meta, payload)``: ``kind`` a small int, ``meta`` a 1-D int64 array, ``payload``
a 1-D float32/float64 array (possibly empty). ``post(dst, ...)`` never blocks the caller;
``poll(timeout)`` returns the next :class:`Message` from any peer, or None when nothing came in
``timeout`` seconds. A peer whose connection breaks shows up once as a message of kind ``FAILED``.

* :class:`GlooTransport` (torch.distributed, gloo): gloo has no probe and a timed-out wait closes the
  pair, so each peer gets a receiving thread (blocking ``recv``) and a sending thread; a crashed peer
  raises "connection closed" in its receiving thread, which is reported as ``FAILED``.
* :class:`MPITransport` (mpi4py): ``isend`` of the pickled message and ``iprobe`` polling; under
  Open MPI a crashed process ends the whole job (its default error handler), so only silent peers
  are detectable, by the runtime's deadline.
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
                kind, n_meta, n_payload, code = (int(v) for v in header)
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
    """Messages between this rank and ``peers`` of an mpi4py communicator (pickled, non-blocking)."""

    TAG = 7301

    def __init__(self, comm, peers, poll_interval: float = 5e-4):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.peers = [int(p) for p in peers]
        self.poll_interval = poll_interval
        self._pending: list = []

    def post(self, dst: int, kind: int, meta, payload=None) -> None:
        message = (int(kind), np.asarray(meta, dtype=np.int64).reshape(-1), _payload(payload))
        self._pending.append((self.comm.isend(message, dest=dst, tag=self.TAG), message))

    def poll(self, timeout: float | None) -> Message | None:
        from mpi4py import MPI

        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        status = MPI.Status()
        while True:
            self._pending = [(req, msg) for req, msg in self._pending if not req.Test()]
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=status):
                src = status.Get_source()
                kind, meta, payload = self.comm.recv(source=src, tag=self.TAG)
                return Message(src, kind, meta, payload)
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(self.poll_interval)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every posted message has left; False if some did not."""
        end = time.monotonic() + timeout
        while self._pending and time.monotonic() < end:
            self._pending = [(req, msg) for req, msg in self._pending if not req.Test()]
            time.sleep(self.poll_interval)
        return not self._pending
