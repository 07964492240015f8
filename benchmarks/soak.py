"""Soak: every hook for many steps on 2 ranks; resident memory, threads and file descriptors.

    python benchmarks/soak.py [--steps 1000] [--hooks ef powersgd ...]

Per hook, a gloo world of 2 forked processes trains the test MLP (5 layers, 48 wide, small
buckets so every hook sees several buckets per step) for ``--steps`` steps. Each rank samples its
resident set size (``/proc/self/statm``), thread count and open file descriptors every 25 steps.
Reported per hook and rank: the least-squares slope of RSS after the warm-up (the first 20% of
steps), in bytes per step and KiB per 1000 steps, the RSS range after warm-up, and the thread and
fd counts at the first sample after warm-up and at the end (with the hook state closed at the end,
its thread and group must be gone). The first row, ``none``, is DDP without a hook in the same
loop: its slope (the loop's, DDP's and the allocator's own growth) is the baseline each hook's
``excess`` is measured against. Then one process builds, binds and closes 50 states: process
groups, threads and fds before and after. Writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from hooks.ddp_harness import Net, batch  # noqa: E402

from commlib import coding, compress, hooks  # noqa: E402

HOOKS = {
    "none": None,  # the baseline: DDP's own allreduce, no hook, same loop
    "allreduce": {},
    "fp16": {},
    "bf16": {},
    "ef-topk": {"compressor": compress.TopK(0.05)},
    "ef-qsgd-two_phase": {"compressor": compress.QSGD(4, 64), "collective": "two_phase"},
    "ef-sign-two_phase": {"compressor": compress.Sign(), "collective": "two_phase"},
    "ef21": {"compressor": compress.TopK(0.05)},
    "ef21w": {"compressor": compress.TopK(0.05), "estimate_every": 50},
    "powersgd": {"rank": 2},
    "lgreco": {"family": "powersgd", "rank": 2, "retune_every": 100, "accumulate_steps": 10},
    "agvm": {"inner": "powersgd", "inner_options": {"rank": 2},
             "groups": {"low": ["inp.", "mid1."], "high": ["mid2.", "norm.", "out."]}},
    "dp_ef": {},
    "gc": {},
}
SAMPLE_EVERY = 25


def process_counts() -> dict:
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"rss": rss_pages * os.sysconf("SC_PAGE_SIZE"), "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd"))}


def slope(xs, ys) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def soak_rank(rank: int, world: int, name: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.004)
    state = None
    if HOOKS[name] is not None:
        options = dict(HOOKS[name])
        method = name.split("-")[0]
        if method == "gc":
            options = {"code": coding.FractionalRepetition(world, world - 1)}
        elif method != "dp_ef":
            options["model"] = model
        state, hook = hooks.make(method, **options)
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    samples = []
    start = time.perf_counter()
    for step in range(steps):
        x, y = batch(rank, step % 50)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        if (step + 1) % SAMPLE_EVERY == 0:
            samples.append({"step": step + 1, **process_counts()})
    seconds = time.perf_counter() - start
    stats = state.stats() if state is not None else {"step": steps}
    if state is not None:
        state.close()
    time.sleep(0.1)
    closed = process_counts()
    warm = [s for s in samples if s["step"] > steps // 5]
    rss_slope = slope([s["step"] for s in warm], [s["rss"] for s in warm])
    return {"rank": rank, "seconds": seconds, "step": stats["step"],
            "rss_slope_bytes_per_step": rss_slope, "rss_slope_kib_per_1000_steps": rss_slope * 1000 / 1024,
            "rss_after_warmup_mib": [min(s["rss"] for s in warm) / 2**20, max(s["rss"] for s in warm) / 2**20],
            "threads": [warm[0]["threads"], samples[-1]["threads"], closed["threads"]],
            "fds": [warm[0]["fds"], samples[-1]["fds"], closed["fds"]],
            "params_digest": float(sum(p.detach().double().sum() for p in model.parameters()))}


def _worker(rank, world, store, name, steps, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results.put((rank, soak_rank(rank, world, name, steps)))
    finally:
        dist.destroy_process_group()


def _in_world(target, args, world: int, timeout: float) -> list:
    """Run ``target(rank, world, store_path, *args, results)`` in a forked gloo world; per-rank results."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, world, os.path.join(tmp, "store"), *args, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        out = [results.get(timeout=timeout) for _ in procs]
        for p in procs:
            p.join(30)
    return [r for _, r in sorted(out, key=lambda x: x[0])]


def run_hook(name: str, steps: int, world: int = 2) -> list[dict]:
    return _in_world(_worker, (name, steps), world, 900)


def _churn(rank, world, store, count, results):
    import torch.distributed.distributed_c10d as c10d

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = Net()
    before = {"groups": len(c10d._world.pg_map), **process_counts()}
    names = ["ef", "ef21", "powersgd", "lgreco", "allreduce", "fp16", "bf16", "ef21w"]
    for i in range(count):
        with hooks.make(names[i % len(names)], model=model)[0] as state:
            state.bind()
    time.sleep(0.1)
    after = {"groups": len(c10d._world.pg_map), **process_counts()}
    results.put((rank, {"before": before, "after": after}))
    dist.destroy_process_group()


def churn(count: int = 50, world: int = 2) -> list[dict]:
    return _in_world(_churn, (count,), world, 300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--hooks", nargs="*", default=list(HOOKS))
    parser.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    args = parser.parse_args()
    print(f"# python benchmarks/soak.py --steps {args.steps}", flush=True)
    report = {"steps": args.steps, "world": 2, "sample_every": SAMPLE_EVERY, "hooks": {}}
    print(f"{'hook':<20} {'s':>6} {'RSS slope KiB/1000 steps (vs none)':>26} {'RSS MiB after warm-up':>22} "
          f"{'threads warm/end/closed':>24} {'fds warm/end/closed':>20}")
    baseline = None
    for name in args.hooks:
        ranks = run_hook(name, args.steps)
        report["hooks"][name] = ranks
        if name == "none":
            baseline = [r["rss_slope_kib_per_1000_steps"] for r in ranks]
        for r in ranks:
            if baseline is not None:
                r["excess_kib_per_1000_steps"] = r["rss_slope_kib_per_1000_steps"] - baseline[r["rank"]]
            print(f"{name + ' r' + str(r['rank']):<20} {r['seconds']:>6.1f} {r['rss_slope_kib_per_1000_steps']:>14.1f} "
                  f"{r.get('excess_kib_per_1000_steps', 0.0):>+11.1f} "
                  f"{r['rss_after_warmup_mib'][0]:>10.1f}-{r['rss_after_warmup_mib'][1]:<10.1f} "
                  f"{str(r['threads']):>24} {str(r['fds']):>20}", flush=True)
    report["churn_50_states"] = churn(50)
    for r, c in enumerate(report["churn_50_states"]):
        print(f"50 states made, bound and closed, rank {r}: groups {c['before']['groups']} -> {c['after']['groups']}, "
              f"threads {c['before']['threads']} -> {c['after']['threads']}, fds {c['before']['fds']} -> "
              f"{c['after']['fds']}, RSS {c['before']['rss'] / 2**20:.1f} -> {c['after']['rss'] / 2**20:.1f} MiB")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
