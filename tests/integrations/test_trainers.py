"""The trainer examples, run as a user runs them (2 CPU processes, gloo): the commlib hook really ran
on every rank (bytes sent > 0, fewer than dense), every rank ends bit-identical, and each
trainer's trap (Lightning drops the hook on CPU, Accelerate ignores a function hook, the HF Trainer
hands callbacks the unwrapped model) is handled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commlib.launch.mpi import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.dist


def env_for(tmp_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"),
                TOKENIZERS_PARALLELISM="false", PL_DISABLE_FORK="0")


def run(cmd, tmp_path, timeout=240) -> dict:
    """Run an example to completion (killed past ``timeout``); its ``--out`` report."""
    out = tmp_path / "report.json"
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_hook_ran_everywhere(report: dict, steps: int) -> None:
    assert report["world_size"] == 2
    assert report["ranks_agree"], "ranks hold different parameters"
    assert all(b > 0 for b in report["hook_bytes"]), f"the commlib hook did not run on every rank: {report}"
    assert report["hook_bytes"][0] == report["hook_bytes"][1]
    assert all(0 < b < d for b, d in zip(report["hook_bytes"], report["hook_dense_bytes"], strict=True))
    assert report["hook_steps"] == [steps, steps]


def test_lightning_ddp_strategy_with_a_commlib_hook_and_galore(tmp_path):
    pytest.importorskip("pytorch_lightning")
    # Lightning's default launcher (popen: the script re-runs per rank). `--start-method spawn`
    # (the strategy pickled with the unbound state) trains to the same digest; the pickling itself
    # is tested in tests/hooks/test_checkpoints.py, without Lightning's 10 s import per process.
    report = run([sys.executable, str(ROOT / "examples" / "lightning_train.py"), "--devices", "2", "--hook",
                  "powersgd", "--option", "rank=2", "--steps", "8", "--port", str(free_port())], tmp_path)
    assert_hook_ran_everywhere(report, 8)
    assert report["registered_by"] == "callback"  # Lightning itself registers only on CUDA
    assert report["optimizer"] == "GaLoreAdamW"


def test_accelerate_launch_with_a_commlib_hook_and_accumulation(tmp_path):
    pytest.importorskip("accelerate")
    report = run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                  str(free_port()), str(ROOT / "examples" / "accelerate_train.py"), "--cpu", "--hook", "ef",
                  "--compressor", "QSGD(bits=4)", "--accumulate", "2", "--steps", "6"], tmp_path)
    assert report["distributed_type"] == "DistributedType.MULTI_CPU" and report["num_processes"] == 2
    assert report["registered"] and report["micro_batches"] == 12
    assert_hook_ran_everywhere(report, 6)  # the hook runs on sync steps only: once per optimizer step


def test_hf_trainer_with_a_commlib_hook_and_fira(tmp_path):
    pytest.importorskip("transformers")
    report = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                  str(free_port()), str(ROOT / "examples" / "hf_trainer_train.py"), "--hook", "powersgd",
                  "--option", "rank=2", "--optimizer", "fira", "--steps", "8"], tmp_path)
    assert report["registered"] and report["optimizer"] == "FiraAdamW" and report["global_step"] == 8
    assert_hook_ran_everywhere(report, 8)
