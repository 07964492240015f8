"""Gradient coding schedules: plain GC (Tandon et al., ICML 2017) and sequential GC (Krishnan,
Ebrahimi, Khisti; ICLR 2023): SR-SGC and M-SGC.

Jobs t = 0..J-1 start one per round and must be decoded by the end of round t + T. A scheme says how
a job's batch is cut into parts (:meth:`part_sizes`), which mini-tasks every worker runs in every
round (:meth:`Schedule.assign`, adapting to the stragglers seen so far), which parts with which
coefficients a mini-task combines (:meth:`task_parts`), and which linear combination of the arrived
results is the job's full gradient (:meth:`Schedule.combination`). The same :class:`Schedule` drives
:meth:`simulate` (a straggler pattern through the schedule with real float64 vector arithmetic) and
the master/worker runtime of :mod:`commlib.coding.runtime`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from commlib.coding.codes import CyclicRepetition, FractionalRepetition, GradientCode, Undecodable
from commlib.coding.stragglers import StragglerModel
from commlib.validation import integer

CODED, CHUNK = "coded", "chunk"


def make_code(n: int, s: int, kind: str = "auto", seed: int = 0) -> GradientCode:
    """FRC when (s+1) | n (exact decoding) unless ``kind="cyclic"``; cyclic otherwise."""
    if kind not in ("auto", "frc", "cyclic"):
        raise ValueError(f"kind must be 'auto', 'frc' or 'cyclic', got {kind!r}")
    if kind == "frc" or (kind == "auto" and n % (s + 1) == 0):
        return FractionalRepetition(n, s)
    return CyclicRepetition(n, s, seed=seed)


@dataclass(frozen=True)
class Task:
    """One mini-task: ``kind`` CODED = the worker's coded message for D2 group ``index`` of ``job``
    (GC and SR-SGC have one group, 0); CHUNK = the worker's uncoded D1 chunk ``index`` (M-SGC)."""

    job: int
    kind: str
    index: int


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


class Schedule:
    """The books of one run of ``jobs`` jobs: which results arrived and who straggled in each round.

    ``assign(r)`` -> {worker: [Task]}; ``observe(r, assignment, delivered)`` after round r closes;
    ``combination(t)`` -> {(job, kind, index, worker): coefficient} whose sum of coefficient x result
    is job t's full gradient (raises :class:`Undecodable`); whether round r may close
    with a straggler set is the scheme's ``model.allows(history, stragglers)`` (SR-SGC, M-SGC).
    """

    def __init__(self, scheme, jobs: int):
        integer("jobs", jobs, 1)
        self.scheme, self.jobs = scheme, jobs
        self.rounds = jobs + scheme.T
        self.arrived: set[tuple] = set()
        self.stragglers: list[set[int]] = []  # per closed round
        self.decoded: set[int] = set()  # jobs whose books were dropped by forget()

    def assign(self, r: int) -> dict[int, list[Task]]:
        return self.scheme._assign(self, r)

    def observe(self, r: int, assignment: dict[int, list[Task]], delivered) -> None:
        if r != len(self.stragglers):
            raise ValueError(f"rounds must be observed in order: expected {len(self.stragglers)}, got {r}")
        delivered = set(delivered)
        for worker, tasks in assignment.items():
            if worker in delivered:
                self.arrived.update((task.job, task.kind, task.index, worker) for task in tasks)
        self.stragglers.append({w for w, tasks in assignment.items() if tasks and w not in delivered})

    def combination(self, t: int, extra=()) -> dict[tuple, float]:
        """Coefficients of job t's decoding from the arrived results (plus ``extra`` keys)."""
        arrived = self.arrived | set(extra) if extra else self.arrived
        return self.scheme._combination(t, arrived)

    def ready(self, t: int, extra=()) -> bool:
        if t in self.decoded:
            return True
        try:
            self.combination(t, extra)
        except Undecodable:
            return False
        return True

    def forget(self, t: int) -> None:
        """Drop job t's books once it is decoded (it then counts as ready)."""
        self.decoded.add(t)
        self.arrived = {key for key in self.arrived if key[0] != t}


