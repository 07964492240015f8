"""Coded data-parallel runtime: one master and n workers, gradient coding with deadlines.

The master runs a :class:`~commlib.coding.sequential.Schedule` (GC, SR-SGC or M-SGC). Each round it
sends every worker the round's mini-tasks and the parameters of the job that starts in that round;
workers compute real gradients of a real model on their data parts, send their coded combinations,
and the master closes the round at a deadline: ``(1 + mu)`` times the first arrival (Krishnan et al.'s
straggler rule), or later if the missing workers would break the scheme's guarantee (the straggler
model, or a job due this round that does not decode yet). Results of closed rounds arrive late and
are dropped. Jobs decode in float64 as soon as their results suffice, at the latest by their
deadline; job t trains model ``t % models`` on its next batch, so ``models >= T + 1`` models train
concurrently, as in the paper.

A worker that crashes (gloo reports the broken connection) or stays silent for ``dead_after``
seconds is declared dead. It stays a straggler for good: the run goes on while every due job still
decodes (e.g. GC with s >= 1), otherwise the master stops all workers and raises
:class:`StragglerFailure` naming the job, the dead workers and the code's tolerance. Nothing waits
without a bound.

Example (one master and 4 workers under ``torchrun --nproc-per-node 5`` or ``mpiexec -n 5``)::

    >>> scheme = coding.MSGC(n=4, B=1, W=2, lam=1)                             # doctest: +SKIP
    >>> problem = workloads.coded.digits_problem(models=scheme.T + 1, batch=2 * scheme.batch_unit)  # doctest: +SKIP
    >>> transport = runtime.transport_for(rank, n=4)            # gloo, or MPITransport(comm, peers) # doctest: +SKIP
    >>> if rank == 0:    # doctest: +SKIP
    ...     result = runtime.Master(transport, scheme, problem, jobs=30).run()
    ... else:
    ...     runtime.Worker(transport, scheme, problem, worker=rank - 1).run()
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from commlib.coding.codes import Undecodable
from commlib.coding.sequential import CHUNK, CODED, Task
from commlib.coding.transport import FAILED
from commlib.validation import integer, number

ROUND, RESULT, STOP, HELLO = 1, 2, 3, 4
_KIND_CODES = {CODED: 0, CHUNK: 1}
_KINDS = {v: k for k, v in _KIND_CODES.items()}


def transport_for(rank: int, n: int, group=None):
    """The gloo transport of the master (rank 0, talks to ranks 1..n) or of a worker (talks to 0)."""
    from commlib.coding.transport import GlooTransport

    return GlooTransport(range(1, n + 1) if rank == 0 else [0], group)


class StragglerFailure(RuntimeError):
    """A job could not be decoded by its deadline (more failures than the code tolerates)."""

    def __init__(self, message: str, result: "RunResult"):
        super().__init__(message)
        self.result = result

    def __reduce__(self):
        return type(self), (str(self), self.result)


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Problem:
    """``models`` copies of one architecture trained concurrently; job t trains model ``t % models``
    on its ``t // models``-th batch of ``batch`` samples (a fresh seeded permutation every epoch).

    Gradients are of the *summed* loss, so a job's full gradient is the sum of its part gradients;
    the update uses the mean (sum / batch). Part gradients run on one thread, so the same part gives
    the same bits in every process.

    Example::

        >>> build = lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        >>> x, y = torch.rand(1000, 64), torch.randint(0, 10, (1000,))
        >>> problem = Problem(build, x, y, batch=64, models=2)
        >>> problem.batch_indices(3).shape, problem.dimension
        ((64,), 2410)
    """

    def __init__(self, build_model, inputs: torch.Tensor, targets: torch.Tensor, batch: int, *,
                 models: int = 1, lr: float = 0.1, momentum: float = 0.0, seed: int = 0,
                 held_out: tuple[torch.Tensor, torch.Tensor] | None = None):
        integer("models", models, 1)
        integer("batch", batch, 1, len(inputs), why=" (the number of training samples)")
        number("lr", lr, low=0, low_open=True)
        number("momentum", momentum, low=0, high=1, high_open=True)
        self.build_model, self.inputs, self.targets = build_model, inputs, targets
        self.batch, self.models, self.lr, self.momentum, self.seed = batch, models, lr, momentum, seed
        self.held_out = held_out
        self.dimension = sum(p.numel() for p in self.model(0).parameters())

    def model(self, m: int) -> nn.Module:
        """Model m with its initial weights (seeded; the global RNG is left alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1000 + m)
            return self.build_model()

    def optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), lr=self.lr, momentum=self.momentum)

    def batch_indices(self, t: int) -> np.ndarray:
        m, k = t % self.models, t // self.models
        per_epoch = len(self.inputs) // self.batch
        epoch, step = divmod(k, per_epoch)
        order = np.random.default_rng([self.seed, m, epoch]).permutation(len(self.inputs))
        return order[step * self.batch:(step + 1) * self.batch]

    def part_gradient(self, module: nn.Module, flat: torch.Tensor, t: int, start: int, stop: int) -> np.ndarray:
        """float64 gradient of the summed loss over samples ``start:stop`` of job t's batch at ``flat``."""
        idx = torch.from_numpy(self.batch_indices(t)[start:stop])
        with _threads(1):
            nn.utils.vector_to_parameters(flat, module.parameters())
            loss = nn.functional.cross_entropy(module(self.inputs[idx]), self.targets[idx], reduction="sum")
            grads = torch.autograd.grad(loss, list(module.parameters()))
        return torch.cat([g.reshape(-1) for g in grads]).double().numpy()

    def held_out_loss(self, module: nn.Module) -> float:
        if self.held_out is None:
            return float("nan")
        with torch.no_grad():
            return float(nn.functional.cross_entropy(module(self.held_out[0]), self.held_out[1]))


