"""Sequential gradient coding schemes (Krishnan, Ebrahimi, Khisti; ICLR 2023): SR-SGC and M-SGC.

Jobs t = 0..J-1 (one per round) must be decoded by the end of round t + T. Each scheme says which
mini-task every worker runs in every round, adapting to the stragglers seen so far, and decodes each
job from the results that arrived. :meth:`simulate` runs a straggler pattern through the schedule
with real vector arithmetic (float64 partial gradients), so a test can check that every job decodes
to the exact full gradient by its deadline and that the work per round equals the formula load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from commlib.coding.codes import CyclicRepetition, FractionalRepetition, GradientCode, Undecodable
from commlib.coding.stragglers import StragglerModel


def make_code(n: int, s: int, kind: str = "auto", seed: int = 0) -> GradientCode:
    """FRC when (s+1) | n (exact decoding) unless ``kind="cyclic"``; cyclic otherwise."""
    if kind not in ("auto", "frc", "cyclic"):
        raise ValueError(f"kind must be 'auto', 'frc' or 'cyclic', got {kind!r}")
    if kind == "frc" or (kind == "auto" and n % (s + 1) == 0):
        return FractionalRepetition(n, s)
    return CyclicRepetition(n, s, seed=seed)


@dataclass
class Simulation:
    """What :meth:`simulate` found: per job the decode round (or None) and the max abs error."""

    decoded_round: list = field(default_factory=list)
    max_error: list = field(default_factory=list)
    work: np.ndarray | None = None  # (rounds, n): fraction of one job's data each worker processed

    @property
    def all_decoded(self) -> bool:
        return all(r is not None for r in self.decoded_round)

    def record(self, round_: int | None, decoded=None, exact=None) -> None:
        """One job's outcome: decoded in ``round_`` (None: not decodable by its deadline)."""
        self.decoded_round.append(round_)
        self.max_error.append(math.inf if round_ is None else float(np.abs(decoded - exact).max()))


def decode_sum(code: GradientCode, survivors, partial: np.ndarray) -> np.ndarray:
    """What the master decodes from the survivors' coded messages of ``partial`` (n, d) partial
    gradients: ``sum_i a_i f_i``; raises :class:`Undecodable`."""
    a = code.decode(survivors)
    messages = np.stack([code.encode(i, partial) for i in range(code.n)])
    return a @ messages


class GCScheme:
    """Plain gradient coding (T = 0): job t runs in round t only and needs <= s stragglers."""

    def __init__(self, n: int, s: int, code: str = "auto", seed: int = 0):
        self.n, self.s = n, s
        self.code = make_code(n, s, code, seed)
        self.T = 0

    @property
    def normalized_load(self) -> float:
        return (self.s + 1) / self.n

    def simulate(self, pattern, jobs: int, dim: int = 4, seed: int = 0) -> Simulation:
        p = np.asarray(pattern, dtype=bool)
        rng = np.random.default_rng(seed)
        out = Simulation(work=np.zeros((jobs, self.n)))
        for t in range(jobs):
            g = rng.standard_normal((self.n, dim))
            alive = [i for i in range(self.n) if not p[t, i]]
            out.work[t, :] = self.normalized_load
            try:
                out.record(t, decode_sum(self.code, alive, g), g.sum(0))
            except Undecodable:
                out.record(None)
        return out


class SRSGC:
    """Selective-repeat SGC: GC(n, s) with s = ceil(B lam / (W - 1 + B)), delay T = B, load (s+1)/n.

    Round r: every worker runs its GC task of job r, except that if job r - B has v > s missing
    results, v - s of its missing workers (lowest index first) repeat their job-(r - B) task instead.
    Job t is decoded at the end of round t + B from its results of rounds t and t + B.

    Example::

        >>> scheme = SRSGC(n=8, B=1, W=3, lam=4)
        >>> scheme.T, scheme.s, scheme.normalized_load
        (1, 2, 0.375)
    """

    def __init__(self, n: int, B: int, W: int, lam: int, code: str = "auto", seed: int = 0):
        self.model = StragglerModel(B, W, lam)
        if (W - 1) % B:
            raise ValueError(f"SR-SGC needs B | (W - 1), got B={B}, W={W}")
        self.n, self.B, self.W, self.lam = n, B, W, lam
        self.s = min(n - 1, self.parameter_s(B, W, lam))
        self.code = make_code(n, self.s, code, seed)
        self.T = B

    @staticmethod
    def parameter_s(B: int, W: int, lam: int) -> int:
        """``s = ceil(B lam / (W - 1 + B))`` (Krishnan et al., Sec. 3)."""
        return math.ceil(B * lam / (W - 1 + B))

    @property
    def normalized_load(self) -> float:
        return (self.s + 1) / self.n

    def simulate(self, pattern, jobs: int, dim: int = 4, seed: int = 0) -> Simulation:
        p = np.asarray(pattern, dtype=bool)
        rounds = jobs + self.T
        if p.shape[0] < rounds:
            raise ValueError(f"pattern needs {rounds} rounds for {jobs} jobs, has {p.shape[0]}")
        rng = np.random.default_rng(seed)
        grads = [rng.standard_normal((self.n, dim)) for _ in range(jobs)]
        arrived: list[set] = [set() for _ in range(jobs)]
        out = Simulation(work=np.zeros((rounds, self.n)))
        for r in range(rounds):
            task = {i: r for i in range(self.n)} if r < jobs else {}
            t_back = r - self.B
            if 0 <= t_back < jobs:
                missing = [i for i in range(self.n) if i not in arrived[t_back]]
                for i in missing[: max(0, len(missing) - self.s)]:
                    task[i] = t_back
            for i, job in task.items():
                out.work[r, i] = self.normalized_load
                if not p[r, i]:
                    arrived[job].add(i)
            if 0 <= t_back < jobs:
                self._decode(t_back, r, arrived, grads, out)
        return out

    def _decode(self, t, r, arrived, grads, out: Simulation) -> None:
        try:
            out.record(r, decode_sum(self.code, arrived[t], grads[t]), grads[t].sum(0))
        except Undecodable:
            out.record(None)