class _Scheme:
    """What every scheme shares: the part layout, the work accounting and :meth:`simulate`."""

    n: int
    T: int
    code: GradientCode

    def schedule(self, jobs: int) -> Schedule:
        return Schedule(self, jobs)

    def check_batch(self, batch: int) -> None:
        unit = self.batch_unit
        integer("batch", batch, unit, why=f" and a multiple of {unit} for {type(self).__name__}(n={self.n})")
        if batch % unit:
            raise ValueError(f"batch must be a positive multiple of {unit} for {type(self).__name__}"
                             f"(n={self.n}), got {batch!r}")

    def task_samples(self, worker: int, task: Task, batch: int) -> int:
        sizes = self.part_sizes(batch)
        return sum(sizes[p] for p, _ in self.task_parts(worker, task))

    def _coded_parts(self, worker: int, group: int, offset: int) -> list[tuple[int, float]]:
        return [(offset + group * self.n + j, float(self.code.B[worker, j])) for j in self.code.parts(worker)]

    def _decode_group(self, t: int, group: int, arrived) -> dict[tuple, float]:
        survivors = [w for w in range(self.n) if (t, CODED, group, w) in arrived]
        try:
            a = self.code.decode(survivors)
        except Undecodable as error:
            raise Undecodable(f"job {t}, coded group {group}: {error}") from None
        return {(t, CODED, group, w): float(a[w]) for w in survivors if a[w] != 0.0}

    def simulate(self, pattern, jobs: int, dim: int = 4, seed: int = 0) -> Simulation:
        """Run a (rounds, n) straggler pattern (1 = straggles) through the schedule with real
        float64 arithmetic: random part gradients, coded results, decoding at each job's deadline."""
        p = np.asarray(pattern, dtype=bool)
        schedule = self.schedule(jobs)
        if p.shape[0] < schedule.rounds:
            raise ValueError(f"pattern needs {schedule.rounds} rounds for {jobs} jobs, has {p.shape[0]}")
        batch = self.batch_unit
        sizes = self.part_sizes(batch)
        rng = np.random.default_rng(seed)
        parts = [rng.standard_normal((len(sizes), dim)) for _ in range(jobs)]
        results: dict[tuple, np.ndarray] = {}
        out = Simulation(work=np.zeros((schedule.rounds, self.n)))
        for r in range(schedule.rounds):
            assignment = schedule.assign(r)
            delivered = {w for w in assignment if not p[r, w]}
            for w, tasks in assignment.items():
                for task in tasks:
                    out.work[r, w] += self.task_samples(w, task, batch) / batch
                    if w in delivered:
                        results[(task.job, task.kind, task.index, w)] = sum(
                            c * parts[task.job][part] for part, c in self.task_parts(w, task))
            schedule.observe(r, assignment, delivered)
            t = r - self.T
            if 0 <= t < jobs:
                try:
                    combo = schedule.combination(t)
                except Undecodable:
                    out.record(None)
                    continue
                out.record(r, sum(c * results[key] for key, c in combo.items()), parts[t].sum(0))
        return out


