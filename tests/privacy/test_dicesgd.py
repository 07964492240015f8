"""DiceSGD: the equations against NumPy, distributed = single process on the global batch, accounting, resume."""

import io

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import run_world

opacus = pytest.importorskip("opacus", reason="opacus not installed (pip install -e .[privacy])")
from opacus import GradSampleModule  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402

from commlib.privacy import DicePrivacyEngine, DiceSGD, noise_inflation  # noqa: E402

D, B, LR = 5, 12, 0.3


def data(step, rows=B):
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(rows, D, generator=gen, dtype=torch.float64)
    y = x @ torch.arange(1.0, D + 1, dtype=torch.float64) + 3.0 + (torch.rand(rows, generator=gen, dtype=torch.float64) < 0.2) * 20
    return x, y


def make(noise, c1=1.0, c2=1.5, process_group=False, seed=7):
    torch.manual_seed(0)
    model = GradSampleModule(torch.nn.Linear(D, 1).double())
    with torch.no_grad():
        model._module.weight.zero_()
        model._module.bias.zero_()
    opt = DiceSGD(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=noise, max_grad_norm=c1,
                  error_max_grad_norm=c2, expected_batch_size=B, process_group=process_group, noise_seed=seed)
    return model, opt


def step(model, opt, x, y):
    opt.zero_grad()
    ((model(x).squeeze(1) - y) ** 2).mean().backward()
    opt.step()


def numpy_reference(steps, noise, c1=1.0, c2=1.5, seed=7):
    """The equations of DiceSGD in sum units, per-sample gradients of the squared error in closed form."""
    w, b = np.zeros(D), 0.0
    e_w, e_b = np.zeros(D), 0.0
    gen = torch.Generator().manual_seed(seed)
    std = noise * c1 * np.sqrt(1 + 2 * c2 / c1)
    error_clipped = False
    for t in range(steps):
        x, y = (a.numpy() for a in data(t))
        r = x @ w + b - y
        g_w, g_b = 2 * r[:, None] * x, 2 * r  # per-sample gradients of (x w + b - y)^2
        norms = np.sqrt((g_w**2).sum(1) + g_b**2)
        f = np.minimum(c1 / (norms + 1e-6), 1.0)
        s_clip_w, s_clip_b = (f[:, None] * g_w).sum(0), (f * g_b).sum()
        s_raw_w, s_raw_b = g_w.sum(0), g_b.sum()
        e_norm = np.sqrt((e_w**2).sum() + e_b**2)
        fe = min(B * c2 / (e_norm + 1e-6), 1.0)  # the paper's C2 on the mean-unit error = B C2 in sum units
        error_clipped |= fe < 1.0
        v_w, v_b = s_clip_w + fe * e_w, s_clip_b + fe * e_b
        e_w, e_b = e_w + s_raw_w - v_w, e_b + s_raw_b - v_b
        if std > 0:  # same draws, same order as the optimizer (weight, then bias)
            n_w = torch.normal(0.0, std, (1, D), generator=gen, dtype=torch.float64).numpy()[0]
            n_b = torch.normal(0.0, std, (1,), generator=gen, dtype=torch.float64).numpy()[0]
        else:
            n_w, n_b = 0.0, 0.0
        w = w - LR * (v_w + n_w) / B
        b = b - LR * (v_b + n_b) / B
    return w, b, e_w, e_b, error_clipped


@pytest.mark.parametrize("noise", [0.0, 1.3])
def test_single_process_matches_numpy(noise):
    model, opt = make(noise)
    for t in range(25):
        step(model, opt, *data(t))
    w, b, e_w, e_b, error_clipped = numpy_reference(25, noise)
    assert error_clipped  # both branches of clip(E) are exercised
    np.testing.assert_allclose(model._module.weight.detach().numpy()[0], w, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(model._module.bias.detach().numpy()[0], b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(opt.error[0].numpy()[0], e_w, rtol=1e-9, atol=1e-9)
    assert np.linalg.norm(e_w) > 1.0  # the clipping error really is fed back


def _distributed(rank, world_size, steps, noise, seed=None):
    model, opt = make(noise, process_group=None, seed=seed)  # None: rank 0's seed, broadcast
    for t in range(steps):
        x, y = data(t)
        half = B // world_size
        step(model, opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    dist.barrier()
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "error": torch.cat([e.reshape(-1) for e in opt.error]), "seed": opt.generator.initial_seed()}


@pytest.mark.parametrize("noise", [0.0, 1.3])
def test_two_ranks_equal_one_process_on_the_global_batch(noise):
    out = run_world(_distributed, 2, kwargs=dict(steps=20, noise=noise))
    assert torch.equal(out[0]["params"], out[1]["params"]) and torch.equal(out[0]["error"], out[1]["error"])
    model, opt = make(noise, seed=out[0]["seed"])
    for t in range(20):
        step(model, opt, *data(t))
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(out[0]["params"], single, rtol=1e-10, atol=1e-10)


def test_epsilon_equals_opacus_accountant_and_engine_wiring():
    x, y = data(0, rows=200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    model = torch.nn.Linear(D, 1).double()
    engine = DicePrivacyEngine(accountant="rdp")
    module, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=4.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0, error_max_grad_norm=3.0)
    assert isinstance(optimizer, DiceSGD) and optimizer.kappa == pytest.approx(noise_inflation(1.0, 3.0))
    steps = 0
    for xb, yb in loader:
        optimizer.zero_grad()
        ((module(xb).squeeze(1) - yb) ** 2).mean().backward()
        optimizer.step()
        steps += 1
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=1 / len(loader))
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) <= 4.0 + 0.05  # the budget make_private_with_epsilon aimed at