class MSGC:
    """Multiplexed SGC: each job's data is split into an uncoded part D1 (each worker's piece in W-1
    chunks) and a coded part D2 (B groups, each GC-coded against lam stragglers). Every round each
    worker runs W - 1 + B equal mini-tasks, one per in-flight job t = r - m: slot m < W-1 is D1 chunk
    m of job t; slot m >= W-1 is job t's D2 group m-(W-1), unless the worker still owes a D1 chunk of
    job t, which it then redoes. Delay T = W - 2 + B; load
    (lam+1)(W-1+B) / (n (B + (W-1)(lam+1))) (lam < n).

    Example::

        >>> scheme = MSGC(n=8, B=1, W=3, lam=4)
        >>> scheme.T, round(scheme.normalized_load * 8, 4)
        (2, 1.3636)
    """

    def __init__(self, n: int, B: int, W: int, lam: int, code: str = "auto", seed: int = 0):
        self.model = StragglerModel(B, W, lam)
        if W < 2:
            raise ValueError(f"M-SGC needs W >= 2, got {W}")
        if lam >= n:
            raise ValueError(f"lam must be < n for M-SGC's coded part, got lam={lam}, n={n}")
        self.n, self.B, self.W, self.lam = n, B, W, lam
        self.code = make_code(n, lam, code, seed)
        self.T = W - 2 + B
        self.d1_fraction = (lam + 1) * (W - 1) / (B + (lam + 1) * (W - 1))
        self.task_size = self.d1_fraction / (n * (W - 1))  # = (lam+1)(1-x)/(nB): equal mini-tasks

    @staticmethod
    def load_formula(n: int, B: int, W: int, lam: int) -> float:
        """``(lam+1)(W-1+B) / (n (B + (W-1)(lam+1)))`` for lam < n, ``(W-1+B)/(n(W-1))`` for lam = n."""
        if lam >= n:
            return (W - 1 + B) / (n * (W - 1))
        return (lam + 1) * (W - 1 + B) / (n * (B + (W - 1) * (lam + 1)))

    @property
    def normalized_load(self) -> float:
        return self.load_formula(self.n, self.B, self.W, self.lam)

    def simulate(self, pattern, jobs: int, dim: int = 4, seed: int = 0) -> Simulation:
        p = np.asarray(pattern, dtype=bool)
        n, W, B = self.n, self.W, self.B
        rounds = jobs + self.T
        if p.shape[0] < rounds:
            raise ValueError(f"pattern needs {rounds} rounds for {jobs} jobs, has {p.shape[0]}")
        rng = np.random.default_rng(seed)
        # job t: D1 chunk gradients (n workers x W-1 chunks) and D2 part gradients (B groups x n parts)
        d1 = [rng.standard_normal((n, W - 1, dim)) for _ in range(jobs)]
        d2 = [rng.standard_normal((B, n, dim)) for _ in range(jobs)]
        d1_done = [np.zeros((n, W - 1), dtype=bool) for _ in range(jobs)]
        d2_arrived = [[set() for _ in range(B)] for _ in range(jobs)]
        out = Simulation(work=np.zeros((rounds, n)))
        for r in range(rounds):
            for i in range(n):
                for m in range(W - 1 + B):
                    t = r - m
                    if not 0 <= t < jobs:
                        continue
                    out.work[r, i] += self.task_size
                    if m < W - 1:
                        chunk = m
                    else:
                        owed = np.flatnonzero(~d1_done[t][i])
                        chunk = int(owed[0]) if len(owed) else None
                    if p[r, i]:
                        continue
                    if chunk is not None:
                        d1_done[t][i, chunk] = True
                    else:
                        d2_arrived[t][m - (W - 1)].add(i)
            t = r - self.T
            if 0 <= t < jobs:
                self._decode(t, r, d1, d2, d1_done, d2_arrived, out)
        return out

    def _decode(self, t, r, d1, d2, d1_done, d2_arrived, out: Simulation) -> None:
        if not d1_done[t].all():
            out.record(None)
            return
        try:
            total = d1[t].sum(axis=(0, 1)) + sum(decode_sum(self.code, d2_arrived[t][k], d2[t][k])
                                                 for k in range(self.B))
        except Undecodable:
            out.record(None)
            return
        out.record(r, total, d1[t].sum(axis=(0, 1)) + d2[t].sum(axis=(0, 1)))
