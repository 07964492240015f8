"""The lowrank hook: GaLore/Fira/FRUGAL's projected gradients all-reduced instead of full ones."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import hooks
from commlib.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW
from tests.conftest import run_world

STEPS, GAP = 7, 3  # refreshes at steps 0, 3, 6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 20)   # weight 20 x 12: right side
        self.b = nn.Linear(20, 6)    # weight 6 x 20: left side
        self.c = nn.Linear(6, 3)     # weight 3 x 6: left side

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def make_optimizer(model, method, projector):
    matrices = [m.weight for m in (model.a, model.b, model.c)]
    others = [m.bias for m in (model.a, model.b, model.c)]
    key = {"density": 0.25} if method == "frugal" else {"rank": 2}
    cls = {"galore": GaLoreAdamW, "fira": FiraAdamW, "frugal": FrugalAdamW}[method]
    return cls([{"params": others}, {"params": matrices, **key, "update_proj_gap": GAP, "projector": projector}],
               lr=0.01)


def batch(step, rank):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 12, generator=gen), torch.randn(8, 3, generator=gen)


def _both(rank, world, method, projector, residuals=("exact",), micro=1):
    """Dense DDP, then the hook with each residual option, in one world."""
    dense = _train(rank, world, method, projector, False, micro=micro)
    return dense, [_train(rank, world, method, projector, True, r, micro=micro) for r in residuals]


def _train(rank, world, method, projector, through_hook, residual="exact", micro=1):
    model = Net()
    ddp = DDP(model)
    opt = make_optimizer(model, method, projector)
    state = None
    if through_hook:
        state, hook = hooks.make("lowrank", optimizer=opt, model=model, residual=residual)
        ddp.register_comm_hook(state, hook)
    sent = []
    for step in range(STEPS):
        for m in range(micro):
            x, y = batch(10 * step + m, rank)
            if m < micro - 1:
                with ddp.no_sync():
                    nn.functional.mse_loss(ddp(x), y).backward()
            else:
                nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        if state is not None:
            stats = state.stats()
            sent.append(stats["bytes_sent"])
            # what the collectives really moved (ring count: an all-reduce moves its buffer at W = 2)
            moved = stats["wire_bytes_total"] - sum(getattr(state, "_moved", [0]))
            state._moved = getattr(state, "_moved", []) + [moved]
            if world == 2 and isinstance(residual, str):
                assert moved == stats["bytes_sent"], (step, moved, stats["bytes_sent"])
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return params, sent


@pytest.mark.parametrize("projector", ["svd", "dct", "random"])
@pytest.mark.parametrize("world", [2, 3])
def test_galore_through_hook_equals_dense_ddp(world, projector):
    """7 steps with refreshes at 0, 3 and 6: the same parameters (relative 1e-5) as GaLore over
    DDP's dense all-reduce, every rank bit-identical, and the bytes of each step the formula's."""
    results = run_world(_both, world, args=("galore", projector))
    hooked = [h[0] for _, h in results]
    for params, _ in hooked:
        assert torch.equal(params, hooked[0][0])
    ref = results[0][0][0]
    assert float((hooked[0][0] - ref).abs().max() / ref.abs().max()) <= 1e-5
    # non-refresh steps: R of a (20 x 12, right: 20 x 2), b (6 x 20, left: 2 x 20), c (3 x 6, left: 2 x 6),
    # plus the three biases dense; svd and dct refresh steps: everything dense
    projected = 4 * (20 * 2 + 2 * 20 + 2 * 6 + 20 + 6 + 3)
    dense_bytes = 4 * sum(p.numel() for p in Net().parameters())
    # a random basis is known before its refresh: random projects every step, the first included
    expected = [dense_bytes if step % GAP == 0 and projector != "random" else projected for step in range(STEPS)]
    assert hooked[0][1] == expected


def test_galore_through_hook_with_accumulation():
    (dense, _), [(hooked, _)] = run_world(_both, 2, args=("galore", "dct"), kwargs={"micro": 2})[0]
    assert float((hooked - dense).abs().max() / dense.abs().max()) <= 1e-5


@pytest.mark.parametrize("method", ["fira", "frugal"])
def test_residual_exact_equals_dense_and_none_differs(method):
    """Fira and FRUGAL use G - P R: residual='exact' averages their matrices densely (== dense DDP);
    residual='none' sends R only, so it follows another trajectory (measured, not equal)."""
    (dense, _), [(exact, _), (none, sent)] = run_world(_both, 2, args=(method, "svd", ("exact", "none")))[0]
    assert float((exact - dense).abs().max() / dense.abs().max()) <= 1e-5
    assert float((none - dense).abs().max()) > 1e-4
    assert sent[1] < sent[0]  # a non-refresh step sends the projected matrices


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        hooks.make("lowrank", optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    opt = make_optimizer(Net(), "galore", "svd")
    with pytest.raises(ValueError, match="residual"):
        hooks.make("lowrank", optimizer=opt, residual="sign")


def _resume(rank, world, path, phase):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = Net()
    ddp = DDP(model)
    opt = make_optimizer(model, "galore", "dct")
    state, hook = hooks.make("lowrank", optimizer=opt, model=model)
    ddp.register_comm_hook(state, hook)
    start = 0
    if phase == "resume":
        model_sd, optim_sd = get_state_dict(model, opt)
        holder = {"model": model_sd, "optim": optim_sd}
        dcp.load(holder, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=holder["model"], optim_state_dict=holder["optim"])
        start = 4
    for step in range(start, STEPS):
        nn.functional.mse_loss(ddp(batch(10 * step, rank)[0]), batch(10 * step, rank)[1]).backward()
        opt.step()
        opt.zero_grad()
        if phase == "full" and step == 3:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    dist.barrier()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), state.stats()["bytes_sent"]


def test_resume_follows_the_optimizer(tmp_path):
    """The hook keeps no projector of its own: after a DCP resume it asks the loaded optimizer, and
    the run continues bit-identically (step 4 projects with the basis refreshed at step 3)."""
    full = run_world(_resume, 2, args=(str(tmp_path), "full"))
    resumed = run_world(_resume, 2, args=(str(tmp_path), "resume"))
    assert torch.equal(full[0][0], resumed[0][0])
    assert full[0][1] == resumed[0][1]


def _compressed_residual(rank, world):
    from commlib.compress import Identity, Sign

    dense = _train(rank, world, "fira", "svd", False)[0]
    identity = _train(rank, world, "fira", "svd", True, Identity())[0]
    sign, sent = _train(rank, world, "fira", "svd", True, Sign())
    none = _train(rank, world, "fira", "svd", True, "none")[0]
    return dense, identity, sign, none, sent


def test_compressed_residual_with_error_feedback():
    """residual=<compressor>: R plus the compressed local residual with EF. With Identity the
    residual arrives exactly, so Fira equals dense DDP; with 1-bit Sign it sends R plus 1 bit per value
    and lands closer to dense than dropping the residual."""
    dense, identity, sign, none, sent = run_world(_compressed_residual, 2)[0]
    scale = float(dense.abs().max())
    assert float((identity - dense).abs().max()) / scale <= 1e-5
    assert float((sign - dense).abs().max()) < float((none - dense).abs().max())
    matrices = 20 * 12 + 6 * 20 + 3 * 6
    projected = 4 * (20 * 2 + 2 * 20 + 2 * 6 + 20 + 6 + 3)
    assert projected < sent[1] < projected + matrices // 8 + 3 * 8 + 3 * 4 + 64  # + sign bits and scales
