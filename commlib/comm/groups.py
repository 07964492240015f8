"""Private process groups that two subgroups can never confuse (rule 8).

``dist.new_group(ranks)`` names a group after a per-process counter, and its rendezvous keys live
under that name in the default store. When only the members of a subgroup call it (a hook state
binding on DDP's data-parallel group ``[0, 1]`` while ``[2, 3]`` binds its own), the two subgroups
count alike and get the same name: their gloo rendezvous read each other's addresses ("Timed out
waiting ... for recv", "Connection reset by peer"), intermittently. ``use_local_synchronization``
hashes the ranks instead, but mixes in the number of groups the process holds, which the members
need not agree on, and repeats a name once a group is destroyed.

:func:`private_group` names each group after (its member ranks, how many private groups this
process made for that exact rank set so far): distinct for distinct rank sets, never repeated in a
process, and equal on every member without any communication, provided the members create their
private groups for a rank set in the same order (they bind their states in DDP's order). The
name goes through ``dist.new_group``'s own counter (set for the call, restored after): the one
private touch point, checked against the torch version it was written for.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import threading

import torch
import torch.distributed as dist

_made: collections.Counter = collections.Counter()  # (backend, ranks) -> private groups made in this process
_lock = threading.Lock()
NAME_BASE = 1 << 40  # far above any counter torch reaches by itself


def group_number(ranks: list[int], sequence: int) -> int:
    """The (integer) name of the ``sequence``-th private group over ``ranks``: a 40-bit digest of
    the rank set above :data:`NAME_BASE`, times 2^20 sequence slots."""
    digest = int.from_bytes(hashlib.sha256(",".join(map(str, sorted(ranks))).encode()).digest()[:5], "little")
    return NAME_BASE + (digest << 20) + sequence


def _world():
    from torch.distributed import distributed_c10d

    world = getattr(distributed_c10d, "_world", None)
    if world is None or not hasattr(world, "group_count"):
        raise RuntimeError(f"commlib.comm.groups: torch {torch.__version__} names process groups differently "
                           "from the torch 2.x this was written for (distributed_c10d._world.group_count)")
    return world


def private_group(base=None, timeout: datetime.timedelta | None = None, ranks: list[int] | None = None):
    """A new process group over ``ranks`` (default: the ranks of ``base``, itself default the
    world), with ``base``'s backend, safe to create from the members alone. Non-members get
    ``GroupMember.NON_GROUP_MEMBER`` (as from ``dist.new_group``); they need not call it."""
    base = base if base is not None else dist.group.WORLD
    ranks = sorted(dist.get_process_group_ranks(base) if ranks is None else ranks)
    backend = dist.get_backend(base)
    kwargs = {"timeout": timeout} if timeout is not None else {}
    if len(ranks) == dist.get_world_size():  # every rank creates it: torch's own counter agrees
        return dist.new_group(ranks=ranks, backend=backend, **kwargs)
    with _lock:
        key = (backend, tuple(ranks))
        sequence = _made[key]
        _made[key] += 1
        world = _world()
        saved = world.group_count
        world.group_count = group_number(ranks, sequence)
        try:
            return dist.new_group(ranks=ranks, backend=backend, **kwargs)
        finally:
            world.group_count = saved