def part_offsets(scheme, batch: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(scheme.part_sizes(batch))])


def task_result(scheme, problem: Problem, module: nn.Module, worker: int, task: Task, flat: torch.Tensor,
                offsets: np.ndarray) -> np.ndarray:
    """Worker's result of one mini-task: ``sum_p c_p g_p`` over the task's parts, float64."""
    out = None
    for part, coefficient in scheme.task_parts(worker, task):
        g = problem.part_gradient(module, flat, task.job, int(offsets[part]), int(offsets[part + 1]))
        g = g if coefficient == 1.0 else coefficient * g
        out = g if out is None else out + g
    return out


def apply_gradient(module: nn.Module, optimizer: torch.optim.Optimizer, gradient_sum: np.ndarray, batch: int) -> None:
    """One optimizer step with the mean gradient ``gradient_sum / batch`` (float64 -> parameter dtype)."""
    flat = torch.from_numpy(gradient_sum / batch)
    offset = 0
    for p in module.parameters():
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reference_training(scheme, problem: Problem, jobs: int) -> list[torch.Tensor]:
    """Uncoded training on the same data: job t's gradient is the float64 sum of all its part
    gradients in part order. Returns each model's flat parameters."""
    scheme.check_batch(problem.batch)
    offsets = part_offsets(scheme, problem.batch)
    modules = [problem.model(m) for m in range(problem.models)]
    optimizers = [problem.optimizer(module) for module in modules]
    scratch = problem.model(0)
    for t in range(jobs):
        m = t % problem.models
        flat = nn.utils.parameters_to_vector(modules[m].parameters()).detach()
        total = 0
        for part in range(len(offsets) - 1):
            total = total + problem.part_gradient(scratch, flat, t, int(offsets[part]), int(offsets[part + 1]))
        apply_gradient(modules[m], optimizers[m], total, problem.batch)
    return [nn.utils.parameters_to_vector(module.parameters()).detach() for module in modules]


