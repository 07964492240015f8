"""Gradient coding inside DDP: coded training equals uncoded DDP on the same parts, with and without erasures."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import WorkerError, run_world
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import coding, hooks

STEPS = 8


def make_model():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def part_loss(model, part, step):
    gen = torch.Generator().manual_seed(100 * step + part)
    x, y = torch.randn(8, 10, generator=gen), torch.randn(8, 3, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def _uncoded(rank, world_size):
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        part_loss(ddp, rank, step).backward()  # rank i trains on part i; DDP averages
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _coded(rank, world_size, kind, s, pattern):
    code = coding.CyclicRepetition(world_size, s) if kind == "cyclic" else coding.FractionalRepetition(world_size, s)
    model = make_model()
    ddp = DDP(model)
    state, hook = hooks.make("gc", code=code, stragglers=pattern)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        loss = coding.coded_loss(code, rank, {j: part_loss(ddp, j, step) for j in code.parts(rank)})
        loss.backward()
        opt.step()
    dist.barrier()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("world,kind,s", [(2, "frc", 1), (3, "cyclic", 1), (3, "cyclic", 2)])
@pytest.mark.parametrize("erase", [False, True])
def test_coded_ddp_equals_uncoded_ddp(world, kind, s, erase):
    pattern = np.zeros((STEPS, world), dtype=int)
    if erase:  # one rank per step erased (s >= 1 tolerates it), a different one each step
        for step in range(STEPS):
            pattern[step, step % world] = 1
    coded = run_world(_coded, world, kwargs=dict(kind=kind, s=s, pattern=pattern))
    uncoded = run_world(_uncoded, world)
    for r in range(1, world):
        assert torch.equal(coded[r], coded[0])
    torch.testing.assert_close(coded[0], uncoded[0], rtol=1e-5, atol=1e-6)


def test_too_many_erasures_fail_loudly():
    pattern = np.zeros((STEPS, 3), dtype=int)
    pattern[2, :2] = 1  # two erased with s = 1
    with pytest.raises(WorkerError, match="Undecodable|do not span"):
        run_world(_coded, 3, kwargs=dict(kind="cyclic", s=1, pattern=pattern))


def test_code_must_match_the_world():
    with pytest.raises(WorkerError, match="must equal the world size"):
        run_world(_bad_world, 2)


def _bad_world(rank, world_size):
    hooks.make("gc", code=coding.CyclicRepetition(3, 1))
