"""Training over slow links: per-step hooks against local steps (DiLoCo family), on the emulated cluster.

    sudo python benchmarks/bench_localsgd.py                       # 100 Mbit/s and 1 Gbit/s, 2 nodes
    sudo python benchmarks/bench_localsgd.py --bandwidths 1gbit --steps 60

Every row trains the same GPT-2-style model (``throughput.MODELS["gpt2"]``, :mod:`workloads.train`)
for the same number of steps and batch, so every row sees the same samples; rows differ in how
the replicas stay together:

* dense DDP, and commlib's PowerSGD hook (rank 4, one bucket), every step;
* PyTorch's ``PeriodicModelAverager`` (post-local SGD: parameter averaging every H steps);
* commlib DiLoCo every H steps (inner AdamW, outer Nesterov SGD lr 0.7, momentum 0.9): fp32 outer
  gradients, QSGD 4-bit + EF, top-k 2% + EF (SparseLoCo-like), and Streaming DiLoCo (4 fragments,
  each synced 2 inner steps late and mixed with alpha 0.5, QSGD 4-bit + EF).

H is tuned first (``--tune-h``): DiLoCo fp32 at 1 Gbit/s for each candidate, the lowest held-out
loss wins, and every local-step row uses it. Reported per row: samples/s (total samples over the
total time of the timed steps: local steps sync once in H steps, so the mean, not the median),
bytes per inner step (the algorithm's count of what one rank sends, and the node's NIC counter),
held-out loss at equal samples. JSON, a Markdown table, and a plot of training loss against
wall-clock time per method (``benchmarks/results/bench_localsgd.{json,md,png}``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_output import bandwidth_bytes_per_second, table_cell  # noqa: E402
from throughput import MODELS, RESULTS, run_one  # noqa: E402

from commlib.launch.cluster import EmulatedCluster, open_cluster  # noqa: E402


def configs(h: int) -> list[tuple[str, str, list[str]]]:
    diloco = ["--local-sgd", "diloco", "--sync-every", str(h)]
    delay = max(1, min(2, h // 4 - 1))  # a fragment's sync ends before the next fragment's starts
    return [
        ("dense DDP", "none", []),
        ("commlib PowerSGD rank 4, per step", "powersgd", ["--option", "rank=4", "--bucket-cap-mb", "1000"]),
        (f"PeriodicModelAverager, H={h}", "none", ["--local-sgd", "averager", "--sync-every", str(h)]),
        (f"DiLoCo fp32, H={h}", "none", diloco),
        (f"DiLoCo QSGD 4-bit + EF, H={h}", "none", diloco + ["--outer-compressor", "QSGD(bits=4)"]),
        (f"DiLoCo top-k 2% + EF, H={h}", "none", diloco + ["--outer-compressor", "TopK(density=0.02)"]),
        (f"Streaming DiLoCo, 4 fragments, delay {delay}, QSGD 4-bit + EF, H={h}", "none",
         diloco + ["--outer-compressor", "QSGD(bits=4)", "--fragments", "4", "--delay", str(delay), "--mix", "0.5"]),
    ]


def run(cluster, label, hook, extra, steps, warmup, port) -> dict:
    r = run_one(cluster, MODELS["gpt2"], hook, extra, steps, warmup, port)
    r.update(label=label)
    return r


def table(rows: list[dict], link_bps: float | None) -> str:
    out = ["| method | samples/s | vs dense | bytes/inner step (algorithm) | NIC bytes/inner step | fewer bytes "
           "than dense | held-out loss | vs dense |", "|---|---|---|---|---|---|---|---|"]
    dense = next((r for r in rows if r["label"] == "dense DDP" and not r.get("crashed")), None)
    for r in rows:
        if r.get("crashed"):
            out.append(f"| {r['label']} | crashed: {table_cell(r['reason'])} | | | | | | |")
            continue
        wire = r.get("wire_tx_bytes_per_step")
        dense_wire = dense.get("wire_tx_bytes_per_step") if dense else None
        fewer = f"{dense_wire / wire:,.0f}x" if dense_wire and wire else "-"
        out.append(f"| {r['label']} | {r['samples_per_second_mean']:.1f} "
                   f"| {r['samples_per_second_mean'] / dense['samples_per_second_mean']:.2f}x "
                   f"| {r['bytes_per_step']:,.0f} | {f'{wire:,.0f}' if wire else '-'} | {fewer} "
                   f"| {r['eval_loss']:.4f} | {100 * (r['eval_loss'] / dense['eval_loss'] - 1):+.2f}% |")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (bandwidth, rows) in zip(axes[0], results.items()):
        for r in rows:
            if r.get("crashed"):
                continue
            clock, total = [], 0.0
            for s in r["step_seconds"]:
                total += s
                clock.append(total)
            losses = r["losses"]
            windows = [losses[max(0, i - 9) : i + 1] for i in range(len(losses))]
            smooth = [sum(w) / len(w) for w in windows]
            ax.plot(clock, smooth, label=r["label"])
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock seconds (rank 0)")
        ax.set_ylabel("training loss (rank 0, 10-step mean)")
        ax.set_title(f"2 emulated nodes, {bandwidth}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", default="100mbit,1gbit")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--warmup", type=int, default=40, help="left out of the timing (a multiple of H)")
    parser.add_argument("--tune-h", default="10,20,40", help="candidates for H (DiLoCo fp32 at the last bandwidth)")
    parser.add_argument("--only", help="comma list: rows whose label contains one of these")
    parser.add_argument("--out", default=str(RESULTS / "bench_localsgd.json"))
    args = parser.parse_args()
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(it, **_):
            return it
    bandwidths = args.bandwidths.split(",")
    started = time.time()
    tuning = []
    candidates = [int(h) for h in args.tune_h.split(",")]
    results, meta = {}, {"steps": args.steps, "warmup": args.warmup, "date": time.strftime("%Y-%m-%d %H:%M")}
    with open_cluster(2, bandwidths[-1], "0.5ms", log=lambda m: print(m, file=sys.stderr)) as cluster:
        for i, h in enumerate(tqdm(candidates, desc="tune H")):
            r = run(cluster, f"DiLoCo fp32, H={h}", "none", ["--local-sgd", "diloco", "--sync-every", str(h)],
                    args.steps, args.warmup, 29400 + i)
            tuning.append({"H": h, "eval_loss": r.get("eval_loss"), "crashed": r.get("crashed", False)})
    good = [t for t in tuning if not t["crashed"]]
    h = min(good, key=lambda t: t["eval_loss"])["H"] if good else candidates[0]
    print(f"H tuned at {bandwidths[-1]}: " + ", ".join(f"H={t['H']}: {t['eval_loss']}" for t in tuning) + f" -> H={h}")
    rows_of = configs(h)
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        rows_of = [c for c in rows_of if c[0] == "dense DDP" or any(w in c[0].lower() for w in wanted)]
    reports = []
    for bandwidth in bandwidths:
        with open_cluster(2, bandwidth, "0.5ms", log=lambda m: print(m, file=sys.stderr)) as cluster:
            emulated = isinstance(cluster, EmulatedCluster)
            rows = []
            for i, (label, hook, extra) in enumerate(tqdm(rows_of, desc=bandwidth)):
                rows.append(run(cluster, label, hook, extra, args.steps, args.warmup, 29500 + i))
            results[bandwidth] = rows
            meta[bandwidth] = {"emulated": emulated}
            link = bandwidth_bytes_per_second(bandwidth) if emulated else None
            reports.append(f"### 2 emulated nodes, {bandwidth}{'' if emulated else ' (UNSHAPED loopback)'}\n\n"
                           + table(rows, link))
    tuned = ", ".join("H={} {:.4f}".format(t["H"], t["eval_loss"]) for t in good)
    report = (f"{args.steps} steps of batch 4 per rank ({args.warmup} left out of the timing), H = {h} "
              f"(tuned on held-out loss: {tuned}); "
              f"{time.time() - started:.0f} s\n\n" + "\n\n".join(reports))
    print("\n" + report)
    out = Path(args.out)
    for rows in results.values():
        for r in rows:
            r.pop("stderr_tail", None)
    out.write_text(json.dumps({"meta": meta, "tuning": tuning, "H": h, "results": results}, indent=1))
    out.with_suffix(".md").write_text(report + "\n")
    try:
        plot(results, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(f"wrote {out} (+ .md, .png)")


if __name__ == "__main__":
    main()
