"""Accelerate: a commlib comm hook on the DDP that ``accelerator.prepare`` returns.

``DistributedDataParallelKwargs(comm_hook=...)`` takes only Accelerate's enum of PyTorch's own hooks
and ignores anything else without a message. The supported way is DDP's own
``register_comm_hook`` on the model ``prepare`` returned, before the first backward, which
:func:`register_comm_hook` does (and refuses a model that is not the DDP, on which a hook would
never run). Under ``accelerator.accumulate`` / ``no_sync`` the hook runs on sync steps only, and
commlib's states count hook calls, not optimizer steps.

Launch on CPU with ``accelerate launch --multi_gpu --num_processes 2 script.py`` and
``Accelerator(cpu=True)`` (or ``ACCELERATE_USE_CPU=1``): ``--cpu --num_processes 2`` starts one
process. On GPUs the same script runs with ``Accelerator()``.

Example (``examples/accelerate_train.py`` is the whole script)::

    from accelerate import Accelerator
    from commlib import hooks
    from commlib.integrations.accelerate import register_comm_hook

    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state, hook = hooks.make("ef", compressor="Sign()")
    register_comm_hook(model, state, hook, accelerator=accelerator)
"""

from __future__ import annotations

import torch.distributed as dist

from commlib.integrations import register_comm_hook as _register

__all__ = ["register_comm_hook"]


def register_comm_hook(model, state, hook, accelerator=None) -> bool:
    """Register a commlib hook on the model returned by ``accelerator.prepare``.

    Returns False in a single-process run (no DDP, nothing to communicate), True once registered.
    With ``accelerator`` given, refuses (``ValueError``) a ``DistributedDataParallelKwargs`` that
    asks for a hook of its own: DDP takes one hook per model.
    """
    handler = getattr(accelerator, "ddp_handler", None) if accelerator is not None else None
    requested = getattr(handler, "comm_hook", None)
    if requested is not None and getattr(requested, "value", requested) not in ("no", None):
        raise ValueError(f"DistributedDataParallelKwargs(comm_hook={requested!r}) registers a hook already; "
                         "leave comm_hook unset to use a commlib hook")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    return _register(model, state, hook)
