"""The ordered queue's worker settles every Future and never has its group destroyed under it;
loaded hook buffers follow the gradients' device."""

from __future__ import annotations

import datetime
import io
import time
import warnings

import torch
import torch.distributed as dist

from commlib import compress, hooks
from commlib.comm import queue as queue_module
from commlib.comm.queue import OrderedQueue
from tests.conftest import run_world

from .ddp_harness import gathered_checkpoint


def _worker_survives(rank, world):
    q = OrderedQueue()
    real = queue_module._run_and_settle
    calls = []

    def broken_once(job, comm, fut):  # a failure outside the job's own wrapper
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("outside the job wrapper")
        return real(job, comm, fut)

    queue_module._run_and_settle = broken_once
    try:
        first = q.submit(lambda comm: torch.ones(1), raw=True)
        second = q.submit(lambda comm: comm.all_reduce(torch.ones(1)), raw=True)
        errors = []
        try:
            first.wait()
        except RuntimeError as exc:
            errors.append(str(exc))
        value = float(second.wait()[0])
    finally:
        queue_module._run_and_settle = real
    q.close()
    return errors, value


def test_an_exception_outside_the_job_settles_its_future_and_the_worker_goes_on():
    for errors, value in run_world(_worker_survives, 2):
        assert len(errors) == 1 and "outside the job wrapper" in errors[0]
        assert value == 2.0  # the next job ran, collectives included


def _close_during_collective(rank, world):
    q = OrderedQueue(timeout=datetime.timedelta(seconds=4))
    if rank == 1:  # never joins the collective: rank 0's worker sits in it until the group's timeout
        time.sleep(6)
        q.close()
        return None
    fut = q.submit(lambda comm: comm.all_reduce(torch.ones(1)), raw=True)
    time.sleep(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        destroyed = q.close(timeout=0.5)
    failed = False
    try:
        fut.wait()
    except Exception:
        failed = True  # the collective ended at the group's timeout, with an error
    return destroyed, q.group_destroyed, [str(w.message) for w in caught], failed


def test_close_never_destroys_a_group_the_worker_is_using():
    destroyed, flag, messages, failed = run_world(_close_during_collective, 2, timeout=60)[0]
    assert destroyed is False and flag is False
    assert any("still inside a collective" in m for m in messages)
    assert failed


def _loaded_to_another_device(rank, world):
    model, blob = gathered_checkpoint(rank, "powersgd", 4, rank=2)
    loaded, _ = hooks.make("powersgd", model=model, rank=2)
    loaded.bind()
    loaded.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    assert loaded._check_buffer_device  # the first job will move them
    loaded.move_buffers_to(torch.device("meta"))  # stands in for the GPU of a real run
    devices = {t.device.type for t in hooks_tensors(loaded.buffers_state())}
    counts = len(list(hooks_tensors(loaded.buffers_state())))
    loaded.close()
    dist.barrier()
    return devices, counts, loaded._check_buffer_device


def hooks_tensors(tree):
    from commlib.comm.rank_state import tensors_of

    return tensors_of(tree)


def test_buffers_loaded_with_map_location_cpu_move_to_the_gradients_device():
    for devices, count, pending in run_world(_loaded_to_another_device, 2):
        assert count > 0 and devices == {"meta"} and pending is False


def test_ef_state_moves_buffers_at_its_first_job_after_a_load():
    """On one device the move is a no-op and training after a load is unchanged."""
    from tests.hooks.ddp_harness import train

    options = {"compressor": compress.TopK(0.1)}
    full = run_world(train, 2, kwargs=dict(hook="ef", options=options, steps=8, save_at=4))
    resumed = run_world(train, 2, kwargs=dict(hook="ef", options=options, steps=4, start_step=4,
                                                checkpoint=[r["checkpoint"] for r in full]))
    assert torch.equal(full[0]["params"], resumed[0]["params"])
