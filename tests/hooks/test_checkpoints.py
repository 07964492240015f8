"""Checkpoints that cannot be loaded wrong: resume without model=, per-rank state, world-size changes,
DCP, zero-gradient layers, dead peers, and states that bind late and close cleanly."""

import io
import os
import tempfile
import threading
import time

import pytest
import torch
import torch.distributed as dist
from conftest import WorkerError, run_world

from commlib import hooks
from commlib.checkpoint import HookStateful

from .ddp_harness import Net, batch, build, train

SMALL_BUCKETS = {"bucket_cap_mb": 0.004}  # several buckets, rebuilt after iteration 1

STATEFUL = [
    ("ef", {"compressor": ("TopK", {"density": 0.1})}),
    ("ef21", {"compressor": ("TopK", {"density": 0.1})}),
    ("powersgd", {"rank": 2}),
    ("lgreco", {"family": "powersgd", "rank": 2, "retune_every": 4, "accumulate_steps": 2}),
]
IDS = [h for h, _ in STATEFUL]
SAVE_AT, STEPS = 6, 10


def _first_run(hook, options, world=2, **kw):
    """One uninterrupted run of STEPS steps that also saves at SAVE_AT: (final params, checkpoints)."""
    out = run_world(train, world, kwargs=dict(hook=hook, options=options, steps=STEPS, save_at=SAVE_AT,
                                              ddp_kwargs=SMALL_BUCKETS, **kw))
    return out[0]["params"], [r["checkpoint"] for r in out], out


def _resume(hook, options, checkpoints, world=2, **kw):
    return run_world(train, world, kwargs=dict(hook=hook, options=options, steps=STEPS - SAVE_AT,
                                               start_step=SAVE_AT, checkpoint=checkpoints,
                                               ddp_kwargs=SMALL_BUCKETS, **kw))


# ------------------------------------------------------------------------------------------------ failure 1
@pytest.mark.parametrize("hook,options", STATEFUL, ids=IDS)
def test_resume_without_model_is_bit_identical(hook, options):
    """Keys are positions in DDP's initial bucket layout, so a fresh DDP finds its buffers again
    (before: ef/ef21 continued with other parameters, powersgd/lgreco crashed on a size mismatch)."""
    full, checkpoints, _ = _first_run(hook, options, with_model=False)
    resumed = _resume(hook, options, checkpoints, with_model=False)
    for r in resumed:
        assert torch.equal(r["params"], full)


def test_a_state_saved_with_names_is_refused_without_model():
    _, checkpoints, _ = _first_run("ef", STATEFUL[0][1])
    with pytest.raises(WorkerError, match="keyed by parameter names.*build it with model="):
        _resume("ef", STATEFUL[0][1], checkpoints, with_model=False)


# ------------------------------------------------------------------------------------------------ failure 2
@pytest.mark.parametrize("hook,options", STATEFUL, ids=IDS)
def test_rank0_file_loaded_on_every_rank_is_refused(hook, options):
    """The DDP habit (rank 0 saves one file, every rank loads it) hands rank 0's residuals to rank 1."""
    _, checkpoints, _ = _first_run(hook, options)
    with pytest.raises(WorkerError, match="state of rank 0 loaded on rank 1") as err:
        _resume(hook, options, [checkpoints[0]] * 2)
    assert "another rank's state does not fit" in str(err.value)  # rank 0 refuses too: no one waits


@pytest.mark.parametrize("hook,options", STATEFUL[:3], ids=IDS[:3])
def test_rank0_file_of_a_gathered_state_resumes_bit_identically(hook, options):
    full, checkpoints, _ = _first_run(hook, options, gather=True)
    resumed = _resume(hook, options, [checkpoints[0]] * 2)
    for r in resumed:
        assert torch.equal(r["params"], full)


def test_reset_policy_drops_per_rank_buffers_and_warms_up_densely():
    hook, options = STATEFUL[2]
    _, checkpoints, _ = _first_run(hook, options)
    resumed = _resume(hook, options, [checkpoints[0]] * 2, on_mismatch="reset")
    assert torch.equal(resumed[0]["params"], resumed[1]["params"])
    for r in resumed:
        stats = r["stats"]
        assert stats["resets"] == 1 and stats["step"] == STEPS
        # start_iter = 2 dense steps after the load, then compressed ones again
        assert stats["compression_ratio"] > 1.0


# ------------------------------------------------------------------------------------------------ failure 3
@pytest.mark.parametrize("hook,options", [STATEFUL[0], STATEFUL[2]], ids=["ef", "powersgd"])
def test_a_world_of_2_state_in_a_world_of_3_is_refused_or_reset(hook, options):
    _, checkpoints, _ = _first_run(hook, options, gather=True)
    with pytest.raises(WorkerError, match="saved in a world of 2, loading in a world of 3"):
        _resume(hook, options, [checkpoints[0]] * 3, world=3)
    resumed = _resume(hook, options, [checkpoints[0]] * 3, world=3, on_mismatch="reset")
    assert all(torch.equal(resumed[0]["params"], r["params"]) for r in resumed)
    assert all(r["stats"]["resets"] == 1 for r in resumed)


