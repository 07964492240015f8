"""``init_process_group`` for jobs that torchrun may restart.

torchrun's agent hosts one TCPStore for the whole job, and the workers of every rendezvous round
connect to it (``TORCHELASTIC_USE_AGENT_STORE``). Its keys outlive the round: a restarted worker's
gloo rendezvous for the default group, and for every group made with ``dist.new_group`` (commlib's
hook states make one each), can read the dead workers' addresses under the same names and fail
with "Gloo connectFullMesh failed ... Connection refused" (seen here with torch 2.13 and a c10d
rendezvous, timing-dependent for the default group, every time for later groups).
``TORCHELASTIC_RESTART_COUNT`` is no round number to prefix keys with: each node's agent counts
only its own workers' failures.

:func:`init_process_group` gives each round a store of its own: rank 0 starts a fresh TCPStore
and publishes its address (with a nonce) in the agent store; the other ranks connect to the
published address and check the nonce, re-reading the key while it still names a dead round's
store (which refuses connections). Every key of the round then lives in that fresh store.

Trust model: a TCPStore has no authentication: whoever reaches its port can read and write every
key (addresses, and so the membership of the job). The round store therefore listens on one
address only, this host's address on the route to the agent store (``MASTER_ADDR``), the one the
other ranks use, instead of every interface as a TCPStore server does by default; like torchrun's
own store it must live on a network whose hosts are trusted. A malformed published key (a
foreign writer, a torn write) is skipped like a dead round's, and reported at the timeout.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid

import torch.distributed as dist

ROUND_KEY = "commlib/round_store"


def _reachable_address(peer: str, port: int) -> str:
    """This host's address on the route to ``peer`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(peer), port))
        return probe.getsockname()[0]


def parse_round_key(text: str) -> tuple[str, int, str] | None:
    """``(host, port, nonce)`` of a published ``host:port:nonce``, or None if it is malformed."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
        return None
    return parts[0], int(parts[1]), parts[2]


def bound_store(address: str, world: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """A TCPStore server listening on ``address`` alone (a TCPStore given a host still listens on
    every interface; handing it a socket bound to one address does not)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((address, 0))
        listener.listen(max(128, world))
        port = listener.getsockname()[1]
        store = dist.TCPStore(address, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=listener.fileno(), use_libuv=True)
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now
    return store


def round_store(timeout: datetime.timedelta) -> dist.Store:
    """A store whose keys belong to this rendezvous round alone (see the module docstring)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(master, port, world, is_master=False, timeout=timeout)
    if rank == 0:
        address = _reachable_address(master, port)
        fresh = bound_store(address, world, timeout)
        nonce = uuid.uuid4().hex
        fresh.set("commlib/nonce", nonce)
        agent.set(ROUND_KEY, f"{address}:{fresh.port}:{nonce}")
        return fresh
    deadline = time.monotonic() + timeout.total_seconds()
    last = ""
    while time.monotonic() < deadline:
        last = agent.get(ROUND_KEY).decode(errors="replace")
        parsed = parse_round_key(last)
        if parsed is None:  # not a key rank 0 wrote: wait for this round's
            time.sleep(0.2)
            continue
        host, fresh_port, nonce = parsed
        try:
            fresh = dist.TCPStore(host, int(fresh_port), world, is_master=False,
                                  timeout=datetime.timedelta(seconds=2))
            if fresh.get("commlib/nonce").decode() == nonce:
                fresh.set_timeout(timeout)
                return fresh
        except (RuntimeError, dist.DistError):
            pass  # a dead round's store: wait for this round's rank 0 to publish its own
        time.sleep(0.2)
    raise TimeoutError(f"rank {rank}: rank 0 of this rendezvous round published no store within {timeout} "
                       f"(last value of {ROUND_KEY!r}: {last[:80]!r})")


def init_process_group(backend: str = "gloo", timeout: datetime.timedelta | None = None, **kwargs) -> None:
    """``dist.init_process_group`` on a store of this rendezvous round (under torchrun's agent
    store); elsewhere plain ``init_process_group``.

    Example::

        >>> from commlib.launch.elastic import init_process_group   # doctest: +SKIP
        >>> init_process_group("nccl")                             # under torchrun --max-restarts N # doctest: +SKIP
    """
    timeout = timeout or datetime.timedelta(minutes=10)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        return
    dist.init_process_group(backend, store=round_store(timeout), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout, **kwargs)


__all__ = ["init_process_group", "round_store"]
