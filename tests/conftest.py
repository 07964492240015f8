"""Shared test helpers: the gloo world harness ``run_world`` and small fixtures."""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist


class WorkerError(RuntimeError):
    """A rank of a ``run_world`` world raised; the message holds every failing rank's traceback."""


def _worker(fn, rank, world_size, store_path, backend, timeout_s, results, args, kwargs, hard_exit=False):
    os.environ["COMMLIB_TEST_RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        out = fn(rank, world_size, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)  # tensors travel as bytes: no shared-memory handles outliving the worker
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, SystemExit included
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if hard_exit:  # threads may still sit in point-to-point receives: leave without C++ teardown
            results.close()
            results.join_thread()
            os._exit(0)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(fn, world_size: int = 2, *, timeout: float = 120.0, backend: str = "gloo", args=(), kwargs=None,
              may_die=(), hard_exit: bool = False):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on a gloo world of forked processes.

    Returns the per-rank return values (in rank order). A rank that raises makes this raise
    ``WorkerError`` with all tracebacks; a world that does not finish within ``timeout`` seconds
    is killed and ``TimeoutError`` names the ranks that never reported. The process group's own
    timeout is ``timeout`` too, so a collective waiting on a dead peer errors rather than hangs.
    Ranks in ``may_die`` may die, hang or exit without reporting (their result is then None; they
    are killed once the others reported); ``hard_exit`` ends each rank with ``os._exit`` after it
    reported.
    """
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, store, backend, timeout, results, args, kwargs or {}, hard_exit),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        reports: dict[int, tuple[str, object]] = {}
        try:
            while not set(range(world_size)) - set(may_die) <= set(reports):
                left = deadline - time.monotonic()
                if left <= 0 and any(status == "error" for status, _ in reports.values()):
                    break
                if left <= 0:
                    missing = sorted(set(range(world_size)) - set(reports))
                    raise TimeoutError(f"run_world: ranks {missing} did not finish within {timeout} s")
                try:
                    rank, status, payload = results.get(timeout=min(left, 1.0))
                    reports[rank] = (status, payload)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if p.exitcode not in (None, 0) and r not in reports and r not in may_die]
                    if dead:
                        raise WorkerError(f"run_world: ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                if any(status == "error" for status, _ in reports.values()):
                    # do not wait for peers that may now block forever, but give the others a
                    # moment to report errors of their own (a refusal on every rank, say)
                    deadline = min(deadline, time.monotonic() + 3.0)
                    if set(reports) >= set(range(world_size)) - set(may_die) or time.monotonic() >= deadline:
                        break
        finally:
            finished = set(range(world_size)) - set(may_die) <= set(reports)
            for r, p in enumerate(procs):
                p.join(timeout=5 if r in reports and finished else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = {r: payload for r, (status, payload) in reports.items() if status == "error"}
    if errors:
        raise WorkerError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [torch.load(io.BytesIO(reports[r][1]), weights_only=False) if r in reports else None
            for r in range(world_size)]


@pytest.fixture
def world():
    return run_world


def float_dtypes():
    return [torch.float32, torch.bfloat16, torch.float16]