def _mismatched_options(rank, world_size, checkpoint):
    model = Net()
    state, _ = hooks.make("powersgd", rank=3, model=model)
    state.load_state_dict(torch.load(io.BytesIO(checkpoint), weights_only=True))


def test_other_options_are_refused_under_any_policy():
    _, checkpoints, _ = _first_run(*STATEFUL[2])
    with pytest.raises(WorkerError, match=r"saved with other options: rank=2 \(now 3\)"):
        run_world(_mismatched_options, 2, args=(checkpoints[0]["hook"],))


# ------------------------------------------------------------------------------------------------ DCP
def _dcp_run(rank, world_size, hook, options, path, phase, steps, on_mismatch="error", direct=False):
    import torch.distributed.checkpoint as dcp

    model, ddp, state = build(hook, options, SMALL_BUCKETS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    if phase == "resume":
        holder = {"model": model.state_dict(), "hook": state if direct else HookStateful(state, on_mismatch)}
        from torch.distributed.checkpoint import DefaultLoadPlanner

        dcp.load(holder, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=on_mismatch == "reset"))
        model.load_state_dict(holder["model"])
        start = state.step
    for step in range(start, start + steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    if phase == "save":
        dcp.save({"model": model.state_dict(), "hook": state if direct else HookStateful(state)}, checkpoint_id=path)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("hook,options", [STATEFUL[0], STATEFUL[2]], ids=["ef", "powersgd"])
def test_dcp_save_and_resume_in_fresh_processes_is_bit_identical(hook, options):
    full, _, _ = _first_run(hook, options)
    with tempfile.TemporaryDirectory() as path:
        run_world(_dcp_run, 2, args=(hook, options, path, "save", SAVE_AT))
        resumed = run_world(_dcp_run, 2, args=(hook, options, path, "resume", STEPS - SAVE_AT))
        for params in resumed:
            assert torch.equal(params, full)
        # DCP would have merged same-key per-rank tensors and loads tensors only into existing ones:
        # a fresh state handed to DCP directly notices the missing residuals and refuses
        # a shrunk world finds its rank's entry and refuses it; a grown one misses rank 2's entry (DCP
        # refuses the load), unless the new ranks may start afresh (reset, partial load)
        with pytest.raises(WorkerError, match="saved in a world of 2, loading in a world of 1"):
            run_world(_dcp_run, 1, args=(hook, options, path, "resume", 1))
        with pytest.raises(WorkerError, match="Missing key in checkpoint state_dict: hook.rank2"):
            run_world(_dcp_run, 3, args=(hook, options, path, "resume", 1))
        grown = run_world(_dcp_run, 3, args=(hook, options, path, "resume", 3), kwargs=dict(on_mismatch="reset"))
        assert all(torch.equal(grown[0], params) for params in grown)
    with tempfile.TemporaryDirectory() as path:
        run_world(_dcp_run, 2, args=(hook, options, path, "save", SAVE_AT), kwargs=dict(direct=True))
        with pytest.raises(WorkerError, match="lacks .* saved tensors"):
            run_world(_dcp_run, 2, args=(hook, options, path, "resume", 1), kwargs=dict(direct=True))
        with pytest.raises(WorkerError, match="Missing key in checkpoint state_dict: hook.rank2"):
            run_world(_dcp_run, 3, args=(hook, options, path, "resume", 1), kwargs=dict(direct=True))


# ------------------------------------------------------------------------------------------------ failure 5
@pytest.mark.parametrize("hook,options", [
    ("powersgd", {"rank": 1}),
    ("powersgd", {"rank": 4}),
    ("lgreco", {"family": "powersgd", "rank": 2, "retune_every": 4, "accumulate_steps": 2}),
    ("ef", {"compressor": ("QSGD", {"bits": 4, "bucket_size": 64}), "collective": "two_phase"}),
    ("ef21", {"compressor": ("Sign", {})}),
], ids=["powersgd1", "powersgd4", "lgreco", "ef-qsgd", "ef21-sign"])
def test_a_layer_with_zero_gradients_stays_finite_and_untouched(hook, options):
    """Zero in, zero out: a gated-off branch made every rank's gradients NaN under PowerSGD."""
    out = run_world(train, 2, kwargs=dict(hook=hook, options=options, steps=8, ddp_kwargs=SMALL_BUCKETS,
                                          dead_branch=True))
    untouched = Net(dead_branch=True)
    for r in out:
        assert torch.isfinite(r["params"]).all()
        assert all(r["finite"])
    dead = torch.cat([untouched.dead.weight.reshape(-1), untouched.dead.bias])
    flat = out[0]["params"]
    names = [n for n, _ in untouched.named_parameters()]
    sizes = [p.numel() for _, p in untouched.named_parameters()]
    start = sum(sizes[: names.index("dead.weight")])
    assert torch.equal(flat[start : start + dead.numel()], dead)


# ------------------------------------------------------------------------------------------------ failure 7
def _dies_or_stalls(rank, world_size, hook, options, mode):
    model, ddp, state = build(hook, dict(options, timeout=4), SMALL_BUCKETS)
    for step in range(8):
        if step == 4 and rank == 1:
            if mode == "crash":
                os._exit(3)
            time.sleep(60)  # stopped: never answers again
        x, y = batch(rank, step)
        started = time.monotonic()
        try:
            torch.nn.functional.mse_loss(ddp(x), y).backward()
        except RuntimeError as exc:
            return {"message": str(exc), "seconds": time.monotonic() - started}
    return None


@pytest.mark.parametrize("mode", ["crash", "stall"])
@pytest.mark.parametrize("hook,options", [STATEFUL[0], STATEFUL[2]], ids=["ef", "powersgd"])
def test_a_dead_or_silent_peer_is_named_in_the_error(hook, options, mode):
    out = run_world(_dies_or_stalls, 2, args=(hook, options, mode), may_die=(1,), timeout=90)
    report = out[0]
    assert report is not None, "the survivor trained on as if nothing happened"
    message = report["message"]
    assert "Unable to cast" not in message
    assert f"commlib {hook} hook: a collective failed at step 4 on rank 0 of 2" in message
    assert "rank 1 (global rank 1) last started step 3" in message
    assert report["seconds"] < 30  # the hook's timeout (4 s), not a hang


# ------------------------------------------------------------------------------------------------ lifetime
def _make_and_drop(rank, world_size, count):
    import torch.distributed.distributed_c10d as c10d

    model = Net()
    groups_before, threads_before = len(c10d._world.pg_map), threading.active_count()
    fds_before = len(os.listdir("/proc/self/fd"))
    names = ["ef", "ef21", "powersgd", "lgreco", "allreduce", "fp16"]
    for i in range(count):
        with hooks.make(names[i % len(names)], model=model)[0] as state:
            state.bind()
            job = state.queue.submit(lambda comm: comm.all_reduce(torch.ones(4)), raw=True)
            assert torch.equal(job.wait(), torch.full((4,), float(world_size)))
    time.sleep(0.2)
    return {"groups": (groups_before, len(c10d._world.pg_map)), "threads": (threads_before, threading.active_count()),
            "fds": (fds_before, len(os.listdir("/proc/self/fd")))}


def test_fifty_states_made_and_closed_leak_no_groups_threads_or_fds():
    out = run_world(_make_and_drop, 2, args=(50,))
    for r in out:
        assert r["groups"][0] == r["groups"][1]
        assert r["threads"][0] == r["threads"][1]
        assert r["fds"][1] <= r["fds"][0] + 2


def _late_binding(rank, world_size, state_bytes):
    import pickle

    state = pickle.loads(state_bytes)  # built (and pickled) before init_process_group, as Lightning does
    assert not state.bound
    return train(rank, world_size, hook=None) if state is None else _train_with(state, rank)


def _train_with(state, rank):
    model = Net()
    ddp = torch.nn.parallel.DistributedDataParallel(model, **SMALL_BUCKETS)
    ddp.register_comm_hook(state, hooks.commlib_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(8):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    stats = state.stats()
    state.close()
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "stats": stats}


def test_a_state_built_and_pickled_before_init_trains_with_identical_ranks():
    import pickle

    assert not dist.is_initialized()
    state, _ = hooks.make("powersgd", rank=2)  # no process group yet
    out = run_world(_late_binding, 2, args=(pickle.dumps(state),))
    assert torch.equal(out[0]["params"], out[1]["params"])
    assert all(r["stats"]["bytes_sent"] > 0 and r["stats"]["compression_ratio"] > 1 for r in out)


def _wider_model_loads(rank, world_size, checkpoint):
    model, ddp, state = build("powersgd", {"rank": 2}, SMALL_BUCKETS, dead_branch=True)  # one more layer
    x, y = batch(rank, 0)
    torch.nn.functional.mse_loss(ddp(x), y).backward()  # the state has seen its model now
    state.load_state_dict(torch.load(io.BytesIO(checkpoint), weights_only=True))


def test_a_state_of_another_model_is_refused():
    _, checkpoints, _ = _first_run(*STATEFUL[2])
    with pytest.raises(WorkerError, match="does not fit this model"):
        run_world(_wider_model_loads, 2, args=(checkpoints[0]["hook"],))
