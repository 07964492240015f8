"""Run a torch.distributed script under ``mpiexec``: MPI ranks become torch.distributed's environment.

    mpiexec --allow-run-as-root --oversubscribe -n 2 python -m commlib.launch.mpi -m workloads.train --hook fp16
    mpiexec -n 4 -H node0:2,node1:2 python -m commlib.launch.mpi train.py --epochs 3

Each process reads its rank, world size and local rank from MPI (via ``mpi4py``; Open MPI's
``OMPI_COMM_WORLD_*`` variables are used when mpi4py is missing), rank 0 picks a free port and
broadcasts its address, and ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` are set before the script runs, exactly as torchrun sets them,
so ``dist.init_process_group("gloo")`` (or NCCL) works unchanged. MPI is used only for this
bootstrap; gradients go through torch.distributed.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def own_address(interface: str | None = None) -> str:
    """This host's address as other nodes reach it: the interface's IPv4 when given, else the hostname's."""
    if interface:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    return socket.gethostbyname(socket.gethostname())


def torch_environment(rank: int, world: int, local_rank: int, local_world: int, master_addr: str,
                      master_port: int) -> dict[str, str]:
    """The variables torchrun would set for this process."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def mpi_environment() -> dict[str, str]:
    """Map this MPI process to torch.distributed's variables (collective over MPI_COMM_WORLD)."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None
    if MPI is not None:
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, local_world = local.Get_rank(), local.Get_size()
        local.Free()
        addr_port = (own_address(interface), free_port()) if rank == 0 else None
        master_addr, master_port = comm.bcast(addr_port, root=0)
    else:
        env = os.environ
        if "OMPI_COMM_WORLD_RANK" not in env:
            raise RuntimeError("not started by mpiexec (no mpi4py and no OMPI_COMM_WORLD_RANK)")
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError("without mpi4py, set MASTER_ADDR and MASTER_PORT (mpiexec -x MASTER_ADDR=...)")
        master_addr, master_port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    return torch_environment(rank, world, local_rank, local_world, master_addr, master_port)


def leave(code: int = 0) -> None:
    """End the process without C++ teardown: flush, finalize MPI if mpi4py started it, ``os._exit``.

    A finished worker could abort at interpreter exit ("terminate called without an active
    exception") while torch's and gloo's background threads were torn down, turning a completed
    run into a failure; finalizing MPI first keeps mpiexec content."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m commlib.launch.mpi (-m module | script.py) [args...]")
    os.environ.update(mpi_environment())
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("-m needs a module name")
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
