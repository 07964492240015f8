"""Gradient coding against stragglers: GC codes, the bursty straggler model, SR-SGC and M-SGC schedules.

This package holds the codes, the straggler model, the GC / SR-SGC / M-SGC schedules (one
:class:`Schedule` drives both the simulator, which does real vector arithmetic, and the runtime), the
coded master/worker runtime (:mod:`.runtime`: real gradients, deadlines, late results dropped, dead
workers detected; over gloo or mpi4py point-to-point, :mod:`.transport`), and the loss side of the
DDP-hook form (:func:`coded_loss`; the hook itself, name ``gc``, is
:class:`commlib.hooks.gc.GradientCodingState`: decoding coefficients applied before the SUM
all-reduce; erasures only, no wall-clock saving).
"""

from commlib.coding.codes import CyclicRepetition, FractionalRepetition, GradientCode, Undecodable
from commlib.coding.ddp import coded_loss
from commlib.coding.sequential import MSGC, SRSGC, GCScheme, Schedule, Simulation, Task, make_code
from commlib.coding.stragglers import StragglerModel

__all__ = ["MSGC", "SRSGC", "CyclicRepetition", "FractionalRepetition", "GCScheme", "GradientCode",
           "Schedule", "Simulation", "Task", "coded_loss",
           "StragglerModel", "Undecodable", "make_code"]
