"""GaLore / Fira / FRUGAL: parity with the PyPI references, projectors, checkpoints, DDP, bad input."""

import io
import sys
import types

import pytest
import torch
from torch import nn

from commlib.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW
from commlib.optim import projectors as pj


def reference_module(name):
    """Import galore_torch / fira as oracles; galore_torch's package imports bitsandbytes (CUDA) for
    its 8-bit class only, so a stand-in module is placed for that import."""
    pytest.importorskip("transformers")
    if name == "galore_torch" and "bitsandbytes" not in sys.modules:
        bnb = types.ModuleType("bitsandbytes")
        optim = types.ModuleType("bitsandbytes.optim")
        optimizer = types.ModuleType("bitsandbytes.optim.optimizer")
        optimizer.Optimizer2State = object
        bnb.optim, optim.optimizer = optim, optimizer
        sys.modules.update({"bitsandbytes": bnb, "bitsandbytes.optim": optim,
                            "bitsandbytes.optim.optimizer": optimizer})
    return pytest.importorskip(name)


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.a = nn.Linear(24, 40)   # tall weight 40 x 24 -> right projection
        self.b = nn.Linear(40, 16)   # wide weight 16 x 40 -> left projection
        self.conv = nn.Conv1d(4, 6, 3)  # 3-D weight
        self.norm = nn.LayerNorm(16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.to(dtype)

    def forward(self, x):
        h = self.norm(self.b(torch.tanh(self.a(x))))
        c = self.conv(x[:, :12].reshape(x.shape[0], 4, 3)).sum(-1)
        return h.sum(-1) + c.sum(-1)


def batch(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 24, generator=gen).to(dtype), torch.randn(8, generator=gen).to(dtype)


def groups(model, **options):
    matrices = [p for n, p in model.named_parameters() if n in ("a.weight", "b.weight")]
    others = [p for n, p in model.named_parameters() if n not in ("a.weight", "b.weight")]
    return [{"params": others}, {"params": matrices, **options}]


def train(model, opt, steps, start=0, dtype=torch.float32):
    for step in range(start, start + steps):
        x, y = batch(step, dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_equals_galore_torch_step_for_step(proj_type):
    galore_torch = reference_module("galore_torch")
    ours, theirs = Tiny(), Tiny()
    opts = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type)
    a = GaLoreAdamW(groups(ours, **opts, svd_signs="raw"), lr=1e-2, weight_decay=0.01)
    b = galore_torch.GaLoreAdamW(groups(theirs, **opts), lr=1e-2, weight_decay=0.01, no_deprecation_warning=True)
    for step in range(8):
        train(ours, a, 1, start=step)
        train(theirs, b, 1, start=step)
        assert torch.equal(flat(ours), flat(theirs)), step


@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
def test_fira_reference_convention_equals_fira_per_step(proj_type):
    """Per step from the same weights (the limiter is discontinuous, so trajectories are compared
    one step at a time, as the reference notes advise)."""
    fira = reference_module("fira")
    ours, theirs = Tiny(), Tiny()
    a = FiraAdamW(groups(ours, rank=4, update_proj_gap=3, alpha=0.25, proj_type=proj_type, residual="reference",
                         svd_signs="raw"), lr=1e-2)
    b = fira.FiraAdamW(groups(theirs, rank=4, update_proj_gap=3, alpha=0.25, proj_type=proj_type), lr=1e-2,
                       no_deprecation_warning=True)
    for step in range(8):
        train(ours, a, 1, start=step)
        train(theirs, b, 1, start=step)
        assert (flat(ours) - flat(theirs)).abs().max() <= 1e-6, step
        with torch.no_grad():  # resynchronise weights and the limiter's memory
            for p, q in zip(ours.parameters(), theirs.parameters()):
                p.copy_(q)
            for p, q in zip(a.param_groups[1]["params"], b.param_groups[1]["params"]):
                a.state[p]["scaling_grad"] = b.state[q]["scaling_grad"].clone()
                a.state[p]["exp_avg"].copy_(b.state[q]["exp_avg"])
                a.state[p]["exp_avg_sq"].copy_(b.state[q]["exp_avg_sq"])


def test_fira_paper_residual_differs_from_the_reference_by_the_alpha_leak():
    grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    basis = pj.svd_basis(grad, 4, pj.RIGHT)
    low = pj.project(grad, basis, pj.RIGHT)
    paper = grad - pj.project_back(low, basis, pj.RIGHT)
    reference = grad - 0.25 * pj.project_back(low, basis, pj.RIGHT)
    assert pj.project(paper, basis, pj.RIGHT).abs().max() < 1e-5  # the paper's residual is out of the subspace
    torch.testing.assert_close(pj.project(reference, basis, pj.RIGHT), 0.75 * low)


# ------------------------------------------------------------------------------------------------ projectors
@pytest.mark.parametrize("shape,side", [((40, 24), pj.RIGHT), ((16, 40), pj.LEFT), ((30, 30), pj.RIGHT)])
@pytest.mark.parametrize("kind", ["svd", "random", "dct"])
def test_bases_are_orthonormal(shape, side, kind):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if kind == "svd":
        basis = pj.svd_basis(grad, 5, side)
    elif kind == "random":
        basis = pj.random_basis(shape, 5, side, seed=3)
    else:
        basis = pj.dct_basis(pj.dct_indices(grad, 5, side), shape, side, torch.float32)
    gram = basis @ basis.t() if side == pj.RIGHT else basis.t() @ basis
    torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
    assert basis.shape == ((5, shape[1]) if side == pj.RIGHT else (shape[0], 5))


def test_random_basis_depends_only_on_the_seed():
    a = pj.random_basis((40, 24), 4, pj.RIGHT, seed=11)
    b = pj.random_basis((40, 24), 4, pj.RIGHT, seed=11)
    c = pj.random_basis((40, 24), 4, pj.RIGHT, seed=12)
    state = torch.get_rng_state()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
def test_fast_dct_equals_the_matrix(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(pj.dct_rows(x), x @ pj.dct_matrix(n, torch.float64).t())
    q = pj.dct_matrix(n, torch.float64)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("shape,side", [((40, 24), pj.RIGHT), ((16, 40), pj.LEFT)])
def test_dct_column_choice_equals_brute_force(shape, side):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    chosen = pj.dct_indices(grad, 6, side)
    dim = shape[1] if side == pj.RIGHT else shape[0]
    q = pj.dct_matrix(dim, torch.float64)
    scores = []
    for j in range(dim):  # alignment of basis vector j: the L1 norm of the gradient's coefficients on it
        coeff = grad.double() @ q[j] if side == pj.RIGHT else q[j] @ grad.double()
        scores.append(float(coeff.abs().sum()))
    best = sorted(range(dim), key=lambda j: -scores[j])[:6]
    assert chosen.tolist() == sorted(best) and chosen.dtype == torch.int64


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("options,match", [
    ({"rank": 0}, "rank"), ({"rank": 25}, "rank"), ({"rank": 4, "projector": "qr"}, "projector"),
    ({"rank": 4, "proj_type": "diag"}, "proj_type"), ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap"),
])
def test_invalid_group_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW(groups(Tiny(), **options))


def test_invalid_hyper_parameters_raise():
    with pytest.raises(ValueError, match="lr"):
        GaLoreAdamW(Tiny().parameters(), lr=-1)
    with pytest.raises(ValueError, match="residual"):
        FiraAdamW(groups(Tiny(), rank=4, residual="both"))
    with pytest.raises(ValueError, match="density"):
        FrugalAdamW(groups(Tiny(), density=1.5))
    with pytest.raises(ValueError, match="inactive_update_rule"):
        FrugalAdamW(groups(Tiny(), density=0.5, inactive_update_rule="adam"))


# ------------------------------------------------------------------------------------------------ checkpoints
OPTIMIZERS = [
    (GaLoreAdamW, {"rank": 4, "update_proj_gap": 3}),
    (GaLoreAdamW, {"rank": 4, "update_proj_gap": 3, "projector": "random"}),
    (GaLoreAdamW, {"rank": 4, "update_proj_gap": 3, "projector": "dct"}),
    (FiraAdamW, {"rank": 4, "update_proj_gap": 3}),
    (FiraAdamW, {"rank": 4, "update_proj_gap": 3, "projector": "dct"}),
    (FrugalAdamW, {"density": 0.25, "update_proj_gap": 3}),
    (FrugalAdamW, {"density": 0.25, "update_proj_gap": 3, "projector": "dct", "inactive_update_rule": "sgd"}),
    (FrugalAdamW, {"density": 0.5, "update_proj_gap": 2, "projector": "blocks", "block_order": "descending"}),
]
IDS = [f"{cls.__name__}-{o.get('projector', 'svd')}" for cls, o in OPTIMIZERS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,options", OPTIMIZERS, ids=IDS)
def test_resume_is_bit_identical_and_weights_only(cls, options, dtype):
    full = Tiny(dtype)
    opt = cls(groups(full, **options), lr=1e-2)
    train(full, opt, 10, dtype=dtype)

    part = Tiny(dtype)
    opt = cls(groups(part, **options), lr=1e-2)
    train(part, opt, 5, dtype=dtype)
    buf_m, buf_o = io.BytesIO(), io.BytesIO()
    torch.save(part.state_dict(), buf_m)
    torch.save(opt.state_dict(), buf_o)
    buf_m.seek(0)
    buf_o.seek(0)
    resumed = Tiny(dtype)
    resumed.load_state_dict(torch.load(buf_m, weights_only=True))
    opt2 = cls(groups(resumed, **options), lr=1e-2)
    opt2.load_state_dict(torch.load(buf_o, weights_only=True))
    for state in opt2.state.values():
        if "dct_indices" in state:
            assert state["dct_indices"].dtype == torch.int64  # not cast to the parameter dtype
    train(resumed, opt2, 5, start=5, dtype=dtype)
    assert torch.equal(flat(resumed), flat(full))
    assert torch.isfinite(flat(full)).all()


@pytest.mark.parametrize("cls,options", OPTIMIZERS, ids=IDS)
def test_training_reduces_the_loss(cls, options):
    model = Tiny()
    opt = cls(groups(model, **options), lr=1e-2)
    x, y = batch(0)
    before = float(nn.functional.mse_loss(model(x), y).detach())
    for _ in range(40):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert float(nn.functional.mse_loss(model(x), y)) < 0.5 * before


def test_state_is_smaller_than_adamw():
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False))
    opt = GaLoreAdamW([{"params": list(model.parameters()), "rank": 64}])
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    adamw = 2 * sum(p.numel() * 4 for p in model.parameters())
    # moments r x n twice plus the r x n basis: 3 * 64 * 256 per matrix = 3/8 of AdamW's 2 * 256 * 256
    assert opt.state_bytes() == 2 * (3 * 64 * 256 * 4)
    assert opt.state_bytes() <= 0.45 * adamw


def test_constructor_options_are_group_defaults():
    """DESIGN's form: GaLoreAdamW(params, lr=..., rank=..., projector=...) projects every matrix."""
    model = Tiny()
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_proj_gap=5, scale=0.5, projector="dct")
    assert opt.param_groups[0]["rank"] == 4 and opt.param_groups[0]["projector"] == "dct"
    train(model, opt, 2)
    assert "dct_indices" in opt.state[model.a.weight] and "dct_indices" not in opt.state[model.a.bias]
    twin = Tiny()
    explicit = GaLoreAdamW([{"params": list(twin.parameters()), "rank": 4, "update_proj_gap": 5, "scale": 0.5,
                             "projector": "dct"}], lr=1e-2)
    train(twin, explicit, 2)
    assert torch.equal(flat(model), flat(twin))
    frugal = FrugalAdamW(groups(Tiny(), density=None), lr=1e-3, density=0.25, state_free="signsgd")
    assert frugal.param_groups[0]["inactive_update_rule"] == "sign_sgd"  # the group without density: defaults
    assert frugal.param_groups[1]["density"] is None  # density=None opts a group out
    assert FiraAdamW(Tiny().parameters(), rank=4, scale=0.5).param_groups[0]["alpha"] == 0.5
    with pytest.raises(ValueError, match="unknown options"):
        GaLoreAdamW(Tiny().parameters(), rank=4, projecter="svd")


