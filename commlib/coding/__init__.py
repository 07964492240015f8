"""Gradient coding against stragglers: GC codes, the bursty straggler model, SR-SGC and M-SGC schedules.

This package holds the codes, the straggler model and the sequential schedules with a simulator
that does real vector arithmetic, and the DDP-hook form (:mod:`.ddp`, hook name ``gc``: decoding
coefficients applied before the SUM all-reduce; erasures only, no wall-clock saving). The coded
master/worker runtime (mpi4py or gloo point-to-point, deadlines) and ``benchmarks/bench_sgc.py`` are
not built yet.
"""

from commlib.coding.codes import CyclicRepetition, FractionalRepetition, GradientCode, Undecodable
from commlib.coding.ddp import GradientCodingState, coded_loss
from commlib.coding.sequential import MSGC, SRSGC, GCScheme, Simulation, make_code
from commlib.coding.stragglers import StragglerModel

__all__ = ["MSGC", "SRSGC", "CyclicRepetition", "FractionalRepetition", "GCScheme", "GradientCode",
           "GradientCodingState", "Simulation", "coded_loss",
           "StragglerModel", "Undecodable", "make_code"]
