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


# ------------------------------------------------------------------------------------------------ rule 9
RECIPES = ("clip", "scaler", "scale")


def _recipe_run(rank, world, method, projector, through_hook, recipe, residual="exact", options=None,
                coefficients=None):
    """Steps as real recipes take them: clip_grad_norm_(0.01) every step ("clip"); a GradScaler
    whose step 1 overflows on rank 1, unscale_ then clipping ("scaler"); or the gradient halved after
    backward, as accumulation scaling does ("scale"). ``coefficients``: multiply by these recorded
    clip coefficients instead of clipping (to replay another run's clipping on dense DDP).
    Returns (parameters, skipped steps, clip coefficients)."""
    model = Net()
    ddp = DDP(model)
    opt = make_optimizer(model, method, projector)
    for group in opt.param_groups[1:]:
        group.update(options or {})
    if through_hook:
        state, hook = hooks.make("lowrank", optimizer=opt, model=model, residual=residual)
        ddp.register_comm_hook(state, hook)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2) if recipe == "scaler" else None
    skipped, used = 0, []

    def clip(step):
        if coefficients is None:
            total = nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            used.append(torch.clamp(0.01 / (total + 1e-6), max=1.0))
        else:
            for p in model.parameters():
                p.grad.mul_(coefficients[step])

    for step in range(STEPS):
        x, y = batch(10 * step, rank)
        loss = nn.functional.mse_loss(ddp(x), y)
        if scaler is not None:
            if step == 1 and rank == 1:
                loss = loss * float("inf")  # one rank overflows, as a GradScaler's first steps do
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            clip(step)
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < before
        else:
            loss.backward()
            if recipe == "clip":
                clip(step)
            else:
                for p in model.parameters():
                    p.grad.mul_(0.5)
            opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), skipped, used


def _galore_recipes(rank, world, recipe):
    out = {}
    for projector in ("svd", "dct", "random"):
        hooked = _recipe_run(rank, world, "galore", projector, True, recipe)
        # clip_grad_norm_ measures the gradient it is given: through the hook that is P R (the
        # norm of the averaged full gradient is no function of the projected payloads), so dense
        # DDP replays the hook run's coefficients; unscaling and accumulation scaling are the same
        dense = _recipe_run(rank, world, "galore", projector, False, recipe, coefficients=hooked[2] or None)
        out[projector] = dense[:2], hooked[:2]
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_galore_through_hook_sees_what_the_user_did_to_p_grad(recipe):
    """Clipping, GradScaler unscaling (with an overflow on one rank) and accumulation scaling
    between backward() and step() reach GaLore's update through the hook exactly as the same
    scaling of the gradient does over dense DDP (relative 1e-5, every projector; the clip
    coefficient is the one clip_grad_norm_ computed from the p.grad the hook left), and the
    overflow is skipped on every rank by both."""
    results = run_world(_galore_recipes, 2, args=(recipe,))
    for projector in ("svd", "dct", "random"):
        (dense, dense_skips), (hooked, hooked_skips) = results[0][projector]
        assert torch.equal(hooked, results[1][projector][1][0])  # ranks identical
        assert float((hooked - dense).abs().max() / dense.abs().max()) <= 1e-5, projector
        assert dense_skips == hooked_skips == (1 if recipe == "scaler" else 0)
        assert torch.isfinite(hooked).all()


def _residual_recipes(rank, world):
    from commlib.compress import Identity

    out = {}
    for method in ("fira", "frugal"):
        dense = _recipe_run(rank, world, method, "dct", False, "clip")[0]
        exact = _recipe_run(rank, world, method, "dct", True, "clip")[0]
        identity = _recipe_run(rank, world, method, "dct", True, "clip", residual=Identity())[0]
        out[method] = dense, exact, identity
    # residual="none": the out-of-subspace part is exactly zero, whatever clipping did to p.grad
    out["none"] = {m: _step_directions(rank, world, m) for m in ("fira", "frugal")}
    return out


def _step_directions(rank, world, method):
    """Through the hook with residual='none' and clipping, how far each projected step of each
    matrix leaves the subspace: ||(I - P Pᵀ) dW|| / ||dW||."""
    from commlib.optim import projectors as pj

    model = Net()
    ddp = DDP(model)
    opt = make_optimizer(model, method, "dct")
    state, hook = hooks.make("lowrank", optimizer=opt, model=model, residual="none")
    ddp.register_comm_hook(state, hook)
    ratios = []
    for step in range(STEPS):
        x, y = batch(10 * step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        matrices = [m.weight for m in (model.a, model.b, model.c)]
        planned = [opt.wire_projection(w) for w in matrices]
        before = [w.detach().clone() for w in matrices]
        opt.step()
        opt.zero_grad()
        for w, old, plan in zip(matrices, before, planned):
            if plan is None:
                continue  # a refresh step: averaged densely, the residual is real
            basis, side = plan
            delta = w.detach() - old
            outside = delta - pj.project_back(pj.project(delta, basis, side), basis, side)
            ratios.append(float(outside.norm() / delta.norm()))
    return ratios


def test_residual_methods_under_clipping():
    """Fira and FRUGAL with clipping every step: residual='exact' and an Identity-compressed residual
    equal dense DDP (the delivered gradient is the whole mean, so clip_grad_norm_ measures the same
    norm); residual='none' never steps out of the subspace, neither along the rounding noise of
    G - P Pᵀ G (whose sign FRUGAL's state-free rule would follow at full step size) nor along the
    (c - 1) P R that a stored R left after clipping."""
    out = run_world(_residual_recipes, 2)[0]
    for method in ("fira", "frugal"):
        dense, exact, identity = out[method]
        scale = float(dense.abs().max())
        assert float((exact - dense).abs().max()) / scale <= 1e-5, method
        assert float((identity - dense).abs().max()) / scale <= 1e-5, method
        ratios = out["none"][method]
        assert len(ratios) == 3 * 4  # 3 matrices x the 4 non-refresh steps of 7
        assert max(ratios) <= 1e-5, (method, ratios)
