"""Gradient coding against stragglers: GC codes, the bursty straggler model, SR-SGC and M-SGC schedules.

This package holds the codes, the straggler model and the sequential schedules with a simulator
that does real vector arithmetic. The coded data-parallel runtime (master and workers over mpi4py or
gloo point-to-point), its DDP-hook form and ``benchmarks/bench_sgc.py`` are not built yet.
"""

from commlib.coding.codes import CyclicRepetition, FractionalRepetition, GradientCode, Undecodable
from commlib.coding.sequential import MSGC, SRSGC, GCScheme, Simulation, make_code
from commlib.coding.stragglers import StragglerModel

__all__ = ["MSGC", "SRSGC", "CyclicRepetition", "FractionalRepetition", "GCScheme", "GradientCode", "Simulation",
           "StragglerModel", "Undecodable", "make_code"]