class GCScheme(_Scheme):
    """Plain gradient coding (T = 0): job t runs in round t only, on n parts, and needs <= s
    stragglers. ``GCScheme(n, 0)`` is uncoded data parallelism (wait for all).

    Example::

        >>> scheme = GCScheme(n=6, s=2)
        >>> scheme.normalized_load, scheme.task_parts(4, Task(0, CODED, 0))
        (0.5, [(3, 1.0), (4, 1.0), (5, 1.0)])
    """

    def __init__(self, n: int, s: int, code: str = "auto", seed: int = 0):
        self.code = make_code(n, s, code, seed)
        self.n, self.s = n, s
        self.T = 0

    @property
    def normalized_load(self) -> float:
        return (self.s + 1) / self.n

    @property
    def batch_unit(self) -> int:
        return self.n

    def part_sizes(self, batch: int) -> list[int]:
        return [batch // self.n] * self.n

    def task_parts(self, worker: int, task: Task) -> list[tuple[int, float]]:
        return self._coded_parts(worker, 0, 0)

    def _assign(self, schedule: Schedule, r: int) -> dict[int, list[Task]]:
        return {w: [Task(r, CODED, 0)] for w in range(self.n)} if r < schedule.jobs else {}

    def _combination(self, t: int, arrived) -> dict[tuple, float]:
        return self._decode_group(t, 0, arrived)


class SRSGC(GCScheme):
    """Selective-repeat SGC: GC(n, s) with s = ceil(B lam / (W - 1 + B)), delay T = B, load (s+1)/n.

    Round r: every worker runs its GC task of job r, except that if job r - B has v > s missing
    results (and is not decodable already), v - s of its missing workers (lowest index first) repeat
    their job-(r - B) task instead. Job t is decoded by the end of round t + B.

    Example::

        >>> scheme = SRSGC(n=8, B=1, W=3, lam=4)
        >>> scheme.T, scheme.s, scheme.normalized_load
        (1, 2, 0.375)
    """

    def __init__(self, n: int, B: int, W: int, lam: int, code: str = "auto", seed: int = 0):
        self.model = StragglerModel(B, W, lam)
        if (W - 1) % B:
            raise ValueError(f"SR-SGC needs B | (W - 1), got B={B}, W={W}")
        super().__init__(n, min(n - 1, self.parameter_s(B, W, lam)), code, seed)
        self.B, self.W, self.lam = B, W, lam
        self.T = B

    @staticmethod
    def parameter_s(B: int, W: int, lam: int) -> int:
        """``s = ceil(B lam / (W - 1 + B))`` (Krishnan et al., Sec. 3)."""
        return math.ceil(B * lam / (W - 1 + B))

    def _assign(self, schedule: Schedule, r: int) -> dict[int, list[Task]]:
        tasks = super()._assign(schedule, r)
        t_back = r - self.B
        if 0 <= t_back < schedule.jobs and not schedule.ready(t_back):
            missing = [w for w in range(self.n) if (t_back, CODED, 0, w) not in schedule.arrived]
            for w in missing[: max(0, len(missing) - self.s)]:
                tasks[w] = [Task(t_back, CODED, 0)]
        return tasks


class MSGC(_Scheme):
    """Multiplexed SGC: each job's data is split into an uncoded part D1 (each worker's piece in W-1
    chunks) and a coded part D2 (B groups, each GC-coded against lam stragglers). Every round each
    worker runs W - 1 + B equal mini-tasks, one per in-flight job t = r - m: slot m < W-1 is D1 chunk
    m of job t; slot m >= W-1 is job t's D2 group m-(W-1), unless the worker still owes a D1 chunk of
    job t, which it then redoes. Delay T = W - 2 + B; load
    (lam+1)(W-1+B) / (n (B + (W-1)(lam+1))) (lam < n).

    Parts of a batch of N = n K u samples (K = B + (lam+1)(W-1)): n(W-1) D1 chunks of (lam+1)u
    samples (worker i's chunk c is part i(W-1)+c), then B groups of n D2 parts of u samples.

    Example::

        >>> scheme = MSGC(n=8, B=1, W=3, lam=4)
        >>> scheme.T, round(scheme.normalized_load * 8, 4), scheme.batch_unit
        (2, 1.3636, 88)
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

    @staticmethod
    def load_formula(n: int, B: int, W: int, lam: int) -> float:
        """``(lam+1)(W-1+B) / (n (B + (W-1)(lam+1)))`` for lam < n, ``(W-1+B)/(n(W-1))`` for lam = n."""
        if lam >= n:
            return (W - 1 + B) / (n * (W - 1))
        return (lam + 1) * (W - 1 + B) / (n * (B + (W - 1) * (lam + 1)))

    @property
    def normalized_load(self) -> float:
        return self.load_formula(self.n, self.B, self.W, self.lam)

    @property
    def batch_unit(self) -> int:
        return self.n * (self.B + (self.lam + 1) * (self.W - 1))

    def part_sizes(self, batch: int) -> list[int]:
        u = batch // self.batch_unit
        return [(self.lam + 1) * u] * (self.n * (self.W - 1)) + [u] * (self.B * self.n)

    def task_parts(self, worker: int, task: Task) -> list[tuple[int, float]]:
        if task.kind == CHUNK:
            return [(worker * (self.W - 1) + task.index, 1.0)]
        return self._coded_parts(worker, task.index, self.n * (self.W - 1))

    def _assign(self, schedule: Schedule, r: int) -> dict[int, list[Task]]:
        W, B = self.W, self.B
        tasks: dict[int, list[Task]] = {}
        for w in range(self.n):
            mine = []
            for m in range(W - 1 + B):
                t = r - m
                if not 0 <= t < schedule.jobs:
                    continue
                if m < W - 1:
                    mine.append(Task(t, CHUNK, m))
                    continue
                owed = [c for c in range(W - 1) if (t, CHUNK, c, w) not in schedule.arrived]
                mine.append(Task(t, CHUNK, owed[0]) if owed else Task(t, CODED, m - (W - 1)))
            if mine:
                tasks[w] = mine
        return tasks

    def _combination(self, t: int, arrived) -> dict[tuple, float]:
        combo = {}
        for w in range(self.n):
            for c in range(self.W - 1):
                key = (t, CHUNK, c, w)
                if key not in arrived:
                    raise Undecodable(f"job {t}: worker {w}'s uncoded chunk {c} never arrived")
                combo[key] = 1.0
        for group in range(self.B):
            combo.update(self._decode_group(t, group, arrived))
        return combo