@pytest.mark.parametrize("kwargs,match", [
    ({"max_grad_norm": 0.0}, "max_grad_norm"), ({"max_grad_norm": 2.0, "error_max_grad_norm": 1.0}, "error_max_grad_norm"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
])
def test_invalid_settings_raise(kwargs, match):
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, error_max_grad_norm=1.0, expected_batch_size=4,
                process_group=False) | kwargs
    with pytest.raises(ValueError, match=match):
        DiceSGD(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), **args)


def test_delta_must_be_below_one():
    engine = DicePrivacyEngine(accountant="rdp")
    with pytest.raises(ValueError, match="delta"):
        engine.get_epsilon(1.0)


def test_resume_is_bit_identical():
    model, opt = make(1.1)
    for t in range(10):
        step(model, opt, *data(t))
    full = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    part, opt_a = make(1.1)
    for t in range(5):
        step(part, opt_a, *data(t))
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt_b = make(1.1, seed=99)  # a different seed: the saved generator state must win
    resumed.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    for t in range(5, 10):
        step(resumed, opt_b, *data(t))
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in resumed.parameters()]), full)


def _ddp_dp_ef(rank, world_size, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commlib import hooks

    model, opt = make(1.3, process_group=None, seed=11)
    ddp = DDP(model)
    state, hook = hooks.make("dp_ef")
    ddp.register_comm_hook(state, hook)
    for t in range(steps):
        x, y = data(t)
        half = B // world_size
        opt.zero_grad()
        ((ddp(x[rank * half:(rank + 1) * half]).squeeze(1) - y[rank * half:(rank + 1) * half]) ** 2).mean().backward()
        opt.step()
    dist.barrier()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_inside_ddp_with_the_dp_ef_hook():
    """DDP + dp_ef (no DDP all-reduce) + DiceSGD = DiceSGD's own distributed run, bit for bit."""
    inside = run_world(_ddp_dp_ef, 2, kwargs=dict(steps=10))
    outside = run_world(_distributed, 2, kwargs=dict(steps=10, noise=1.3, seed=11))
    assert torch.equal(inside[0], inside[1])
    assert torch.equal(inside[0], outside[0]["params"])


def test_a_state_of_other_units_or_shapes_is_refused():
    model, opt = make(1.1)
    for t in range(3):
        step(model, opt, *data(t))
    saved = opt.state_dict()
    _, other_c2 = make(1.1, c2=3.0)
    with pytest.raises(ValueError, match="error_max_grad_norm=1.5"):
        other_c2.load_state_dict(saved)
    wider = GradSampleModule(torch.nn.Linear(D + 1, 1).double())
    other_shape = DiceSGD(torch.optim.SGD(wider.parameters(), lr=LR), noise_multiplier=1.1, max_grad_norm=1.0,
                          error_max_grad_norm=1.5, expected_batch_size=B, process_group=False, noise_seed=7)
    with pytest.raises(ValueError, match="does not fit these parameters"):
        other_shape.load_dice_state_dict(saved["dice"])


def _secure(rank, world_size, steps):
    torch.manual_seed(100 + rank)  # the ranks' global RNGs differ, as they do in real runs
    model = GradSampleModule(torch.nn.Linear(D, 1).double())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = DiceSGD(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=1.3, max_grad_norm=1.0,
                  error_max_grad_norm=1.5, expected_batch_size=B, secure_mode=True)
    calls = []
    import commlib.privacy.dicesgd as dice

    real = dice._generate_noise
    dice._generate_noise = lambda *a, **k: calls.append(k.get("secure_mode")) or real(*a, **k)
    try:
        for t in range(steps):
            x, y = data(t)
            half = B // world_size
            step(model, opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    finally:
        dice._generate_noise = real
    dist.barrier()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), calls, opt.dice_state_dict()["generator"]


def test_secure_noise_is_drawn_securely_once_and_shared_by_every_rank():
    """secure_mode used to be dropped (plain torch.normal) and, with unshared generators, the ranks'
    noise diverged. Now rank 0 draws with Opacus' secure recipe and broadcasts: ranks stay identical,
    and two runs differ (fresh entropy); secure noise state is never saved."""
    first = run_world(_secure, 2, kwargs=dict(steps=4))
    second = run_world(_secure, 2, kwargs=dict(steps=4))
    assert torch.equal(first[0][0], first[1][0])
    assert not torch.equal(first[0][0], second[0][0])
    assert first[0][1] and all(first[0][1]) and first[1][1] == []  # rank 0 draws, in secure mode; rank 1 never
    assert first[0][2] is None
    with pytest.raises(ValueError, match="noise_seed"):
        DiceSGD(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), noise_multiplier=1.0,
                max_grad_norm=1.0, error_max_grad_norm=1.0, expected_batch_size=4, secure_mode=True,
                process_group=False, noise_seed=3)


