"""Hook cost per step: commlib's PowerSGD against PyTorch's ``powerSGD_hook``, and every compressing hook.

    python benchmarks/bench_hooks.py [--ranks 1 2 4] [--steps 12] [--layers 8] [--width 1024] [--repeats 3]

Model: ``layers`` x Linear(width, width) (DESIGN.md: 8 x 1024), one 64 MB bucket (PyTorch's hook
runs there). A gloo world of 2 processes on this machine (1 thread each); medians over the steps
after warm-up:

* hook cost per step = step time with the hook - step time of the same model without DDP (no
  communication at all). On loopback the compressed payloads are tiny, so this is the hook's
  compression compute plus its small collectives (DESIGN target: commlib <= 0.7x PyTorch's).
  (A world of 1 would isolate compute, but PyTorch's hook hangs there: its ``.then`` callbacks
  block on gloo work.)
* dense DDP for reference, and both hooks with DDP's default 25 MB buckets (``--bucket-mb``:
  two buckets for this model); PyTorch's runs in a world of its own, since on gloo it aborts
  the processes ("Received data size doesn't match expected size").
* every other compressing hook (commlib's and PyTorch's fp16, EF sign and QSGD two-phase, EF top-k
  and random-k, L-GreCo) on the default buckets: its cost and the step's share of the
  no-communication ceiling.

Each case is the median over ``--repeats`` separate worlds (this machine is shared and noisy).

Writes ``benchmarks/results/bench_hooks.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
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


def _ef(compressor: str, collective: str = "auto"):
    def options():
        from commlib import compress

        return {"compressor": eval(compressor, vars(compress)), "collective": collective}  # noqa: S307
    return options


# every other compressing hook, timed the same way (hook cost = step - step without DDP)
OTHER_HOOKS = {
    "fp16 (commlib)": ("fp16", dict),
    "ef-sign-two-phase": ("ef", _ef("Sign()", "two_phase")),
    "ef-qsgd4-two-phase": ("ef", _ef("QSGD(bits=4)", "two_phase")),
    "ef-topk-1%": ("ef", _ef("TopK(0.01)")),
    "ef-randomk-1%": ("ef", _ef("RandomK(0.01)")),
    "lgreco-powersgd": ("lgreco", lambda: {"family": "powersgd", "rank": 4, "retune_every": 100,
                                           "accumulate_steps": 2}),
}


def model_of(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def step_times(impl: str, rank_r: int, steps: int, layers: int, width: int, bucket_mb: float) -> list[float]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commlib import hooks

    model = model_of(layers, width)
    ddp = model if impl == "local" else DDP(model, bucket_cap_mb=bucket_mb)
    if impl == "torch":
        state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=rank_r, start_powerSGD_iter=2,
                                 min_compression_rate=2)
        ddp.register_comm_hook(state, ps.powerSGD_hook)
    elif impl.startswith("commlib"):
        state, hook = hooks.make("powersgd", rank=rank_r, start_iter=2, model=model,
                                 batch_tensors_with_same_shape=impl.endswith("batched"))
        ddp.register_comm_hook(state, hook)
    elif impl == "torch-fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif impl in OTHER_HOOKS:
        name, options = OTHER_HOOKS[impl]
        state, hook = hooks.make(name, start_iter=2, model=model, **options())
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(32, width, generator=gen)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[3:]  # after warm-up (dense steps 0-1 and the first compressed step)


def _worker(rank, world, store, cases, args, queue):
    torch.set_num_threads(max(1, args.threads // world))
    import commlib

    commlib.kernel_backend("cpu")  # load kernels before timing
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    out = {}
    for impl, rank_r, bucket_mb in cases:
        try:
            out[(impl, rank_r, bucket_mb)] = statistics.median(
                step_times(impl, rank_r, args.steps, args.layers, args.width, bucket_mb))
        except Exception as exc:  # PyTorch's hook on gloo with several buckets
            out[(impl, rank_r, bucket_mb)] = f"crashed: {str(exc).splitlines()[0][:120]}"
            break  # the group may be unusable now
    queue.put((rank, out))
    dist.destroy_process_group()


def run_world(world: int, cases, args, limit: float = 900.0) -> dict:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "s"), cases, args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        deadline = time.monotonic() + limit
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, out = queue.get(timeout=2)
                results[rank] = out
            except Exception:  # empty: stop waiting once a worker has died (gloo aborts the process)
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if 0 not in results:
        hung = time.monotonic() >= deadline
        why = f"hung: no result within {limit:.0f} s" if hung else "crashed: the world died (gloo abort)"
        return {case: why for case in cases}
    return results[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size of the several-bucket check")
    parser.add_argument("--repeats", type=int, default=3, help="worlds to run; each case's median is kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_hooks.json"))
    args = parser.parse_args(argv)
    print("command:", " ".join([sys.executable, *sys.argv]))

    ONE = 64
    cases = [("local", 0, ONE), ("none", 0, ONE)]
    for r in args.ranks:
        cases += [("torch", r, ONE), ("commlib", r, ONE), ("commlib-batched", r, ONE)]
    cases.append(("commlib", args.ranks[-1], args.bucket_mb))
    cases += [("torch-fp16", 0, args.bucket_mb)] + [(impl, 0, args.bucket_mb) for impl in OTHER_HOOKS]
    cases.append(("local", 0, args.bucket_mb))
    runs = []
    for _ in range(args.repeats):  # separate worlds; the median of each case over them
        runs.append(run_world(2, cases, args))
        if any(isinstance(v, str) for v in runs[-1].values()):
            print("failed:", runs[-1])
            return 1
    timed = {case: statistics.median(run[case] for run in runs) for case in cases}
    base = timed[("local", 0, ONE)]
    print(f"\n2 ranks on loopback, {args.layers} x Linear({args.width}), one {ONE} MB bucket: "
          f"step without DDP {base * 1e3:.1f} ms, dense DDP {timed[('none', 0, ONE)] * 1e3:.1f} ms")
    header = f"{'rank':>5}{'torch hook ms':>15}{'commlib ms':>12}{'ratio':>8}{'batched ms':>12}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for r in args.ranks:
        t = timed[("torch", r, ONE)] - base
        c = timed[("commlib", r, ONE)] - base
        b = timed[("commlib-batched", r, ONE)] - base
        rows.append({"rank": r, "torch_hook_ms": t * 1e3, "commlib_hook_ms": c * 1e3,
                     "commlib_batched_hook_ms": b * 1e3, "ratio": c / t, "ratio_batched": b / t,
                     "torch_step_ms": timed[("torch", r, ONE)] * 1e3,
                     "commlib_step_ms": timed[("commlib", r, ONE)] * 1e3})
        print(f"{r:>5}{t * 1e3:>15.1f}{c * 1e3:>12.1f}{c / t:>7.2f}x{b * 1e3:>12.1f}{b / t:>7.2f}x")
    r = args.ranks[-1]
    small = timed[("commlib", r, args.bucket_mb)]
    # PyTorch's hook on several buckets either aborts gloo or hangs in it: bounded wait
    crash = run_world(2, [("torch", r, args.bucket_mb)], args, limit=120)[("torch", r, args.bucket_mb)]
    print(f"\n{args.bucket_mb} MB buckets, rank {r}: commlib step {small * 1e3:.1f} ms; PyTorch's hook: "
          f"{crash if isinstance(crash, str) else f'{crash * 1e3:.1f} ms'}")
    # every compressing hook on the default buckets: hook cost against the no-communication ceiling
    ceiling = timed[("local", 0, args.bucket_mb)]
    print(f"\nEvery compressing hook, {args.bucket_mb} MB buckets (median of {args.repeats} worlds; "
          f"step without DDP {ceiling * 1e3:.1f} ms):")
    print(f"{'hook':>22}{'step ms':>10}{'hook ms':>10}{'share of ceiling':>18}")
    others = []
    for impl in ["torch-fp16", *OTHER_HOOKS]:
        step = timed[(impl, 0, args.bucket_mb)]
        others.append({"hook": impl, "step_ms": step * 1e3, "hook_ms": (step - ceiling) * 1e3,
                       "ceiling_share": ceiling / step})
        print(f"{impl:>22}{step * 1e3:>10.1f}{(step - ceiling) * 1e3:>10.1f}{100 * ceiling / step:>17.0f}%")
    loopback = {"no_ddp_step_ms": base * 1e3, "dense_ddp_step_ms": timed[("none", 0, ONE)] * 1e3,
                f"commlib_rank{r}_{args.bucket_mb}MB_step_ms": small * 1e3,
                f"torch_rank{r}_{args.bucket_mb}MB": crash if isinstance(crash, str) else crash * 1e3}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__, "layers": args.layers,
                               "width": args.width, "repeats": args.repeats, "hook_cost": rows,
                               "every_hook": others, "loopback_2_ranks": loopback}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
