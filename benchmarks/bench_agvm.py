"""AGVM on a detector-like dense-prediction model: small vs large batch, with and without AGVM.

Model: a ResNet-style backbone (conv stem + two residual blocks), an FPN-like 1x1 neck, and two dense
heads (per-pixel 5-class segmentation and per-pixel regression), built with torch. Data: synthetic
8-channel 16x16 inputs with dense targets from a fixed random teacher network (so the task is
learnable and the heads' gradients are much less noisy than the backbone's: the situation AGVM
addresses). 2 gloo ranks (forked), SGD with momentum, linear lr scaling for the large batch.
Runs: small batch; large batch without AGVM; large batch with AGVM (two-half and scalar
estimators). Reports the final training loss, step time, AGVM's added bytes, and mu per group over
time; JSON and a plot.

    python benchmarks/bench_agvm.py            # ~3 minutes
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_output import write_results  # noqa: E402

from commlib import hooks  # noqa: E402

GROUPS = {"backbone": "backbone", "neck": "neck", "seg_head": "seg_head", "reg_head": "reg_head"}


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(4, c), nn.GroupNorm(4, c)

    def forward(self, x):
        return torch.relu(x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))))


class Detector(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(8, width, 3, padding=1), nn.ReLU(), Block(width), Block(width))
        self.neck = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU())
        self.seg_head = nn.Conv2d(width, 5, 1)
        self.reg_head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        h = self.neck(self.backbone(x))
        return self.seg_head(h), self.reg_head(h)


def teacher_batch(rank: int, step: int, batch: int):
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    x = nn.functional.avg_pool2d(torch.randn(batch, 8, 18, 18, generator=gen), 3, stride=1)
    with torch.no_grad():
        teacher = torch.Generator().manual_seed(99)
        w1 = torch.randn(16, 8, 3, 3, generator=teacher) * 0.4
        w2 = torch.randn(6, 16, 1, 1, generator=teacher) * 0.4
        t = nn.functional.conv2d(torch.tanh(nn.functional.conv2d(x, w1, padding=1)), w2)
    return x, t[:, :5].argmax(1), t[:, 5:]


def loss_of(model, batch):
    x, seg, reg = batch
    a, b = model(x)
    return nn.functional.cross_entropy(a, seg) + nn.functional.mse_loss(b, reg)


def worker(rank, world, store, config, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Detector()
    ddp = DDP(model)
    state = None
    if config["agvm"]:
        state, hook = hooks.make("agvm", model=model, groups=GROUPS, tau=config["tau"], start_iter=5,
                                 estimator=config["estimator"])
        ddp.register_comm_hook(state, hook)
    groups = hooks.param_groups_by_module(model, GROUPS)
    opt = torch.optim.SGD(groups, lr=config["lr"], momentum=0.9, weight_decay=1e-4)
    losses, times, mus = [], [], []
    for step in range(config["steps"]):
        batch = teacher_batch(rank, step, config["batch"])
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_of(ddp, batch)
        loss.backward()
        if state is not None:
            with state.modulate(opt):
                opt.step()
            mus.append(state.multipliers())
        else:
            opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if rank == 0:
        out = {"losses": losses, "step_ms": 1e3 * statistics.median(times[3:]), "mu": mus}
        if state is not None:
            out["extra_bytes_total"] = state.stats()["extra_bytes_total"]
        results.put(out)
    dist.barrier()
    dist.destroy_process_group()


def run(config) -> dict:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=worker, args=(r, 2, os.path.join(tmp, "store"), config, results))
                 for r in range(2)]
        for p in procs:
            p.start()
        out = results.get(timeout=1800)
        for p in procs:
            p.join(timeout=60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--small-batch", type=int, default=8)
    parser.add_argument("--large-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02, help="lr at the small batch (linear scaling above)")
    parser.add_argument("--tau", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_agvm.json"))
    args = parser.parse_args()
    big_lr = args.lr * args.large_batch / args.small_batch
    configs = {
        f"batch {2 * args.small_batch}, SGD": dict(batch=args.small_batch, lr=args.lr, agvm=False),
        f"batch {2 * args.large_batch}, SGD": dict(batch=args.large_batch, lr=big_lr, agvm=False),
        f"batch {2 * args.large_batch}, SGD + AGVM (halves)": dict(batch=args.large_batch, lr=big_lr, agvm=True,
                                                                  estimator="halves"),
        f"batch {2 * args.large_batch}, SGD + AGVM (scalar)": dict(batch=args.large_batch, lr=big_lr, agvm=True,
                                                                  estimator="scalar"),
    }
    rows = {}
    for name, config in configs.items():
        config = dict(config, steps=args.steps, tau=args.tau, estimator=config.get("estimator", "halves"))
        rows[name] = run(config)
        r = rows[name]
        tail = r["losses"][-10:]
        mu = r["mu"][-1] if r["mu"] else {}
        print(f"{name:40s} final loss {sum(tail) / len(tail):.4f}  step {r['step_ms']:.1f} ms  "
              f"mu {', '.join(f'{k} {v:.2f}' for k, v in mu.items())}", flush=True)
    def draw(plt):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, r in rows.items():
            ax1.plot([sum(r["losses"][max(0, i - 4): i + 1]) / len(r["losses"][max(0, i - 4): i + 1])
                      for i in range(len(r["losses"]))], label=name)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (5-step mean)")
        ax1.legend(fontsize=7)
        for name, r in rows.items():
            if r["mu"]:
                for group in r["mu"][0]:
                    ax2.plot([m[group] for m in r["mu"]], label=f"{group} ({name.split('(')[-1].rstrip(')')})")
        ax2.set_xlabel("step")
        ax2.set_ylabel("mu (lr multiplier)")
        ax2.legend(fontsize=7)
        return fig

    write_results(args.out, {"args": vars(args), "runs": rows}, draw)

if __name__ == "__main__":
    main()
