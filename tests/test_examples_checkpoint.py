"""examples/ddp_train.py checkpoints as users do (rank 0 writes one file atomically, every rank
loads it) and refuses a hook state that is not from the model's step; save_atomic never tears."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commlib.checkpoint import save_atomic

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(ROOT / "examples" / "ddp_train.py"), "--hook", "ef",
               "--compressor", "TopK(density=0.1)", "--context", "16", "--batch", "4", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)


def test_ddp_train_saves_one_file_and_refuses_a_hook_state_of_another_step(tmp_path):
    first = _train("--steps", "3", "--save", str(tmp_path / "a.pt"))
    assert first.returncode == 0, first.stderr[-2000:]
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert saved["step"] == 3 and {"rank0", "rank1"} <= set(saved["hook"])  # every rank's part, one file
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    resumed = _train("--steps", "2", "--resume", str(tmp_path / "a.pt"), "--save", str(tmp_path / "b.pt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 5
    saved["step"] = 2  # a model file of another step next to this hook state
    torch.save(saved, tmp_path / "mixed.pt")
    mixed = _train("--steps", "1", "--resume", str(tmp_path / "mixed.pt"))
    assert mixed.returncode != 0 and "not from the same save" in mixed.stderr + mixed.stdout


def test_save_atomic_keeps_the_previous_file_when_a_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1}, path)
    real = torch.save

    def torn(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]