class DelayProfile:
    """Injected straggling: a worker that processed a fraction ``work`` of a job's batch in round r
    sleeps ``job_seconds * work * (1 + Exp(jitter)) * (slowdown if bursts[r, worker] else 1)``.
    The exponential draw is seeded by (seed, round, worker): the same in every process, global RNG
    untouched. ``bursts`` is a (rounds, n) 0/1 array, e.g. ``StragglerModel.sample``.

    Example::

        >>> DelayProfile(1.0, jitter=0.0, slowdown=4.0, bursts=[[0, 1]]).seconds(1, 0, 0.25)
        1.0
    """

    def __init__(self, job_seconds: float, *, jitter: float = 0.1, slowdown: float = 5.0, bursts=None, seed: int = 0):
        if not job_seconds >= 0:
            raise ValueError(f"job_seconds must be >= 0, got {job_seconds!r}")
        if not jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {jitter!r}")
        if not slowdown >= 1:
            raise ValueError(f"slowdown must be >= 1, got {slowdown!r}")
        self.job_seconds, self.jitter, self.slowdown, self.seed = job_seconds, jitter, slowdown, seed
        self.bursts = None if bursts is None else np.asarray(bursts, dtype=bool)

    def bursting(self, worker: int, r: int) -> bool:
        return self.bursts is not None and r < len(self.bursts) and bool(self.bursts[r, worker])

    def seconds(self, worker: int, r: int, work: float) -> float:
        noise = np.random.default_rng([self.seed, r, worker]).exponential(self.jitter) if self.jitter else 0.0
        factor = (1.0 + noise) * (self.slowdown if self.bursting(worker, r) else 1.0)
        return self.job_seconds * work * factor


def _round_message(r: int, new_job: int, tasks: list[Task]) -> np.ndarray:
    meta = [r, new_job, len(tasks)]
    for task in tasks:
        meta += [task.job, _KIND_CODES[task.kind], task.index]
    return np.asarray(meta, dtype=np.int64)


def _parse_tasks(meta: np.ndarray, start: int, count: int, stride: int) -> list[Task]:
    return [Task(int(meta[start + k * stride]), _KINDS[int(meta[start + k * stride + 1])],
                 int(meta[start + k * stride + 2])) for k in range(count)]


class MalformedMessage(ValueError):
    """A message whose layout does not match what its kind promises: its sender is declared dead."""


def _checked_tasks(meta: np.ndarray, start: int, stride: int, what: str) -> list[Task]:
    """The tasks of a ROUND (stride 3) or RESULT (stride 4) message, after checking its layout:
    the count, the length it implies and every task kind."""
    if meta.ndim != 1 or meta.size < start:
        raise MalformedMessage(f"{what}: {meta.size} header values, expected at least {start}")
    count = int(meta[start - 1])
    if count < 0 or meta.size != start + stride * count:
        raise MalformedMessage(f"{what}: {meta.size} header values for {count} tasks "
                               f"(expected {start + stride * count})")
    kinds = [int(meta[start + k * stride + 1]) for k in range(count)]
    if any(kind not in _KINDS for kind in kinds):
        raise MalformedMessage(f"{what}: unknown task kinds {sorted(set(kinds) - set(_KINDS))}")
    return _parse_tasks(meta, start, count, stride)


def check_result(meta: np.ndarray, payload: np.ndarray, expected: list[Task], vector_size: int) -> list[np.ndarray]:
    """A RESULT message's vectors, one per task, after checking that it answers ``expected`` with
    finite-size vectors of ``vector_size`` values each (a short payload would otherwise be split
    and applied to the model)."""
    tasks = _checked_tasks(meta, 2, 4, "RESULT")
    if tasks != expected:
        raise MalformedMessage(f"RESULT answers tasks {tasks}, expected {expected}")
    if payload.ndim != 1 or payload.size != vector_size * len(tasks):
        raise MalformedMessage(f"RESULT carries {payload.size} values for {len(tasks)} tasks of {vector_size}")
    return np.split(payload, len(tasks)) if tasks else []


