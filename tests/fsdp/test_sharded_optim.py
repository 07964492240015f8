"""GaLore, Fira and FRUGAL on FSDP2's sharded (DTensor) parameters == the same optimizer on one
process with the whole model and the global batch; explicit collectives; DCP resume."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from commlib.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW
from tests.conftest import run_world
from tests.fsdp.fsdp_harness import local_batch, loss_of, mlp, shard

# weights 10x12 (left side), 16x10 (right side), 5x16 (left side): both sides, uneven shards at W = 3
SIZES = (12, 10, 16, 5)
METHODS = {"galore": (GaLoreAdamW, {"rank": 3}), "fira": (FiraAdamW, {"rank": 3}),
           "frugal": (FrugalAdamW, {"density": 0.5})}


def make_optimizer(model, method: str, projector: str):
    cls, key = METHODS[method]
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return cls([{"params": others}, {"params": matrices, **key, "update_proj_gap": 2, "projector": projector}],
               lr=0.01, weight_decay=0.01)


def global_batch(step, world):
    parts = [local_batch(step, r, world) for r in range(world)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def train_against_whole(model, method, projector, rank, world, steps):
    """Train the sharded ``model`` on each rank's batch and the whole reference on the global one."""
    opt = make_optimizer(model, method, projector)
    reference = mlp(sizes=SIZES)
    ref_opt = make_optimizer(reference, method, projector)
    for step in range(steps):
        loss_of(model, *local_batch(step, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        loss_of(reference, *global_batch(step, world)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    return opt, reference, ref_opt


def _sharded_vs_whole(rank, world, method, projector, steps=6):
    model = shard(mlp(sizes=SIZES))
    opt, reference, ref_opt = train_against_whole(model, method, projector, rank, world, steps)
    diffs = []
    for p, q in zip(model.parameters(), reference.parameters()):
        whole = p.detach().full_tensor()
        diffs.append(float((whole - q.detach()).abs().max() / q.detach().abs().max()))
    bytes_here = torch.tensor([opt.state_bytes()], dtype=torch.int64)
    dist.all_reduce(bytes_here)
    return max(diffs), opt.stats(), int(bytes_here), ref_opt.state_bytes()


WHOLE_CASES = [(2, m, p) for m in METHODS for p in ("svd", "dct", "random")] + [
    (3, "galore", "svd"), (3, "fira", "dct"), (3, "frugal", "random")]


@pytest.mark.parametrize("world,method,projector", WHOLE_CASES)
def test_sharded_equals_whole_model(world, method, projector):
    """6 steps, a refresh every 2: the gathered parameters match the one-process optimizer on the
    global batch (relative difference <= 1e-5; the sums differ only in order)."""
    for diff, stats, total_state, whole_state in run_world(_sharded_vs_whole, world, args=(method, projector)):
        assert diff <= 1e-5, (method, projector, diff)
        assert stats["total_bytes"] > 0
        # state is sharded like the parameters: the ranks together hold what one process holds, plus
        # the replicated right-side basis (svd, random: 3 x 10 values on every rank) or dct's indices
        replicated = {"svd": 3 * 10 * 4, "random": 3 * 10 * 4, "dct": 0}[projector] + 64
        assert total_state <= whole_state + world * replicated, (total_state, whole_state)


def test_frugal_blocks_on_shards():
    for diff, stats, _, _ in run_world(_sharded_vs_whole, 2, args=("frugal", "blocks")):
        assert diff <= 1e-5
        assert stats["total_bytes"] == 0  # element-wise on local shards: no communication at all


def _collective_counts(rank, world, projector):
    model = shard(mlp(sizes=SIZES))
    opt = make_optimizer(model, "galore", projector)
    for step in range(4):  # refreshes at steps 0 and 2
        loss_of(model, *local_batch(step, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    return opt.stats()["calls"]


@pytest.mark.parametrize("projector", ["svd", "dct", "random"])
def test_galore_collectives_are_the_documented_ones(projector):
    """Per step, each of the two left-side matrices: one reduce-scatter (R) and one all-gather (N);
    the right-side matrix: nothing. Per refresh: svd all-gathers each gradient (3), dct all-reduces
    the right one's scores and all-gathers the left ones, random sends nothing."""
    calls = run_world(_collective_counts, 2, args=(projector,))[0]
    steps, refreshes, left, right = 4, 2, 2, 1
    extra_gather = {"svd": (left + right) * refreshes, "dct": left * refreshes, "random": 0}[projector]
    assert calls["reduce_scatter"] == left * steps
    assert calls["all_gather"] == left * steps + extra_gather
    # dct: the right side's scores; svd: the left side's r sign-alignment dots after the first refresh
    assert calls["all_reduce"] == {"dct": right * refreshes, "svd": left * (refreshes - 1), "random": 0}[projector]


class _App:
    """A DCP Stateful of a model and its optimizer (FQN-keyed, sharded like the parameters)."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _dcp_run(rank, world, path, method, projector, phase):
    import torch.distributed.checkpoint as dcp

    model = shard(mlp(sizes=SIZES))
    opt = make_optimizer(model, method, projector)
    start = 0
    if phase == "resume":
        dcp.load({"app": _App(model, opt)}, checkpoint_id=path)
        start = 3
    for step in range(start, 7):
        loss_of(model, *local_batch(step, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        if phase == "full" and step == 2:
            dcp.save({"app": _App(model, opt)}, checkpoint_id=path)
    return [p.to_local().clone() for p in model.parameters()]


@pytest.mark.parametrize("method,projector", [("galore", "svd"), ("fira", "dct"), ("frugal", "random")])
def test_dcp_resume_is_bit_identical(tmp_path, method, projector):
    """Saved with DCP after step 3 (mid refresh period), loaded in fresh processes: steps 4-7 equal
    the uninterrupted run bit for bit."""
    full = run_world(_dcp_run, 2, args=(str(tmp_path), method, projector, "full"))
    resumed = run_world(_dcp_run, 2, args=(str(tmp_path), method, projector, "resume"))
    for a, b in zip(full, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _bad_placement(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    w.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    try:
        opt.step()
    except ValueError as err:
        return str(err)
    return "no error"


def test_column_sharded_parameter_is_refused():
    for message in run_world(_bad_placement, 2):
        assert "Shard(0)" in message


def _hsdp_vs_whole(rank, world, method, projector, native, steps=4):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from commlib.compress import Identity
    from commlib.fsdp import compress_gradients

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = mlp(sizes=SIZES)
    target = mesh if native else mesh["shard"]
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=target)
    fully_shard(model, mesh=target)
    if not native:  # commlib's HSDP: the replica all-reduce in FSDP's hook
        compress_gradients(model, Identity(), replicate=mesh["replicate"])
    _, reference, _ = train_against_whole(model, method, projector, rank, world, steps)
    return max(float((p.detach().full_tensor() - q.detach()).abs().max() / q.detach().abs().max())
               for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("method,projector,native", [("galore", "svd", True), ("fira", "dct", True),
                                                     ("frugal", "random", True), ("galore", "dct", False)],
                         ids=["galore-svd-native", "fira-dct-native", "frugal-random-native", "galore-dct-commlib"])
def test_hsdp_2d_mesh_equals_whole_model(method, projector, native):
    """The low-rank optimizers on HSDP (2 replicas x 2 shards): FSDP2's native 2-D mesh, and
    commlib's (1-D shard mesh, replicas averaged in the all-reduce hook) == one process."""
    for diff in run_world(_hsdp_vs_whole, 4, args=(method, projector, native)):
        assert diff <= 1e-5, diff
