"""The (B, W, lambda)-bursty straggler model of sequential gradient coding (Krishnan et al., ICLR 2023).

A pattern is a (rounds, n) 0/1 array, 1 = worker straggles in that round. It follows the model when

1. (spatial) every window of W consecutive rounds has at most lambda distinct stragglers, and
2. (temporal) inside any window of W rounds a worker's straggling rounds form one burst of at most B
   rounds: a worker straggling in round r did not straggle in rounds [r - W + 1, r - B].
"""

from __future__ import annotations

import numpy as np

from commlib.validation import integer


def _as_pattern(pattern) -> np.ndarray:
    p = np.asarray(pattern)
    if p.ndim != 2:
        raise ValueError(f"pattern must be a (rounds, n) array, got shape {p.shape}")
    return p.astype(bool)


def _rng(generator) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(generator)


class StragglerModel:
    """``StragglerModel(B, W, lam)``: ``check(pattern)`` and ``sample(n, rounds, generator)``.

    Example::

        >>> model = StragglerModel(B=2, W=5, lam=3)
        >>> pattern = model.sample(8, 40, generator=0)
        >>> model.check(pattern)
        True
    """

    def __init__(self, B: int, W: int, lam: int):
        for name, value, low in (("B", B, 1), ("W", W, 1), ("lam", lam, 0)):
            integer(name, value, low)
        if B > W:
            raise ValueError(f"B must be <= W, got B={B}, W={W}")
        self.B, self.W, self.lam = B, W, lam

    def violations(self, pattern) -> list[str]:
        """Human-readable reasons a pattern breaks the model (empty when it follows it)."""
        p = _as_pattern(pattern)
        rounds = p.shape[0]
        out = []
        for start in range(max(1, rounds - self.W + 1)):
            window = p[start:start + self.W]
            distinct = int(window.any(axis=0).sum())
            if distinct > self.lam:
                out.append(f"rounds {start}..{start + len(window) - 1}: {distinct} distinct stragglers > {self.lam}")
        for r, i in zip(*np.nonzero(p)):
            early = p[max(0, r - self.W + 1): max(0, r - self.B + 1), i]
            if early.any():
                out.append(f"worker {i} straggles in round {r} and in [{r - self.W + 1}, {r - self.B}]")
        return out

    def check(self, pattern) -> bool:
        return not self.violations(pattern)

    def allows(self, history, stragglers) -> bool:
        """Whether round r = len(history) may have straggler set ``stragglers`` after the rounds
        ``history`` (a list of straggler sets), i.e. the windows ending at r still follow the model."""
        r = len(history)
        window = history[max(0, r - self.W + 1):]
        if len(set(stragglers).union(*window)) > self.lam:
            return False
        early = history[max(0, r - self.W + 1): max(0, r - self.B + 1)]
        return not any(i in rows for rows in early for i in stragglers)

    def sample(self, n: int, rounds: int, generator=None, start_probability: float = 0.15) -> np.ndarray:
        """A random pattern that follows the model: bursts start with ``start_probability`` per worker
        and round, last up to B rounds, and are kept only when the model allows them."""
        rng = _rng(generator)
        p = np.zeros((rounds, n), dtype=np.int8)
        burst_left = np.zeros(n, dtype=int)
        for r in range(rounds):
            order = rng.permutation(n)
            for i in order:
                wants = burst_left[i] > 0 or rng.random() < start_probability
                if not wants:
                    continue
                p[r, i] = 1
                lo = max(0, r - self.W + 1)
                if not self.check(p[lo:r + 1]):
                    p[r, i] = 0
                    burst_left[i] = 0
                    continue
                burst_left[i] = (burst_left[i] - 1) if burst_left[i] > 0 else int(rng.integers(0, self.B))
        return p
