"""commlib inside the trainers people use: Lightning, Accelerate and the Hugging Face ``Trainer``.

Each trainer builds the ``DistributedDataParallel`` itself, and each has a way to lose a comm hook
without a word (see the README's "Trainers" section). The modules here register the hook on the
DDP the trainer really runs, once, and :func:`rank_report` checks afterwards that the hook ran and
that every rank holds the same parameters:

* :mod:`commlib.integrations.lightning`: :class:`~commlib.integrations.lightning.CommHookCallback`;
* :mod:`commlib.integrations.accelerate`: :func:`register_comm_hook` on the model ``prepare`` returned;
* :mod:`commlib.integrations.hf`: :func:`~commlib.integrations.hf.add_comm_hook` for a ``Trainer``.

Importing this package imports no trainer; each submodule imports only its own.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["register_comm_hook", "registered_state", "mark_registered", "parameter_digest", "rank_report",
           "write_report"]

_ATTR = "_commlib_comm_hook_state"


def registered_state(ddp: nn.Module):
    """The commlib state registered on ``ddp`` through this module, or None."""
    return getattr(ddp, _ATTR, None)


def mark_registered(ddp: nn.Module, state) -> None:
    """Record that ``state`` runs on ``ddp`` (registered by a trainer), so a later call does not register twice."""
    setattr(ddp, _ATTR, state)


def register_comm_hook(ddp: nn.Module, state, hook) -> bool:
    """Register ``hook`` with ``state`` on ``ddp`` unless this state is registered there already.

    Returns True when it registered now and False when ``state`` was already registered on ``ddp``
    (a trainer callback that fires twice). Raises ``TypeError`` when ``ddp`` is not a
    ``DistributedDataParallel`` (a hook registered on the unwrapped model would never run) and
    ``RuntimeError`` when another commlib state is registered there: DDP takes one hook per model.
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"a comm hook needs the DistributedDataParallel that runs the backward, got "
                        f"{type(ddp).__name__}; register on the model the trainer wrapped (see commlib.integrations)")
    current = registered_state(ddp)
    if current is state:
        return False
    if current is not None:
        raise RuntimeError(f"this DDP model already runs the commlib state {type(current).__name__}; "
                           "DDP accepts one comm hook per model")
    ddp.register_comm_hook(state, hook)
    mark_registered(ddp, state)
    return True


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes in ``named_parameters`` order: equal only if bit-identical."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rank_report(module: nn.Module, state=None, group=None) -> dict:
    """Every rank's parameter digest and hook books, gathered on all ranks (a collective).

    ``ranks_agree`` is True when every rank holds bit-identical parameters; ``hook_bytes`` lists each
    rank's ``total_bytes_sent`` (0 means the hook never ran there: the silent failure of trainers
    that drop a hook).
    """
    if isinstance(module, DistributedDataParallel):
        module = module.module
    stats = state.stats() if state is not None else {}
    mine = {"digest": parameter_digest(module), "bytes": int(stats.get("total_bytes_sent", 0)),
            "dense": int(stats.get("total_bytes_dense", 0)), "step": int(stats.get("step", 0))}
    world = dist.get_world_size(group)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    return {
        "world_size": world,
        "method": stats.get("method"),
        "ranks_agree": len({r["digest"] for r in everyone}) == 1,
        "hook_bytes": [r["bytes"] for r in everyone],
        "hook_dense_bytes": [r["dense"] for r in everyone],
        "hook_steps": [r["step"] for r in everyone],
        "digest": mine["digest"],
    }


def write_report(report: dict, path: str | None) -> None:
    """Print ``report`` as one ``REPORT {json}`` line and, with ``path``, write it there (call on one rank)."""
    print("REPORT " + json.dumps(report), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(report, f)
