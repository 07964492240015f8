"""DDP communication hooks: ``state, hook = hooks.make(name, **options)``; ``ddp.register_comm_hook(state, hook)``.

Every hook is the same function, :func:`commlib_hook`, which hands each bucket to its state; the
state (one class per method, one file each) holds the options, the buffers and the books. Each
method's module registers its name (:mod:`commlib.hooks.registry`); the imports below, in this
order, make :func:`names`.
"""

# registration order is the order of hooks.names()
# isort: off
from commlib.hooks.allreduce import AllreduceState, CastState
from commlib.hooks.ef import ErrorFeedbackState
from commlib.hooks.ef21 import EF21State, EF21WState
from commlib.hooks.powersgd import PowerSGDState
from commlib.hooks.lgreco import LGreCoEFState, LGreCoPowerSGDState, make_lgreco
from commlib.hooks.agvm import AGVMState, param_groups_by_module, propose_groups
from commlib.hooks.dp_ef import DPErrorFeedbackState
from commlib.hooks.gc import GradientCodingState
from commlib.hooks.lowrank import LowRankState
# isort: on
from commlib.comm.queue import PeerFailure
from commlib.comm.rank_state import gather_state_dict
from commlib.hooks.ef21_theory import (
    compressor_alpha,
    ef21_stepsize,
    ef21_stepsize_from_smoothness,
    ef21_theta_beta,
    ef21w_stepsize,
    ef21w_weights,
)
from commlib.hooks.registry import commlib_hook, make, names, register
from commlib.hooks.state import HookState

__all__ = ["AGVMState", "AllreduceState", "CastState", "DPErrorFeedbackState", "EF21State", "EF21WState",
           "ErrorFeedbackState", "GradientCodingState", "HookState", "LGreCoEFState", "LGreCoPowerSGDState",
           "LowRankState", "PeerFailure", "PowerSGDState", "commlib_hook", "compressor_alpha", "ef21_stepsize",
           "ef21_stepsize_from_smoothness", "ef21_theta_beta", "ef21w_stepsize", "ef21w_weights",
           "gather_state_dict", "make", "make_lgreco", "names", "param_groups_by_module", "propose_groups",
           "register"]
