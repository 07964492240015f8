"""The coded master/worker runtime: parity with uncoded training, masked stragglers, dead workers, MPI."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from commlib import coding
from commlib.coding import runtime
from tests.conftest import run_world
from workloads.coded import digits_problem

TIMEOUT = 120
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def _train(rank, world, scheme, jobs, batch, models, master_kwargs, worker_kwargs):
    problem = digits_problem(models=models, batch=batch)
    transport = runtime.transport_for(rank, scheme.n)
    if rank == 0:
        master = runtime.Master(transport, scheme, problem, jobs, **master_kwargs)
        try:
            return master.run()
        except runtime.StragglerFailure as failure:
            return failure
    kwargs = dict(worker_kwargs.get(rank - 1, {}))
    if kwargs.pop("absent", False):
        time.sleep(60)  # alive, connected, but never starts working
        return None
    malformed = kwargs.pop("malformed", None)
    cls = runtime.Worker if malformed is None else _malformed_worker(*malformed)
    return cls(transport, scheme, problem, rank - 1, **kwargs).run()


def _malformed_worker(kind: str, at_round: int):
    """A worker whose message of round ``at_round`` is malformed: a RESULT with a short payload
    ("short"), or a header announcing a negative payload, sent raw over gloo ("header")."""

    class Malformed(runtime.Worker):
        def _compute_and_send(self, r, tasks, params, module, offsets):
            if r != at_round:
                return super()._compute_and_send(r, tasks, params, module, offsets)
            if kind == "short":
                meta = [r, len(tasks)] + [v for t in tasks for v in (t.job, runtime._KIND_CODES[t.kind], t.index, 1)]
                self.transport.post(0, runtime.RESULT, meta, np.zeros(3, dtype=np.float32))
            else:
                import torch.distributed as dist

                self.transport.flush()
                dist.send(torch.tensor([runtime.RESULT, 2, -5, 0], dtype=torch.int64), 0)
            time.sleep(30)  # then stays quiet: the master must not wait for it
            return True

    return Malformed


def train(scheme, jobs, *, batch=None, models=None, master_kwargs=None, worker_kwargs=None, may_die=()):
    batch = batch or 2 * scheme.batch_unit
    models = models or scheme.T + 1
    out = run_world(_train, scheme.n + 1, timeout=TIMEOUT, hard_exit=True, may_die=may_die,
                    args=(scheme, jobs, batch, models, master_kwargs or {}, worker_kwargs or {}))
    train.workers = out[1:]
    return out[0], digits_problem(models=models, batch=batch)


SCHEMES = {
    "uncoded": lambda: coding.GCScheme(2, 0),
    "gc-frc": lambda: coding.GCScheme(2, 1),
    "srsgc": lambda: coding.SRSGC(2, B=1, W=2, lam=1),
    "msgc": lambda: coding.MSGC(2, B=1, W=2, lam=1),
    "msgc-B2": lambda: coding.MSGC(2, B=2, W=3, lam=1),
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_no_stragglers_gives_exactly_the_uncoded_parameters(name):
    scheme = SCHEMES[name]()
    jobs = 12
    result, problem = train(scheme, jobs, master_kwargs={"mu": None})
    reference = runtime.reference_training(scheme, problem, jobs)
    assert len(result.parameters) == problem.models >= scheme.T + 1
    for got, want in zip(result.parameters, reference):
        assert torch.equal(got, want)
    assert result.decoded_round == [t + (0 if name in ("uncoded", "gc-frc", "srsgc") else scheme.T)
                                    for t in range(jobs)]
    assert not any(result.stragglers) and result.failure is None
    steady = result.work[scheme.T + 1: jobs]
    np.testing.assert_allclose(steady, scheme.normalized_load, rtol=1e-12)  # the formula load, every worker
    for m, flat in enumerate(result.parameters):  # every model really trained
        assert not torch.equal(flat, torch.nn.utils.parameters_to_vector(problem.model(m).parameters()))


@pytest.mark.parametrize("name,code,n", [("gc", "frc", 2), ("gc", "cyclic", 3), ("msgc", "cyclic", 3),
                                         ("srsgc", "auto", 3)])
def test_masked_bursty_stragglers_decode_the_same_training(name, code, n):
    """Injected bursts that follow the (B, W, lam) model: the master closes rounds without the slow
    workers, drops their late results, and still trains the uncoded parameters (FRC: bit for bit)."""
    B, W, lam = 1, 2, 1
    scheme = runtime.make_scheme(name, n, s=1, B=B, W=W, lam=lam, code=code)
    jobs = 16
    bursts = np.zeros((jobs + scheme.T, n), dtype=int)
    bursts[[2, 5, 9, 12], [1, 0, n - 1, 1]] = 1  # one straggler per burst, bursts W apart
    assert coding.StragglerModel(B, W, lam).check(bursts)
    delays = runtime.DelayProfile(0.4, jitter=0.0, slowdown=25.0, bursts=bursts)
    result, problem = train(scheme, jobs, master_kwargs={"mu": 1.0},
                            worker_kwargs={w: {"delays": delays} for w in range(n)})
    reference = runtime.reference_training(scheme, problem, jobs)
    assert result.failure is None and all(r is not None and r <= t + scheme.T
                                          for t, r in enumerate(result.decoded_round))
    masked = [r for r, row in enumerate(result.stragglers) if row]
    assert {2, 5, 9, 12} <= set(masked)  # the bursts were not waited for
    straggler_stats = [w for w in train.workers if w is not None]
    assert sum(w["rounds_abandoned"] for w in straggler_stats) + result.late_results >= 4  # dropped, not waited
    for got, want in zip(result.parameters, reference):
        if code == "frc":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_dead_worker_within_the_codes_tolerance_is_reported_and_training_goes_on():
    scheme = coding.GCScheme(3, 1, code="cyclic")
    jobs = 10
    result, problem = train(scheme, jobs, master_kwargs={"mu": None, "dead_after": 20.0},
                            worker_kwargs={2: {"die_at_round": 4}}, may_die=(3,))
    assert isinstance(result, runtime.RunResult), result
    assert 2 in result.dead and result.dead[2][0] == 4 and "connection" in result.dead[2][1]
    assert all(r == t for t, r in enumerate(result.decoded_round))
    reference = runtime.reference_training(scheme, problem, jobs)
    for got, want in zip(result.parameters, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_dead_worker_beyond_the_codes_tolerance_stops_the_run_with_a_clear_report():
    scheme = coding.MSGC(2, B=1, W=2, lam=1)  # uncoded D1 chunks: a worker gone for good is fatal
    failure, _ = train(scheme, 10, master_kwargs={"mu": None}, worker_kwargs={1: {"die_at_round": 3}},
                       may_die=(2,))
    assert isinstance(failure, runtime.StragglerFailure), failure
    text = str(failure)
    assert "cannot be decoded by its deadline" in text and "Dead workers: 1 (round 3)" in text
    assert "worker 1's uncoded chunk" in text
    assert failure.result.decoded_round[:2] == [1, 2]


def test_a_silent_worker_is_declared_dead_by_its_deadline_not_waited_for():
    scheme = coding.GCScheme(3, 1, code="cyclic")
    frozen = np.zeros((20, 3), dtype=int)
    frozen[3:, 0] = 1  # worker 0 sleeps 10,000 x its work from round 3 on: alive but silent
    delays = runtime.DelayProfile(1.0, jitter=0.0, slowdown=10_000.0, bursts=frozen)
    result, _ = train(scheme, 8, master_kwargs={"mu": None, "dead_after": 3.0},
                      worker_kwargs={0: {"delays": delays}}, may_die=(1,))
    assert isinstance(result, runtime.RunResult), result
    assert 0 in result.dead and "silent" in result.dead[0][1]
    assert result.failure is None and all(r is not None for r in result.decoded_round)
    assert result.wall_seconds < 30


def test_a_worker_that_never_starts_is_declared_dead_at_startup():
    scheme = coding.GCScheme(3, 1, code="cyclic")
    result, _ = train(scheme, 6, master_kwargs={"mu": None, "startup_timeout": 3.0},
                      worker_kwargs={1: {"absent": True}}, may_die=(2,))
    assert isinstance(result, runtime.RunResult), result
    assert result.dead == {1: (0, "not ready after 3 s")}
    assert all(r == t for t, r in enumerate(result.decoded_round))


def test_a_really_slow_process_is_masked_and_its_late_work_dropped():
    """No injected sleep: worker 0 really computes every result 100 times (a slow process)."""
    scheme = coding.GCScheme(3, 1, code="cyclic")
    jobs = 40
    result, problem = train(scheme, jobs, master_kwargs={"mu": 1.0}, worker_kwargs={0: {"compute_repeats": 100}})
    slow_rounds = sum(1 for row in result.stragglers if row == [0])
    assert slow_rounds >= jobs // 2
    # its results came too late: the master dropped them, or the worker saw the next round and gave up
    assert result.late_results + train.workers[0]["rounds_abandoned"] >= 1
    reference = runtime.reference_training(scheme, problem, jobs)
    for got, want in zip(result.parameters, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_value_errors():
    problem = digits_problem(models=1, batch=8)
    with pytest.raises(ValueError, match="models must be >= T \\+ 1"):
        runtime.Master(None, coding.MSGC(2, 1, 2, 1), problem, 4)
    with pytest.raises(ValueError, match="batch must be a positive multiple of 6"):
        runtime.Master(None, coding.MSGC(2, 1, 2, 1), digits_problem(models=2, batch=8), 4)
    with pytest.raises(ValueError, match="mu must"):
        runtime.Master(None, coding.GCScheme(2, 1), problem, 4, mu=-1.0)
    with pytest.raises(ValueError, match="startup_timeout must"):
        runtime.Master(None, coding.GCScheme(2, 1), problem, 4, startup_timeout=0)
    with pytest.raises(ValueError, match="jobs must"):
        runtime.Master(None, coding.GCScheme(2, 1), problem, 0)
    with pytest.raises(ValueError, match="slowdown must"):
        runtime.DelayProfile(1.0, slowdown=0.5)
    with pytest.raises(ValueError, match="scheme must be one of"):
        runtime.make_scheme("lt", 4)


def _cli(launcher, *args):
    cmd = launcher + ["-m", "workloads.coded", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install -e .[mpi])")
def test_mpiexec_and_torchrun_train_the_same_parameters_as_the_reference():
    args = ["--scheme", "msgc", "--jobs", "8", "--mu", "-1", "--B", "1", "--W", "2", "--lam", "1"]
    mpi = _cli([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", "3", sys.executable], *args, "--transport", "mpi")
    torchrun = _cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"], *args)
    scheme = coding.MSGC(2, 1, 2, 1)
    reference = runtime.reference_training(scheme, digits_problem(models=2, batch=mpi["batch"]), 8)
    assert mpi["digest"] == torchrun["digest"] == runtime.parameters_digest(reference)
    assert mpi["measured_load"] == pytest.approx(scheme.normalized_load)


@pytest.mark.parametrize("kind", ["short", "header"])
def test_a_malformed_message_declares_its_sender_dead_and_is_never_applied(kind):
    """A RESULT whose payload is shorter than its tasks' vectors used to be split and applied to the
    model silently, and a header announcing a negative size ended the gloo receive thread without a
    word. Both now declare the sender dead; within the code's tolerance, training goes on exactly."""
    scheme = coding.GCScheme(3, 1, code="cyclic")
    jobs = 8
    result, problem = train(scheme, jobs, master_kwargs={"mu": None, "dead_after": 20.0},
                            worker_kwargs={1: {"malformed": (kind, 3)}}, may_die=(2,))
    assert isinstance(result, runtime.RunResult), result
    assert 1 in result.dead and "malformed message" in result.dead[1][1], result.dead
    reference = runtime.reference_training(scheme, problem, jobs)
    for got, want in zip(result.parameters, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_message_checks():
    from commlib.coding.sequential import CODED, Task
    from commlib.coding.transport import check_header

    assert check_header([2, 3, 10, 1]) == (2, 3, 10, 1)
    for bad in ([2, -1, 0, 0], [2, 0, -5, 0], [2, 0, 0, 7], [-3, 0, 0, 0], [2, 1 << 40, 0, 0], [1, 2, 3]):
        with pytest.raises(ValueError):
            check_header(bad)
    tasks = [Task(4, CODED, 0), Task(5, CODED, 1)]
    meta = np.asarray([7, 2, 4, 0, 0, 9, 5, 0, 1, 9])
    assert len(runtime.check_result(meta, np.zeros(6, np.float32), tasks, 3)) == 2
    for bad_meta, payload, match in [(meta, np.zeros(5, np.float32), "carries 5 values"),
                                     (meta[:-1], np.zeros(6, np.float32), "header values"),
                                     (np.asarray([7, 2, 4, 9, 0, 9, 5, 0, 1, 9]), np.zeros(6), "unknown task kinds"),
                                     (np.asarray([7, 1, 4, 0, 0, 9]), np.zeros(3), "expected")]:
        with pytest.raises(runtime.MalformedMessage, match=match):
            runtime.check_result(bad_meta, payload, tasks, 3)


MPI_SCRIPT = """
import numpy as np
from mpi4py import MPI
from commlib.coding.transport import FAILED, MPITransport
comm = MPI.COMM_WORLD
t = MPITransport(comm, [1 - comm.Get_rank()])
if comm.Get_rank() == 1:
    t.post(0, 2, [5, 6], np.arange(4, dtype=np.float64))
    t.flush()
    comm.Send([np.asarray([2, 0, -9, 0], dtype=np.int64), MPI.INT64_T], dest=0, tag=MPITransport.TAG)
else:
    good = t.poll(30)
    bad = t.poll(30)
    ok = (good.kind == 2 and good.meta.tolist() == [5, 6] and good.payload.tolist() == [0, 1, 2, 3]
          and good.payload.dtype == np.float64 and bad.kind == FAILED and "malformed" in bad.error)
    print("MPI_OK" if ok else f"MPI_BAD {good} {bad}", flush=True)
comm.Barrier()
"""


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install -e .[mpi])")
def test_mpi_transport_sends_typed_buffers_and_reports_a_malformed_header():
    proc = subprocess.run([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-c",
                           MPI_SCRIPT], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MPI_OK" in proc.stdout, proc.stdout + proc.stderr[-2000:]