# ------------------------------------------------------------------------------------------------ stability
def _perturbation_mlp():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _train_perturbed(cls, options, noise: float):
    """8 steps on a 64-48-48-32 MLP, refresh every 3; every gradient times (1 + noise * N(0, 1))."""
    model = _perturbation_mlp()
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = cls([{"params": others}, {"params": matrices, **options, "update_proj_gap": 3}], lr=1e-2)
    noise_gen = torch.Generator().manual_seed(5)
    for step in range(8):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 64, generator=gen), torch.randn(16, 32, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            p.grad.mul_(1 + noise * torch.randn(p.shape, generator=noise_gen))
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


PERTURBED = [(cls, {**key, "projector": projector})
             for cls, key in [(GaLoreAdamW, {"rank": 8}), (FiraAdamW, {"rank": 8}), (FrugalAdamW, {"density": 0.25})]
             for projector in ("svd", "random", "dct")] + [(FrugalAdamW, {"density": 0.25, "projector": "blocks"})]


@pytest.mark.parametrize("cls,options", PERTURBED, ids=[f"{c.__name__}-{o['projector']}" for c, o in PERTURBED])
def test_a_tiny_gradient_perturbation_moves_the_weights_tinily(cls, options):
    """1e-7 relative noise on every gradient moves the final weights by <= 1e-4 relative, for every
    optimizer and projector: the trajectory is a continuous function of the gradients (svd bases
    have their signs aligned at each refresh)."""
    clean = _train_perturbed(cls, options, 0.0)
    noisy = _train_perturbed(cls, options, 1e-7)
    assert float((clean - noisy).abs().max() / clean.abs().max()) <= 1e-4


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW])
def test_raw_svd_signs_are_chaotic_and_aligned_ones_are_not(cls):
    """svd_signs='raw' (galore-torch's behaviour) lets a rounding-level change flip a singular
    vector, and the Adam moments carried across the refresh then point the wrong way."""
    raw = {"rank": 8, "projector": "svd", "svd_signs": "raw"}
    moved = _train_perturbed(cls, raw, 0.0) - _train_perturbed(cls, raw, 1e-7)
    assert float(moved.abs().max() / _train_perturbed(cls, raw, 0.0).abs().max()) > 1e-3


