"""The gloo world harness itself: results, worker tracebacks, timeouts."""

import time

import pytest
import torch
import torch.distributed as dist
from conftest import WorkerError, run_world


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item(), dist.get_world_size()


@pytest.mark.parametrize("world_size", [2, 3])
def test_results_in_rank_order(world_size):
    total = world_size * (world_size + 1) / 2
    assert run_world(_allreduce_rank, world_size) == [(total, world_size)] * world_size


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait forever for rank 1: the harness must not
    return rank


def test_worker_traceback_is_raised():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="boom on rank one"):
        run_world(_fail_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


def _hang(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    return rank


def test_hang_becomes_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\]"):
        run_world(_hang, 2, timeout=4)
    assert time.monotonic() - start < 20
