"""L-GreCo's DP against brute force, its budget guarantee, and the per-candidate error formulas."""

import itertools

import numpy as np
import pytest
import torch

from commlib import compress
from commlib.hooks.lgreco_solver import lowrank_errors, plan_with_fallback, qsgd_errors, solve, topk_errors


def brute_force(errors, sizes, budget, buckets):
    units = np.ceil(errors / (budget / buckets) - 1e-12)
    best, best_plan = np.inf, None
    for plan in itertools.product(range(errors.shape[1]), repeat=errors.shape[0]):
        rows = np.arange(errors.shape[0])
        if units[rows, plan].sum() <= buckets and sizes[rows, plan].sum() < best:
            best, best_plan = sizes[rows, plan].sum(), plan
    return best, best_plan


@pytest.mark.parametrize("seed", range(30))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers, candidates = rng.integers(1, 6), rng.integers(1, 5)
    # error falls as size grows, as for real compressors
    sizes = np.sort(rng.integers(1, 1000, size=(layers, candidates)).astype(float), axis=1)
    errors = np.sort(rng.random((layers, candidates)) * 10, axis=1)[:, ::-1].copy()
    budget = errors[np.arange(layers), rng.integers(0, candidates, layers)].sum() * rng.uniform(0.8, 1.5)
    buckets = 200
    want, _ = brute_force(errors, sizes, budget, buckets)
    if not np.isfinite(want):
        with pytest.raises(ValueError):
            solve(errors, sizes, budget, buckets)
        return
    plan = solve(errors, sizes, budget, buckets)
    rows = np.arange(layers)
    assert sizes[rows, plan].sum() == want
    assert errors[rows, plan].sum() <= budget * (1 + 1e-12)  # rounding up keeps the real error in budget


def test_fallback_never_worse_than_uniform_and_most_accurate_when_infeasible():
    errors = np.array([[3.0, 1.0, 0.5], [2.0, 1.5, 0.1]])
    sizes = np.array([[10.0, 20.0, 40.0], [10.0, 20.0, 40.0]])
    default = np.array([1, 1])
    plan, budget = plan_with_fallback(errors, sizes, default, alpha=1.0)
    rows = np.arange(2)
    assert budget == pytest.approx(2.5)
    assert sizes[rows, plan].sum() <= sizes[rows, default].sum()
    assert errors[rows, plan].sum() <= budget
    plan, _ = plan_with_fallback(errors, sizes, default, alpha=0.01)
    assert plan.tolist() == [2, 2]


def test_error_formulas_match_the_compressors():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(40, 30, generator=gen)
    # low rank: rank-k truncated SVD error
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    for k, err in zip([1, 5, 30], lowrank_errors(m, [1, 5, 30])):
        approx = (u[:, :k] * s[:k]) @ vh[:k]
        assert err == pytest.approx((m.double() - approx).norm().item(), rel=1e-9, abs=1e-9)
    # top-k: exactly what TopK drops
    for density, err in zip([0.1, 0.5], topk_errors(m, [120, 600])):
        c = compress.TopK(density)
        assert err == pytest.approx((c.decompress(c.compress(m)) - m).double().norm().item(), rel=1e-6)
    # qsgd: the expected squared error, checked by Monte Carlo over seeds
    for bits, err in zip([2, 4], qsgd_errors(m, [2, 4], 64)):
        c = compress.QSGD(bits, 64)
        mc = np.mean([(c.decompress(c.compress(m, seed=s)) - m).double().pow(2).sum().item() for s in range(300)])
        assert err**2 == pytest.approx(mc, rel=0.05)
