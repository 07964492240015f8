"""mpiexec launch: MPI ranks mapped to torch.distributed's environment train exactly like torchrun."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from commlib.launch.mpi import torch_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
WORKLOAD = ["-m", "workloads.train", "--model", "gpt2", "--dim", "64", "--layers", "1", "--steps", "6",
            "--warmup", "2", "--hook", "ef", "--compressor", "TopK(density=0.05)", "--seed", "3"]


def result_of(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_torch_environment_is_what_torchrun_sets():
    env = torch_environment(3, 4, 1, 2, "10.0.0.1", 29400)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install -e .[mpi])")
def test_mpiexec_trains_like_torchrun():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    mpi = subprocess.run([MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m",
                          "commlib.launch.mpi", *WORKLOAD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", *WORKLOAD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    a, b = result_of(mpi.stdout), result_of(torchrun.stdout)
    assert a["world"] == b["world"] == 2 and a["ranks_agree"] and b["ranks_agree"]
    assert a["losses"] == b["losses"]  # same seed, same data, same hook: the same numbers
    assert a["param_checksum"] == b["param_checksum"]
