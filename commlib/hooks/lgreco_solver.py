"""L-GreCo's pure math (Markov et al., MLSys 2024): per-layer compression errors and the knapsack DP.

Given, for each layer l and candidate setting k, the compression error ``E[l, k]`` (L2 norm of
what compression loses on the layer's accumulated gradient) and the bytes ``S[l, k]`` it sends,
choose one setting per layer to

    minimise  sum_l S[l, k_l]   subject to   sum_l E[l, k_l] <= budget,

with ``budget = alpha * sum_l E[l, default]`` (the uniform default setting's total error).
Errors are discretised into ``buckets`` units of ``budget / buckets``, rounded *up*, so a plan
the DP accepts never exceeds the budget in real numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------
# compression error of each candidate on one (accumulated) gradient
def lowrank_errors(matrix: torch.Tensor, ranks: list[int]) -> list[float]:
    """Best rank-k error ``sqrt(sum_{i>k} s_i^2)`` (Eckart-Young), what PowerSGD approaches."""
    s = torch.linalg.svdvals(matrix.double())
    tail = torch.flip(torch.cumsum(torch.flip(s.pow(2), [0]), 0), [0])  # tail[i] = sum_{j>=i} s_j^2
    tail = torch.cat([tail, tail.new_zeros(1)])
    return [math.sqrt(max(tail[min(k, s.numel())].item(), 0.0)) for k in ranks]


def topk_errors(values: torch.Tensor, counts: list[int]) -> list[float]:
    """Error of keeping the k largest magnitudes: ``sqrt(sum of the rest squared)``."""
    sq = torch.sort(values.double().reshape(-1).pow(2), descending=True).values
    kept = torch.cat([sq.new_zeros(1), torch.cumsum(sq, 0)])
    total = kept[-1].item()
    return [math.sqrt(max(total - kept[min(k, sq.numel())].item(), 0.0)) for k in counts]


def qsgd_errors(values: torch.Tensor, bits_list: list[int], bucket_size: int) -> list[float]:
    """Expected error of QSGD's stochastic rounding: ``sqrt(sum h^2 f (1 - f))``, step ``h = 2s/L``."""
    flat = values.double().reshape(-1)
    n = flat.numel()
    buckets = -(-n // bucket_size)
    padded = torch.nn.functional.pad(flat, (0, buckets * bucket_size - n)).view(buckets, bucket_size)
    scale = padded.abs().amax(dim=1, keepdim=True)
    out = []
    for bits in bits_list:
        levels = 2**bits - 1
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        t = (padded / safe + 1) * levels / 2
        frac = t - torch.floor(t)
        step = 2 * scale / levels
        out.append(math.sqrt((step.pow(2) * frac * (1 - frac)).sum().item()))
    return out


# ---------------------------------------------------------------------------------------------
def solve(errors: np.ndarray, sizes: np.ndarray, budget: float, buckets: int = 10_000) -> np.ndarray:
    """Choice per layer minimising total size with total (discretised, rounded-up) error <= budget.

    ``errors`` and ``sizes`` are ``(layers, candidates)``; returns int choices ``(layers,)``, or
    raises ``ValueError`` when even the smallest errors exceed the budget. O(L K buckets).
    """
    errors = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    layers, candidates = errors.shape
    if budget <= 0:
        units = np.where(errors <= 0, 0, buckets + 1).astype(np.int64)
    else:
        units = np.ceil(np.nan_to_num(errors, nan=np.inf, posinf=np.inf) / (budget / buckets) - 1e-12)
        units = np.clip(units, 0, buckets + 1).astype(np.int64)  # buckets+1 = never fits
    inf = np.inf
    best = np.full(buckets + 1, inf)  # best[e] = min size with total error units exactly e
    best[0] = 0.0
    choice = np.zeros((layers, buckets + 1), dtype=np.int32)
    for layer in range(layers):
        new = np.full(buckets + 1, inf)
        pick = np.zeros(buckets + 1, dtype=np.int32)
        for k in range(candidates):
            u = units[layer, k]
            if u > buckets:
                continue
            shifted = np.full(buckets + 1, inf)
            shifted[u:] = best[: buckets + 1 - u] + sizes[layer, k]
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = k
        best = new
        choice[layer] = pick
    if not np.isfinite(best).any():
        raise ValueError("no setting of the candidates meets the error budget")
    e = int(np.argmin(best))  # smallest size; ties -> least error
    plan = np.zeros(layers, dtype=np.int64)
    for layer in range(layers - 1, -1, -1):
        k = int(choice[layer, e])
        plan[layer] = k
        e -= int(units[layer, k])
    return plan


def plan_with_fallback(errors: np.ndarray, sizes: np.ndarray, default: np.ndarray, alpha: float,
                       buckets: int = 10_000) -> tuple[np.ndarray, float]:
    """The DP's plan, or the uniform default when that is smaller (rounding can cost the DP a little).

    Returns ``(plan, budget)``. With ``alpha >= 1`` the default always meets the budget, so the
    result never sends more than the default. When nothing meets the budget (``alpha < 1`` and
    too small), every layer takes its most accurate candidate.
    """
    layers = np.arange(errors.shape[0])
    budget = alpha * float(errors[layers, default].sum())
    try:
        plan = solve(errors, sizes, budget, buckets)
    except ValueError:
        return np.argmin(errors, axis=1).astype(np.int64), budget
    if alpha >= 1 and sizes[layers, plan].sum() > sizes[layers, default].sum():
        return default.copy(), budget
    return plan, budget
