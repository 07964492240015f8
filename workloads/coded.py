"""Coded data-parallel training on the digits (``python -m workloads.coded``): rank 0 is the
master, ranks 1..n the workers of :mod:`commlib.coding.runtime`. Launch with torchrun (gloo) or
mpiexec (``--transport mpi``); ``benchmarks/bench_sgc.py`` sweeps it.

Rank 0 prints ``RESULT {json}``: the run's summary, the measured and the formula load, the round
times, the stragglers and the SHA-256 of the trained parameters.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys

import torch
from torch import nn

from commlib.coding.runtime import DelayProfile, Master, Problem, StragglerFailure, Worker, make_scheme, transport_for
from commlib.coding.stragglers import StragglerModel
from commlib.coding.transport import MPITransport
from workloads.data import digits_split


def digits_problem(*, hidden: int = 32, models: int = 1, batch: int = 64, lr: float = 0.05, momentum: float = 0.9,
                   seed: int = 0) -> Problem:
    """An MLP (64 -> hidden -> 10) on scikit-learn's 8x8 digits (1,797 images shipped with the
    package); the last 20% of a fixed shuffle is held out."""
    x, y, x_held, y_held = digits_split(0.2)

    def build():
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    return Problem(build, x, y, batch, models=models, lr=lr, momentum=momentum, seed=seed, held_out=(x_held, y_held))


def parameters_digest(parameters) -> str:
    """SHA-256 of the flat parameter vectors' bytes: equal only if bit-identical."""
    digest = hashlib.sha256()
    for flat in parameters:
        digest.update(flat.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _parser():
    p = argparse.ArgumentParser(prog="python -m workloads.coded",
                                description="Coded data-parallel training: rank 0 is the master, ranks 1..n "
                                            "the workers. Launch with torchrun (gloo) or mpiexec (--transport mpi).")
    p.add_argument("--scheme", default="msgc", choices=["uncoded", "gc", "srsgc", "msgc"])
    p.add_argument("--tolerance", type=int, default=1, help="stragglers s tolerated by --scheme gc")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--W", type=int, default=2)
    p.add_argument("--lam", type=int, default=1)
    p.add_argument("--code", default="auto", choices=["auto", "frc", "cyclic"])
    p.add_argument("--jobs", type=int, default=30)
    p.add_argument("--batch", type=int, default=0, help="samples per job (default: 2 x the scheme's unit)")
    p.add_argument("--models", type=int, default=0, help="concurrent models (default: T + 1)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--mu", type=float, default=0.2, help="straggler deadline factor; < 0: wait for all")
    p.add_argument("--dead-after", type=float, default=30.0)
    p.add_argument("--job-seconds", type=float, default=0.0, help="injected seconds per full job of work")
    p.add_argument("--jitter", type=float, default=0.1)
    p.add_argument("--slowdown", type=float, default=5.0)
    p.add_argument("--burst-probability", type=float, default=0.0,
                   help="bursts sampled from StragglerModel(B, W, lam) (--burst-B/W/lam override)")
    p.add_argument("--burst-B", type=int, default=0)
    p.add_argument("--burst-W", type=int, default=0)
    p.add_argument("--burst-lam", type=int, default=-1)
    p.add_argument("--burst-rounds", type=int, default=0, help="rounds of the burst pattern (default: jobs + T)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transport", default="gloo", choices=["gloo", "mpi"])
    return p


def main(argv=None) -> None:
    """The CLI; ends the process (exit status 3 when the run stopped with a StragglerFailure)."""
    args = _parser().parse_args(argv)
    if args.transport == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
    else:
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=2))
    n = world - 1
    scheme = make_scheme(args.scheme, n, s=args.tolerance, B=args.B, W=args.W, lam=args.lam, code=args.code)
    batch = args.batch or 2 * scheme.batch_unit
    problem = digits_problem(hidden=args.hidden, models=args.models or scheme.T + 1, batch=batch, seed=args.seed)
    if args.transport == "mpi":
        transport = MPITransport(comm, range(1, n + 1) if rank == 0 else [0])
    else:
        transport = transport_for(rank, n)
    torch.set_num_threads(1)
    code = 0
    if rank == 0:
        master = Master(transport, scheme, problem, args.jobs, mu=None if args.mu < 0 else args.mu,
                        dead_after=args.dead_after, log=lambda text: print(text, file=sys.stderr, flush=True))
        try:
            result = master.run()
        except StragglerFailure as failure:
            result, code = failure.result, 3
        summary = result.summary()
        steady = result.work[scheme.T + 1: args.jobs] if args.jobs > scheme.T + 1 else result.work
        summary.update(scheme=args.scheme, n=n, T=scheme.T, batch=batch, models=problem.models,
                       formula_load=scheme.normalized_load, measured_load=float(steady.mean()),
                       measured_load_max=float(steady.max()), round_seconds=result.round_seconds,
                       stragglers=result.stragglers, digest=parameters_digest(result.parameters))
        print("RESULT " + json.dumps(summary), flush=True)
    else:
        bursts = None
        if args.burst_probability > 0:
            model = StragglerModel(args.burst_B or args.B, args.burst_W or args.W,
                                   args.burst_lam if args.burst_lam >= 0 else args.lam)
            bursts = model.sample(n, args.burst_rounds or args.jobs + scheme.T, generator=args.seed,
                                  start_probability=args.burst_probability)
        delays = DelayProfile(args.job_seconds, jitter=args.jitter, slowdown=args.slowdown, bursts=bursts,
                              seed=args.seed) if args.job_seconds > 0 else None
        Worker(transport, scheme, problem, rank - 1, delays=delays).run()
    from commlib.launch.mpi import leave

    leave(code)  # receiving threads may still sit in gloo recv: leave without C++ teardown


if __name__ == "__main__":
    main()