def test_a_load_without_the_fed_back_error_is_refused():
    model, opt = make(1.1)
    step(model, opt, *data(0))
    saved = opt.state_dict()
    saved.pop("dice")
    _, fresh = make(1.1)
    with pytest.raises(ValueError, match="'dice' entry"):
        fresh.load_state_dict(saved)


def test_the_noise_generator_lives_on_the_parameters_device():
    _, opt = make(1.1)
    assert opt.generator.device == opt.params[0].device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_on_cuda_parameters():
    model = GradSampleModule(torch.nn.Linear(D, 1).double().cuda())
    opt = DiceSGD(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=1.0, max_grad_norm=1.0,
                  error_max_grad_norm=1.5, expected_batch_size=B, process_group=False, noise_seed=1)
    x, y = data(0)
    step(model, opt, x.cuda(), y.cuda())
    assert opt.generator.device.type == "cuda" and torch.isfinite(model._module.weight).all()


def _rank0_file(rank, world_size, path, steps, split, c2):
    """Train ``split`` steps, rank 0 saves one file, every rank builds a fresh optimizer and loads it."""
    half = B // world_size

    def local(t):
        x, y = data(t)
        return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]

    model, opt = make(1.3, process_group=None, seed=5)
    for t in range(split):
        step(model, opt, *local(t))
    books = opt.stats()
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    model, opt = make(1.3, c2=c2, process_group=None, seed=99)
    model.load_state_dict(saved["model"])
    try:
        opt.load_state_dict(saved["opt"])
    except ValueError as err:
        return {"refused": str(err)}
    for t in range(split, steps):
        step(model, opt, *local(t))
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "books": books,
            "after": opt.stats()}


def test_rank0_saves_one_file_every_rank_loads_it(tmp_path):
    """The way users checkpoint: resume is bit-identical to the uninterrupted run, the books carry
    over, and a file saved under another C2 is refused on every rank."""
    full = run_world(_distributed, 2, kwargs=dict(steps=8, noise=1.3, seed=5))
    out = run_world(_rank0_file, 2, kwargs=dict(path=str(tmp_path / "dice.pt"), steps=8, split=3, c2=1.5))
    assert torch.equal(out[0]["params"], full[0]["params"]) and torch.equal(out[1]["params"], full[0]["params"])
    dense = 8 * (D + 1)  # float64 weight and bias: DDP's all-reduce
    assert out[0]["books"]["bytes_sent"] == 2 * dense  # S_clip and S_raw in one all-reduce
    assert out[0]["books"]["total_bytes_sent"] == 3 * 2 * dense and out[0]["books"]["total_bytes_dense"] == 3 * dense
    assert out[0]["books"]["compression_ratio"] == 0.5
    assert out[1]["after"]["step"] == 8 and out[1]["after"]["total_bytes_sent"] == 8 * 2 * dense
    refused = run_world(_rank0_file, 2, kwargs=dict(path=str(tmp_path / "other.pt"), steps=8, split=3, c2=2.0))
    assert all("error_max_grad_norm=1.5 (now 2.0)" in r["refused"] for r in refused)


def test_single_process_books():
    model, opt = make(1.1)
    assert opt.stats()["compression_ratio"] == 1.0  # nothing due yet
    step(model, opt, *data(0))
    books = opt.stats()
    assert books["step"] == 1 and books["bytes_sent"] == books["total_bytes_dense"] == 0  # no process group
