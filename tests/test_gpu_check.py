"""The GPU check must not rot while no GPU runs it: its shell script parses, and its hook check runs
every hook end to end on a 1-rank gloo world here (``--cpu``), the same code the NCCL run takes
apart from the side stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

from commlib import hooks
from commlib.launch.mpi import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_hook_check_runs_every_hook_on_one_cpu_rank():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_hooks_check.py"), "--cpu"], cwd=ROOT,
                          env=dict(os.environ, PORT=str(free_port()), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = [r for r in rows if "check" in r]
    rows = [r for r in rows if "hook" in r]
    assert [r["hook"] for r in rows] == hooks.names()
    assert [c["check"] for c in checks] == ["resume_from_host_checkpoint"] and checks[0]["ok"], checks
    assert all(r.get("ok") or "skipped" in r for r in rows), rows
    assert next(r for r in rows if r["hook"] == "allreduce")["equals_plain_ddp"]