def test_aligned_svd_basis_is_sign_canonical_and_follows_the_previous_one():
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(30, 12, generator=gen)
    for side in (pj.RIGHT, pj.LEFT):
        basis = pj.svd_basis(grad, 4, side)
        first = pj.align_signs(basis, None, side)
        assert torch.equal(pj.align_signs(-basis, None, side), first)  # independent of the routine's signs
        vectors = pj.basis_vectors(first, side)
        assert (vectors.gather(1, vectors.abs().argmax(1, keepdim=True)) > 0).all()
        nearby = pj.svd_basis(grad + 1e-3 * torch.randn(grad.shape, generator=gen), 4, side)
        for flipped in (nearby, -nearby):
            aligned = pj.align_signs(flipped, first, side)
            assert (pj.alignment_dots(aligned, first, side) > 0.9).all()
            torch.testing.assert_close(aligned @ aligned.t() if side == pj.RIGHT else aligned.t() @ aligned,
                                       torch.eye(4), atol=1e-5, rtol=0)  # still orthonormal
    with pytest.raises(ValueError, match="svd_signs"):
        GaLoreAdamW(groups(Tiny(), rank=4, svd_signs="maybe"))


@pytest.mark.parametrize("cls,options", OPTIMIZERS, ids=IDS)
def test_a_non_finite_gradient_skips_the_step_and_keeps_the_state(cls, options):
    """Without a GradScaler in front, a NaN gradient would stick in Adam's moments forever: the
    step is skipped whole (weights, moments, bases and counts unchanged) and counted."""
    model, twin = Tiny(), Tiny()
    opt, twin_opt = cls(groups(model, **options), lr=1e-2), cls(groups(twin, **options), lr=1e-2)
    train(model, opt, 4)
    train(twin, twin_opt, 4)
    x, y = batch(99)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model.a.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.stats()["skipped_steps"] == 1
    assert torch.equal(flat(model), flat(twin))
    train(model, opt, 3, start=4)  # and training goes on exactly as if the step had not happened
    train(twin, twin_opt, 3, start=4)
    assert torch.equal(flat(model), flat(twin)) and torch.isfinite(flat(model)).all()
