"""Gradient codes (Tandon, Lei, Dimakis, Karampatziakis; ICML 2017): recover sum_j g_j from any n - s workers.

Worker i computes the partial gradients g_j of the data parts with ``B[i, j] != 0`` and sends
``f_i = sum_j B[i, j] g_j``. For survivors F, decoding finds ``a`` with ``a_F^T B_F = 1^T`` and returns
``sum_{i in F} a_i f_i = sum_j g_j``. Everything is float64.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from commlib.validation import integer


class Undecodable(ValueError):
    """The surviving workers' results do not determine the full gradient."""


def _check_ns(n, s) -> None:
    integer("n", n, 1)
    integer("s", s, 0, n - 1, why=" (at most n - 1 stragglers)")


class GradientCode:
    """An encoding matrix ``B`` (n x n, float64) and its decoder."""

    def __init__(self, n: int, s: int, matrix: np.ndarray):
        self.n, self.s = n, s
        self.B = np.asarray(matrix, dtype=np.float64)
        self.B.setflags(write=False)

    def parts(self, i: int) -> list[int]:
        """The data parts worker ``i`` computes (the support of row i)."""
        return [int(j) for j in np.flatnonzero(self.B[i])]

    @property
    def normalized_load(self) -> float:
        """Fraction of the data each worker processes per job: ``(s + 1) / n``."""
        return max(len(self.parts(i)) for i in range(self.n)) / self.n

    def decode(self, survivors) -> np.ndarray:
        """Coefficients ``a`` (n,), zero for stragglers, with ``a @ B == 1``; raises :class:`Undecodable`."""
        alive = sorted({int(i) for i in survivors})
        if any(not 0 <= i < self.n for i in alive):
            raise ValueError(f"survivors must be worker indices in [0, {self.n}), got {alive}")
        if not alive:
            raise Undecodable("no worker's result arrived")
        sub = self.B[alive]  # |F| x n
        coeffs, *_ = np.linalg.lstsq(sub.T, np.ones(self.n), rcond=None)
        residual = np.abs(coeffs @ sub - 1.0).max()
        if not residual <= 1e-8 * max(1.0, np.abs(coeffs).max()):
            raise Undecodable(f"{self.n - len(alive)} stragglers: the surviving rows do not span the all-ones vector "
                              f"(residual {residual:.2e}); this code tolerates {self.s}")
        out = np.zeros(self.n)
        out[alive] = coeffs
        return out

    def encode(self, i: int, partial_gradients) -> np.ndarray:
        """Worker i's message ``sum_j B[i, j] g_j`` from all partial gradients (rows of a (n, d) array)."""
        g = np.asarray(partial_gradients, dtype=np.float64)
        return self.B[i] @ g


class FractionalRepetition(GradientCode):
    """Fractional repetition (Tandon et al., Sec. 3): n/(s+1) groups of s+1 workers share s+1 parts.

    Needs (s+1) | n. Decoding takes one survivor per group with coefficient 1: exact in floating point.

    Example::

        >>> code = FractionalRepetition(n=6, s=2)
        >>> code.parts(4)
        [3, 4, 5]
        >>> code.decode([0, 4]).tolist()
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    """

    def __init__(self, n: int, s: int):
        _check_ns(n, s)
        if n % (s + 1):
            raise ValueError(f"fractional repetition needs (s+1) | n, got n={n}, s={s}")
        size = s + 1
        matrix = np.zeros((n, n))
        for g in range(n // size):
            matrix[g * size:(g + 1) * size, g * size:(g + 1) * size] = 1.0
        super().__init__(n, s, matrix)

    def decode(self, survivors) -> np.ndarray:
        alive = sorted({int(i) for i in survivors})
        if any(not 0 <= i < self.n for i in alive):
            raise ValueError(f"survivors must be worker indices in [0, {self.n}), got {alive}")
        out = np.zeros(self.n)
        size = self.s + 1
        for g in range(self.n // size):
            members = [i for i in alive if i // size == g]
            if not members:
                raise Undecodable(f"every worker of group {g} ({g * size}..{(g + 1) * size - 1}) straggled")
            out[members[0]] = 1.0
        return out


def cyclic_matrix(n: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """Tandon et al.'s Algorithm 2: rows supported on {i, ..., i+s} mod n, all in null(H) with H 1 = 0."""
    if s == 0:
        return np.eye(n)
    h = rng.standard_normal((s, n))
    h[:, -1] = -h[:, :-1].sum(axis=1)
    matrix = np.zeros((n, n))
    for i in range(n):
        support = [(i + k) % n for k in range(s + 1)]
        rest = support[1:]
        matrix[i, i] = 1.0
        matrix[i, rest] = np.linalg.solve(h[:, rest], -h[:, i])
    return matrix


class CyclicRepetition(GradientCode):
    """Cyclic repetition (Tandon et al., Alg. 2): worker i holds parts i..i+s (mod n); any n - s decode.

    The random construction is drawn from ``seed``; among ``tries`` draws the one whose worst
    straggler pattern (all of them when there are at most 400, a sample otherwise) is best
    conditioned is kept. The sample shrinks as n^-3 beyond n = 32 (each check is an SVD of an
    (n - s) x n matrix), so n = 256 builds in well under a second; patterns are never enumerated
    when there are more than 400 (C(256, 16) is ~10^25).

    Example::

        >>> code = CyclicRepetition(n=8, s=2)
        >>> a = code.decode([0, 1, 2, 4, 5, 7])
        >>> bool(abs(a @ code.B - 1).max() < 1e-9)
        True
    """

    def __init__(self, n: int, s: int, seed: int = 0, tries: int = 8):
        _check_ns(n, s)
        rng = np.random.default_rng(seed)
        if math.comb(n, s) <= 400:
            patterns = list(itertools.combinations(range(n), s))
        else:
            samples = max(4, min(400, int(400 * (32 / n) ** 3)))
            patterns = [tuple(rng.choice(n, s, replace=False)) for _ in range(samples)]
        best, best_cond = None, math.inf
        for _ in range(max(1, tries)):
            candidate = cyclic_matrix(n, s, rng)
            worst = 0.0
            for stragglers in patterns:
                alive = [i for i in range(n) if i not in stragglers]
                worst = max(worst, np.linalg.cond(candidate[alive]))
            if worst < best_cond:
                best, best_cond = candidate, worst
        self.condition = best_cond
        super().__init__(n, s, best)
