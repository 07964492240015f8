"""Where a hook's time goes: torch.profiler over each method's hook code, and the queue's hand-off.

    python benchmarks/profile_hooks.py [--numel 4194304] [--world 2]

1. Each compressing hook of :data:`commlib.advise.METHODS` runs its real code (the fused kernels
   included) on one ``numel``-element gradient in a world of ``world`` identical ranks
   (:class:`commlib.advise.LoopbackComm`: every rank's payload is decompressed, nothing crosses a
   network), one thread, 5 profiled repeats after 2 warm-ups. Per method: the ops taking the most
   self time, as a share of the total (the gradient restore each repeat is listed as ``aten::copy_``).
2. The ordered queue's hand-off: a gloo world of 1 submits empty jobs to
   :class:`commlib.comm.queue.OrderedQueue` and waits on their futures (what every bucket pays
   on top of its work), median of 2000.

Writes ``benchmarks/results/profile_hooks.{json,txt}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from commlib import advise  # noqa: E402


def profile_method(method, numel: int, world: int, top: int = 6) -> dict:
    job = advise._hook_job(method, numel, world, torch.device("cpu"))
    for _ in range(2):
        job()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            job()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {"method": method.name, "ms_per_call": total / 5 / 1e3, "ns_per_element": total / 5 * 1e3 / numel,
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_call": e.count / 5}
                    for e in events[:top]]}


def queue_handoff(jobs: int = 2000) -> dict:
    from commlib.comm.queue import OrderedQueue

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 's')}", rank=0, world_size=1)
        try:
            queue = OrderedQueue()
            queue.submit(lambda comm: None).wait()
            times = []
            for _ in range(jobs):
                start = time.perf_counter()
                queue.submit(lambda comm: None).wait()
                times.append(time.perf_counter() - start)
            queue.close()
        finally:
            dist.destroy_process_group()
    return {"jobs": jobs, "median_us": 1e6 * statistics.median(times),
            "p90_us": 1e6 * sorted(times)[int(0.9 * len(times))]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_hooks.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import commlib

    commlib.kernel_backend("cpu")
    lines = [f"{args.numel} elements, world {args.world} (identical ranks), 1 thread, torch.profiler self time"]
    results = []
    for method in advise.METHODS:
        if method.bytes_per_element == 0:
            continue
        r = profile_method(method, args.numel, args.world)
        results.append(r)
        lines.append(f"\n{r['method']}: {r['ms_per_call']:.1f} ms per call, {r['ns_per_element']:.2f} ns/element")
        for t in r["top"]:
            lines.append(f"  {100 * t['share']:5.1f}%  {t['op']} ({t['calls_per_call']:g} per call)")
    handoff = queue_handoff()
    lines.append(f"\nordered queue hand-off (submit an empty job, wait on its future): median "
                 f"{handoff['median_us']:.0f} us, p90 {handoff['p90_us']:.0f} us")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.write_text(json.dumps({"numel": args.numel, "world": args.world, "methods": results,
                               "queue_handoff": handoff}, indent=1))
    out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