class Worker:
    """Worker ``worker`` (0-based; its transport rank is ``worker + 1``): computes the mini-tasks of the
    newest round it has (older rounds still queued are stale and skipped), sleeps the injected delay
    (the work's emulated duration, less the real compute time), sends one message per round. A new
    message arriving while it works means the master closed the round: the worker abandons it, as
    its result could only arrive late. ``compute_repeats > 1`` makes it a really slow process (it computes
    every result that many times); ``die_at_round`` makes it crash (``os._exit``) on receiving that
    round, for failure tests."""

    def __init__(self, transport, scheme, problem: Problem, worker: int, *, delays: DelayProfile | None = None,
                 compute_repeats: int = 1, die_at_round: int | None = None, idle_timeout: float = 600.0):
        if not 0 <= worker < scheme.n:
            raise ValueError(f"worker must be in [0, {scheme.n}), got {worker!r}")
        integer("compute_repeats", compute_repeats, 1)
        scheme.check_batch(problem.batch)
        self.transport, self.scheme, self.problem, self.worker = transport, scheme, problem, worker
        self.delays, self.compute_repeats, self.die_at_round = delays, compute_repeats, die_at_round
        self.idle_timeout = idle_timeout
        self.rounds_computed = self.rounds_skipped = self.rounds_abandoned = 0
        self._held = None

    def run(self) -> dict:
        scheme, problem = self.scheme, self.problem
        offsets = part_offsets(scheme, problem.batch)
        module = problem.model(0)
        params: dict[int, torch.Tensor] = {}
        self.transport.post(0, HELLO, [self.worker])  # ready: the master's silence clock starts now
        while True:
            message = self._next(self.idle_timeout)
            while message is not None and (queued := self._next(0)) is not None:
                self._absorb(message, params)  # a newer round is queued: this one is closed already
                self.rounds_skipped += 1
                message = queued
            if message is None or message.kind != ROUND:
                break
            try:
                tasks = _checked_tasks(message.meta, 3, 3, "ROUND")
            except MalformedMessage:
                break  # the master's messages cannot be trusted any more: stop, it sees this worker go silent
            r = self._absorb(message, params)
            if self.die_at_round is not None and r >= self.die_at_round:
                os._exit(17)
            if tasks and not self._compute_and_send(r, tasks, params, module, offsets):
                self.rounds_abandoned += 1
        if hasattr(self.transport, "flush"):
            self.transport.flush()
        return {"rounds_computed": self.rounds_computed, "rounds_skipped": self.rounds_skipped,
                "rounds_abandoned": self.rounds_abandoned}

    def _compute_and_send(self, r, tasks, params, module, offsets) -> bool:
        """Compute, sleep the injected delay, send; False when the master moved on meanwhile (a newer
        message arrived: this round's result would only be dropped as late)."""
        scheme, problem = self.scheme, self.problem
        start = time.monotonic()
        vectors, meta, samples = [], [r, len(tasks)], 0
        for task in tasks:
            for _ in range(self.compute_repeats):
                vector = task_result(scheme, problem, module, self.worker, task, params[task.job], offsets)
            vectors.append(vector)
            size = scheme.task_samples(self.worker, task, problem.batch)
            samples += size
            meta += [task.job, _KIND_CODES[task.kind], task.index, size]
            if self._interrupted(0.0):
                return False
        if self.delays is not None:
            delay = self.delays.seconds(self.worker, r, samples / problem.batch) - (time.monotonic() - start)
            if self._interrupted(delay):
                return False
        self.transport.post(0, RESULT, meta, np.concatenate(vectors))
        self.rounds_computed += 1
        return True

    def _interrupted(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when a message arrived meanwhile (held for the next round)."""
        end = time.monotonic() + seconds
        while self._held is None:
            left = end - time.monotonic()
            self._held = self.transport.poll(max(0.0, left))
            if left <= 0:
                break
        return self._held is not None

    def _next(self, timeout: float):
        if self._held is not None:
            message, self._held = self._held, None
        else:
            message = self.transport.poll(timeout)
        if message is None or message.kind == FAILED:
            return None
        return message

    def _absorb(self, message, params: dict) -> int:
        r, new_job = int(message.meta[0]), int(message.meta[1])
        if new_job >= 0:
            params[new_job] = torch.from_numpy(message.payload.copy())
        for job in [j for j in params if j < r - self.scheme.T]:
            del params[job]
        return r


@dataclass
class RunResult:
    parameters: list = field(default_factory=list)  # flat float32 per model
    wall_seconds: float = 0.0
    round_seconds: list = field(default_factory=list)
    stragglers: list = field(default_factory=list)  # per round: workers whose result missed the round
    waited_rounds: int = 0  # rounds kept open past the (1 + mu) deadline to keep the guarantee
    late_results: int = 0
    dead: dict = field(default_factory=dict)  # worker -> (round, reason)
    decoded_round: list = field(default_factory=list)
    work: np.ndarray | None = None  # (rounds, n) fraction of a job's batch assigned
    held_out_loss: list = field(default_factory=list)
    failure: str | None = None

    def summary(self) -> dict:
        return {"wall_seconds": self.wall_seconds, "rounds": len(self.round_seconds),
                "median_round_seconds": float(np.median(self.round_seconds)) if self.round_seconds else None,
                "straggler_rounds": sum(1 for s in self.stragglers if s),
                "stragglers_total": sum(len(s) for s in self.stragglers), "waited_rounds": self.waited_rounds,
                "late_results": self.late_results, "dead": {str(k): list(v) for k, v in self.dead.items()},
                "decoded_round": self.decoded_round, "held_out_loss": self.held_out_loss, "failure": self.failure}


class Master:
    """Runs ``jobs`` jobs of ``scheme`` over ``scheme.n`` workers (transport ranks 1..n).

    ``mu``: a round closes once ``(1 + mu) x`` the first result's time has passed and the missing
    workers are tolerable; ``mu=None`` waits for every live worker (no straggler is ever declared).
    ``dead_after``: seconds of silence after which a worker is declared dead; the clock starts
    when the worker reports ready (``startup_timeout`` bounds the wait for that, default 300 s).
    """

    def __init__(self, transport, scheme, problem: Problem, jobs: int, *, mu: float | None = 0.2,
                 dead_after: float = 30.0, startup_timeout: float = 300.0, log=None):
        integer("jobs", jobs, 1)
        if mu is not None:
            number("mu", mu, low=0, why=" (or None)")
        number("dead_after", dead_after, low=0, low_open=True, finite=False, why=" (seconds)")
        number("startup_timeout", startup_timeout, low=0, low_open=True, finite=False, why=" (seconds)")
        if problem.models < scheme.T + 1:
            raise ValueError(f"problem.models must be >= T + 1 = {scheme.T + 1} for this scheme, so that a "
                             f"model's next job starts after its previous one is decoded; got {problem.models}")
        scheme.check_batch(problem.batch)
        self.transport, self.scheme, self.problem, self.jobs = transport, scheme, problem, jobs
        self.mu, self.dead_after, self.startup_timeout, self.log = mu, dead_after, startup_timeout, log

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)

    def run(self) -> RunResult:
        scheme, problem, n = self.scheme, self.problem, self.scheme.n
        schedule = scheme.schedule(self.jobs)
        modules = [problem.model(m) for m in range(problem.models)]
        self.vector_size = sum(p.numel() for p in modules[0].parameters())  # every result vector's length
        optimizers = [problem.optimizer(module) for module in modules]
        out = RunResult(work=np.zeros((schedule.rounds, n)), decoded_round=[None] * self.jobs)
        results: dict[tuple, np.ndarray] = {}
        pending = list(range(self.jobs))
        last_seen = self._await_workers(out)
        begin = time.monotonic()
        try:
            for r in range(schedule.rounds):
                start = time.monotonic()
                assignment = schedule.assign(r)
                self._send_round(r, assignment, modules, out)
                arrived = self._collect(r, schedule, assignment, pending, last_seen, out)
                schedule.observe(r, assignment, arrived)
                for w, vectors in arrived.items():
                    for task, vector in zip(assignment[w], vectors):
                        results[(task.job, task.kind, task.index, w)] = vector
                self._decode(r, schedule, pending, results, modules, optimizers, out)
                out.round_seconds.append(time.monotonic() - start)
        except StragglerFailure as failure:
            out.failure = str(failure)
            self._say(f"stopping: {failure}")
            raise
        finally:
            out.wall_seconds = time.monotonic() - begin
            for w in range(n):
                if w not in out.dead:
                    self.transport.post(w + 1, STOP, [])
            if hasattr(self.transport, "flush"):
                self.transport.flush(5.0)
            out.parameters = [nn.utils.parameters_to_vector(m.parameters()).detach() for m in modules]
            out.held_out_loss = [problem.held_out_loss(m) for m in modules]
        return out

    def _await_workers(self, out: RunResult) -> dict[int, float]:
        """Wait (bounded) until every worker said it is ready; returns when each was last heard."""
        n = self.scheme.n
        last_seen: dict[int, float] = {}
        end = time.monotonic() + self.startup_timeout
        while len(last_seen) + len(out.dead) < n:
            message = self.transport.poll(max(0.0, end - time.monotonic()))
            if message is None:
                for w in sorted(set(range(n)) - last_seen.keys() - out.dead.keys()):
                    self._declare_dead(w, 0, f"not ready after {self.startup_timeout:.0f} s", out)
                break
            w = message.src - 1
            if message.kind == FAILED:  # before or after its hello: it will not work
                last_seen.pop(w, None)
                self._declare_dead(w, 0, "connection lost before start: " + message.error.splitlines()[0][:120], out)
            elif message.kind == HELLO:
                last_seen[w] = time.monotonic()
        now = time.monotonic()
        return {w: last_seen.get(w, now) for w in range(n)}

    def _send_round(self, r, assignment, modules, out: RunResult) -> None:
        new_job = r if r < self.jobs else -1
        payload = None
        if new_job >= 0:
            module = modules[new_job % self.problem.models]
            payload = nn.utils.parameters_to_vector(module.parameters()).detach().numpy()
        for w in range(self.scheme.n):
            tasks = assignment.get(w, [])
            out.work[r, w] = sum(self.scheme.task_samples(w, t, self.problem.batch) for t in tasks) / self.problem.batch
            if w not in out.dead:
                self.transport.post(w + 1, ROUND, _round_message(r, new_job, tasks), payload)

    def _declare_dead(self, w: int, r: int, reason: str, out: RunResult) -> None:
        out.dead[w] = (r, reason)
        self._say(f"round {r}: worker {w} declared dead ({reason}); it stays a straggler from now on")

    def _collect(self, r, schedule, assignment, pending, last_seen, out: RunResult) -> dict[int, list]:
        """Receive round r's results until the round may close; returns {worker: [vectors]}."""
        expect = {w for w, tasks in assignment.items() if tasks}
        due = [t for t in pending if t + self.scheme.T == r]
        arrived: dict[int, list] = {}
        start, first, waited = time.monotonic(), None, False
        while True:
            missing = expect - arrived.keys() - out.dead.keys()
            if not missing:
                break
            now = time.monotonic()
            deadline = None if first is None or self.mu is None else start + (first - start) * (1 + self.mu)
            if deadline is not None and now >= deadline:
                if self._tolerable(r, schedule, assignment, expect, arrived, due, out):
                    break
                waited = True
            # silent: nothing heard since this round's work was sent or since its last message
            heard = {w: max(last_seen[w], start) for w in missing}
            for w in sorted(missing):
                if now - heard[w] > self.dead_after:
                    self._declare_dead(w, r, f"silent for {now - heard[w]:.1f} s", out)
            if missing - out.dead.keys() != missing:
                continue
            horizon = min(heard[w] + self.dead_after for w in missing) - now
            if deadline is not None and deadline > now:
                horizon = min(horizon, deadline - now)
            message = self.transport.poll(max(0.0, horizon) + 1e-3)
            if message is None:
                continue
            w = message.src - 1
            if not 0 <= w < self.scheme.n:
                continue  # not one of this run's workers
            if message.kind == FAILED:
                if w not in out.dead:
                    self._declare_dead(w, r, "connection lost: " + message.error.splitlines()[0][:120], out)
                continue
            last_seen[w] = time.monotonic()
            if message.kind != RESULT:
                continue
            if message.meta.size < 2:
                self._declare_dead(w, r, f"malformed message (RESULT with {message.meta.size} header values)", out)
                continue
            if int(message.meta[0]) != r or w not in expect or w in arrived:
                out.late_results += 1
                continue
            try:
                arrived[w] = check_result(message.meta, message.payload, assignment[w], self.vector_size)
            except MalformedMessage as bad:  # never applied to a model: the sender is out
                self._declare_dead(w, r, f"malformed message ({bad})", out)
                continue
            if first is None:
                first = time.monotonic()
        out.waited_rounds += int(waited)
        out.stragglers.append(sorted(expect - arrived.keys()))
        return arrived

    def _tolerable(self, r, schedule, assignment, expect, arrived, due, out: RunResult) -> bool:
        dead = set(out.dead)
        stragglers = expect - arrived.keys() - dead
        history = [rows - dead for rows in schedule.stragglers]
        model = getattr(self.scheme, "model", None)
        if model is not None and not model.allows(history[:r], stragglers):
            return False
        extra = [(t.job, t.kind, t.index, w) for w in arrived for t in assignment[w]]
        return all(schedule.ready(t, extra) for t in due)

    def _decode(self, r, schedule, pending, results, modules, optimizers, out: RunResult) -> None:
        for t in list(pending):
            try:
                combination = schedule.combination(t)
            except Undecodable as error:
                if t + self.scheme.T <= r:
                    dead = ", ".join(f"{w} (round {v[0]})" for w, v in sorted(out.dead.items())) or "none"
                    raise StragglerFailure(
                        f"job {t} cannot be decoded by its deadline (round {r}): {error}. Dead workers: {dead}; "
                        f"stragglers this round: {out.stragglers[-1]}", out) from None
                continue
            gradient = 0
            for key, coefficient in combination.items():
                gradient = gradient + (results[key] if coefficient == 1.0 else coefficient * results[key])
            m = t % self.problem.models
            apply_gradient(modules[m], optimizers[m], gradient, self.problem.batch)
            out.decoded_round[t] = r
            pending.remove(t)
            schedule.forget(t)
            for key in [k for k in results if k[0] == t]:
                del results[key]


def make_scheme(name: str, n: int, *, s: int = 1, B: int = 1, W: int = 2, lam: int = 1, code: str = "auto"):
    """``uncoded`` (GC with s = 0), ``gc`` (GC(n, s)), ``srsgc`` or ``msgc`` (from B, W, lam)."""
    from commlib.coding.sequential import MSGC, SRSGC, GCScheme

    if name == "uncoded":
        return GCScheme(n, 0)
    if name == "gc":
        return GCScheme(n, s, code)
    if name == "srsgc":
        return SRSGC(n, B, W, lam, code)
    if name == "msgc":
        return MSGC(n, B, W, lam, code)
    raise ValueError(f"scheme must be one of uncoded, gc, srsgc, msgc; got {name!r}")


def parameters_digest(parameters) -> str:
    import hashlib

    digest = hashlib.sha256()
    for flat in parameters:
        digest.update(flat.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()
