"""Elastic training with a stateful commlib hook: torchrun restarts, DCP resumes, bit for bit.

    torchrun --nnodes 2 --nproc-per-node 1 --max-restarts 2 --rdzv-backend c10d \\
        --rdzv-endpoint $NODE0:29500 --rdzv-id job1 examples/elastic_train.py --checkpoint-dir /shared/ckpt

(run the same line on every node; ``--standalone`` is not enough for restarts: its workers could
not rebuild their gloo mesh after a restart here, an explicit c10d endpoint works; and the process
group is made with :func:`commlib.launch.elastic.init_process_group`, which gives each attempt its
own store keys). Any failed
worker makes torchrun stop and restart every worker of the job (its ranks may move between
nodes). Each restarted worker is a fresh process: it rebuilds the model, the optimizer and the
hook state, loads the latest checkpoint with ``torch.distributed.checkpoint`` and continues.

What is saved every ``--checkpoint-every`` steps, by every rank into one DCP directory: the model
and optimizer (``get_state_dict``: fully qualified names, replicated), and the PowerSGD hook state
through :class:`commlib.checkpoint.HookStateful` (its error-feedback residuals are per rank:
stored under ``rank{r}``, so DCP neither merges them nor needs them to exist before the load).
Rank 0 then records the step in ``latest``. The data each rank reads at step s depends only on
(rank, s), so a resumed run continues exactly the uninterrupted one; rank 0 prints a SHA-256 of
the final parameters in its ``RESULT`` line (``tests/launch/test_elastic.py`` compares them).

The model is an MLP on scikit-learn's bundled handwritten digits (nothing is downloaded).
``--kill-at-step S --kill-rank R`` makes rank R SIGKILL itself at step S on the first attempt
(``TORCHELASTIC_RESTART_COUNT == 0``): the failure torchrun must recover from.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import hooks
from commlib.checkpoint import HookStateful
from commlib.launch.elastic import init_process_group


class TrainState:
    """Model, optimizer and hook state as one DCP ``Stateful``."""

    def __init__(self, model, optimizer, hook_state):
        self.model, self.optimizer, self.hook = model, optimizer, HookStateful(hook_state)

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "hook": self.hook.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.hook.load_state_dict(state["hook"])


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def batch_of(x, y, rank: int, step: int, size: int):
    """This rank's batch at ``step``: a function of (rank, step) alone, never of the process."""
    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    index = torch.randint(0, len(x), (size,), generator=gen)
    return x[index], y[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank-r", type=int, default=2, help="PowerSGD rank")
    parser.add_argument("--kill-at-step", type=int, default=-1)
    parser.add_argument("--kill-rank", type=int, default=1)
    args = parser.parse_args()

    # the store is prefixed by the rendezvous round: groups made by dist.new_group (one per hook
    # state) would otherwise find the dead round's addresses under their names (commlib.launch.elastic)
    init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(0)  # same initial parameters on every rank and every attempt
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    ddp = DDP(model, bucket_cap_mb=0.05)
    state, hook = hooks.make("powersgd", rank=args.rank_r, model=model, timeout=30)
    ddp.register_comm_hook(state, hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_state = TrainState(model, optimizer, state)

    ckpt = Path(args.checkpoint_dir)
    latest = ckpt / "latest"
    start = 0
    if latest.exists():
        start = int(latest.read_text())
        dcp.load({"train": train_state}, checkpoint_id=str(ckpt / f"step_{start:06d}"))
        assert state.step == start, (state.step, start)

    x, y = digits()
    losses = []
    for step in range(start, args.steps):
        if attempt == 0 and step == args.kill_at_step and rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        xb, yb = batch_of(x, y, rank, step, args.batch)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ddp(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            dcp.save({"train": train_state}, checkpoint_id=str(ckpt / f"step_{step + 1:06d}"))
            dist.barrier()
            if rank == 0:
                tmp = ckpt / "latest.tmp"
                tmp.write_text(str(step + 1))
                tmp.replace(latest)

    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if rank == 0:
        print("RESULT " + json.dumps({"world": world, "attempt": attempt, "resumed_from": start, "digest": digest,
                                      "ranks_agree": len(set(digests)) == 1, "losses": losses,
                                      "hook_stats": {k: state.stats()[k] for k in ("step", "compression_ratio")}}),
              flush=True)
    state.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
