"""DDP communication hooks: ``state, hook = hooks.make(name, **options)``; ``ddp.register_comm_hook(state, hook)``.

Every hook is the same function, :func:`commlib_hook`, which hands each bucket to its state; the
state (one class per method, one file each) holds the options, the buffers and the books.
"""

import torch
import torch.distributed as dist

from commlib.coding.ddp import GradientCodingState
from commlib.comm.queue import PeerFailure
from commlib.hooks.agvm import AGVMState, param_groups_by_module, propose_groups
from commlib.hooks.allreduce import AllreduceState, CastState
from commlib.hooks.dp_ef import DPErrorFeedbackState
from commlib.hooks.ef import ErrorFeedbackState
from commlib.hooks.ef21 import EF21State, EF21WState
from commlib.hooks.ef21_theory import (
    compressor_alpha,
    ef21_stepsize,
    ef21_stepsize_from_smoothness,
    ef21_theta_beta,
    ef21w_stepsize,
    ef21w_weights,
)
from commlib.hooks.lgreco import LGreCoEFState, LGreCoPowerSGDState, make_lgreco
from commlib.hooks.lowrank import LowRankState
from commlib.hooks.powersgd import PowerSGDState
from commlib.hooks.state import HookState, gather_state_dict


def commlib_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook of every commlib method: ``state.run(bucket)``."""
    return state.run(bucket)


def _fp16(process_group=None, **kw):
    return CastState(process_group, dtype=torch.float16, **kw)


def _bf16(process_group=None, **kw):
    return CastState(process_group, dtype=torch.bfloat16, **kw)


_REGISTRY = {
    "allreduce": AllreduceState,
    "fp16": _fp16,
    "bf16": _bf16,
    "ef": ErrorFeedbackState,
    "ef21": EF21State,
    "ef21w": EF21WState,
    "powersgd": PowerSGDState,
    "lgreco": make_lgreco,
    "agvm": AGVMState,
    "dp_ef": DPErrorFeedbackState,
    "gc": GradientCodingState,
    "lowrank": LowRankState,
}


def register(name: str, factory) -> None:
    """Add a method to :func:`make` (used by the modules of later methods)."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    """The hook names :func:`make` accepts."""
    return list(_REGISTRY)


def make(name: str, process_group=None, **options):
    """Build ``(state, hook)`` for method ``name``; options go to the state's constructor.

    Example::

        >>> from commlib import hooks
        >>> state, hook = hooks.make("powersgd", rank=2, model=model)   # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)                   # doctest: +SKIP
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown hook {name!r}; hooks.names() lists {names()}")
    return _REGISTRY[name](process_group, **options), commlib_hook


__all__ = ["AGVMState", "AllreduceState", "CastState", "DPErrorFeedbackState", "EF21State", "EF21WState", "ErrorFeedbackState", "HookState", "LGreCoEFState", "LGreCoPowerSGDState", "LowRankState", "PeerFailure",
           "PowerSGDState", "commlib_hook",
           "compressor_alpha", "ef21_stepsize", "ef21_stepsize_from_smoothness", "ef21_theta_beta",
           "ef21w_stepsize", "ef21w_weights", "gather_state_dict", "make", "names", "param_groups_by_module", "propose_groups", "register"]
