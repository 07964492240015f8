"""FSDP2 with commlib on the emulated 2-node cluster: compressed reduce-scatter, int8 all-gather,
low-rank optimizers on shards, against plain FSDP2 and DDP, on a GPT-2-style model.

Every configuration trains ``workloads.train --mode fsdp`` (a ``transformers`` GPT-2 config, random init,
next-byte prediction on the Python install's sources) with one rank per emulated node, the link
shaped to ``--bandwidth``. It reports samples/s (median step after warm-up; each configuration run
``--repeat`` times and the run with the median samples/s kept), the bytes the node's NIC sent per
step, the held-out loss, and per-rank memory held for training (parameters + gradients + optimizer
state + error-feedback residuals, local shards) and peak RSS. Two ceilings run in the same sweep:
FSDP2 with a reduce-scatter that sends nothing (the bound of any gradient compression), and the same
with the int8 all-gather. Results go to JSON, a Markdown table and a plot.

    sudo python benchmarks/bench_fsdp.py                 # 1 Gbit/s, 2 nodes, 3 runs per configuration
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_output import bandwidth_bytes_per_second, table_cell  # noqa: E402

from commlib.launch.cluster import EmulatedCluster, open_cluster  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ["--dim", "512", "--layers", "2", "--heads", "8", "--context", "16", "--batch", "4"]

# (label, workload arguments)
CONFIGS = [
    ("DDP + AdamW (reference)", ["--mode", "ddp"]),
    ("FSDP2 + AdamW", []),
    ("FSDP2, RS sends nothing (ceiling)", ["--compressor", "silent"]),
    ("FSDP2 + RS QSGD 8-bit", ["--compressor", "QSGD(bits=8)"]),
    ("FSDP2 + RS QSGD 8-bit + EF", ["--compressor", "QSGD(bits=8)", "--error-feedback", "fp32"]),
    ("FSDP2 + RS QSGD 4-bit", ["--compressor", "QSGD(bits=4)"]),
    ("FSDP2 + RS QSGD 4-bit + EF", ["--compressor", "QSGD(bits=4)", "--error-feedback", "fp32"]),
    ("FSDP2 + RS QSGD 4-bit + EF bf16", ["--compressor", "QSGD(bits=4)", "--error-feedback", "bf16"]),
    ("FSDP2 + RS sign + EF", ["--compressor", "Sign()", "--error-feedback", "fp32"]),
    ("FSDP2 + int8 AG, RS sends nothing (ceiling)", ["--compressor", "silent", "--quantize-weights"]),
    ("FSDP2 + int8 AG + RS QSGD 8-bit", ["--compressor", "QSGD(bits=8)", "--quantize-weights"]),
    ("FSDP2 + int8 AG + RS QSGD 4-bit + EF", ["--compressor", "QSGD(bits=4)", "--error-feedback", "fp32",
                                              "--quantize-weights"]),
    ("FSDP2 + GaLore (dct)", ["--optimizer", "galore", "--projector", "dct"]),
    ("FSDP2 + GaLore (svd)", ["--optimizer", "galore", "--projector", "svd"]),
    ("FSDP2 + Fira (dct)", ["--optimizer", "fira", "--projector", "dct"]),
    ("FSDP2 + Fira (svd)", ["--optimizer", "fira", "--projector", "svd"]),
    ("FSDP2 + FRUGAL (dct)", ["--optimizer", "frugal", "--projector", "dct"]),
    ("FSDP2 + FRUGAL (svd)", ["--optimizer", "frugal", "--projector", "svd"]),
]


# HSDP on nodes of several ranks (--hsdp with --ranks-per-node L): FSDP2 inside the node, the
# all-reduce across replicas dense (FSDP2's native HSDP) or compressed with EF (commlib's)
HSDP_CONFIGS = [
    ("HSDP, native dense all-reduce", ["--hsdp"]),
    ("HSDP + replica all-reduce Identity", ["--hsdp", "--compressor", "Identity()"]),
    ("HSDP + replica all-reduce QSGD 8-bit + EF", ["--hsdp", "--compressor", "QSGD(bits=8)", "--error-feedback", "fp32"]),
    ("HSDP + replica all-reduce QSGD 4-bit + EF", ["--hsdp", "--compressor", "QSGD(bits=4)", "--error-feedback", "fp32"]),
]
# plain fully_shard over every rank of several nodes: the compressed reduce-scatter in one hop
# (--flat) or two (qgZ: dense in the node, node sums compressed across it), with --ranks-per-node L
TWO_HOP_CONFIGS = [
    ("FSDP2 + AdamW", []),
    ("FSDP2 + RS QSGD 8-bit + EF, one hop", ["--compressor", "QSGD(bits=8)", "--error-feedback", "fp32", "--flat"]),
    ("FSDP2 + RS QSGD 8-bit + EF, two hops", ["--compressor", "QSGD(bits=8)", "--error-feedback", "fp32"]),
    ("FSDP2 + RS QSGD 4-bit + EF, one hop", ["--compressor", "QSGD(bits=4)", "--error-feedback", "fp32", "--flat"]),
    ("FSDP2 + RS QSGD 4-bit + EF, two hops", ["--compressor", "QSGD(bits=4)", "--error-feedback", "fp32"]),
]
RANKS_PER_NODE = 1


def run_once(cluster, args: list[str], steps: int, warmup: int, port: int) -> dict:
    argv = ["-m", "workloads.train", "--mode", "fsdp", *MODEL, *args, "--steps", str(steps), "--warmup", str(warmup)]
    try:
        outputs = cluster.torchrun(argv, nproc_per_node=RANKS_PER_NODE, port=port, timeout=900)
    except RuntimeError as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        return {"crashed": True, "reason": (lines[-1] if lines else "failed")[:300]}
    for line in outputs[0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"crashed": True, "reason": "no result line"}


def sweep(cluster, configs, steps: int, warmup: int, repeat: int, progress=None) -> list[dict]:
    """Run every configuration ``repeat`` times; keep the run with the median samples/s."""
    rows, port = [], 29600
    for label, args in configs:
        runs = []
        for _ in range(repeat):
            port = 29600 + (port - 29599) % 200
            runs.append(run_once(cluster, args, steps, warmup, port))
            if progress is not None:
                progress(label)
        good = [r for r in runs if not r.get("crashed")]
        if not good:
            rows.append({"label": label, **runs[-1]})
            continue
        good.sort(key=lambda r: r["samples_per_second"])
        kept = good[len(good) // 2]
        rows.append({"label": label, **kept, "runs_samples_per_second": [r["samples_per_second"] for r in good],
                     "runs": len(runs)})
    return rows


def table(rows: list[dict], link_bps: float | None) -> str:
    out = ["| configuration | samples/s | vs FSDP2 | vs its ceiling | wire bytes/step | link share | held-out loss "
           "| vs FSDP2 | memory/rank (MB) | vs FSDP2 | optimizer state (MB) | vs FSDP2 | residuals (MB) "
           "| comm buffers (MB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {r["label"]: r for r in rows if not r.get("crashed")}
    base = by.get("FSDP2 + AdamW") or by.get("HSDP, native dense all-reduce")
    for r in rows:
        if r.get("crashed"):
            out.append(f"| {r['label']} | crashed: {table_cell(r['reason'])} | | | | | | | | | | | | |")
            continue
        ceiling = None
        if "RS" in r["label"] and "ceiling" not in r["label"]:
            name = ("FSDP2 + int8 AG, RS sends nothing (ceiling)" if "int8 AG" in r["label"]
                    else "FSDP2, RS sends nothing (ceiling)")
            ceiling = by.get(name)
        vs_ceiling = f"{r['samples_per_second'] / ceiling['samples_per_second']:.0%}" if ceiling else "-"
        wire = r.get("wire_tx_bytes_per_step")
        share = f"{100 * wire / link_bps / r['step_seconds_median']:.0f}%" if wire and link_bps else "-"
        mem = r["memory_bytes"]
        out.append(
            f"| {r['label']} | {r['samples_per_second']:.1f} "
            f"| {r['samples_per_second'] / base['samples_per_second']:.2f}x | "
            f"{vs_ceiling} "
            f"| {f'{wire:,.0f}' if wire else '-'} | {share} | {r['eval_loss']:.4f} "
            f"| {100 * (r['eval_loss'] / base['eval_loss'] - 1):+.2f}% | {mem['total'] / 2**20:.1f} "
            f"| {mem['total'] / base['memory_bytes']['total']:.2f}x | {mem['optimizer_state'] / 2**20:.1f} "
            f"| {mem['optimizer_state'] / base['memory_bytes']['optimizer_state']:.2f}x "
            f"| {mem['residuals'] / 2**20:.1f} | {mem.get('comm_buffers', 0) / 2**20:.1f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("crashed")]
    labels = [r["label"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.45 * len(ok) + 1.5), sharey=True)
    axes[0].barh(labels, [r["samples_per_second"] for r in ok], color="tab:blue")
    axes[0].set_xlabel("samples/s (median run)")
    axes[1].barh(labels, [r["eval_loss"] for r in ok], color="tab:green")
    axes[1].set_xlabel("held-out loss")
    lo = min(r["eval_loss"] for r in ok)
    axes[1].set_xlim(lo * 0.98, max(r["eval_loss"] for r in ok) * 1.01)
    mem = [r["memory_bytes"] for r in ok]
    parts = ["parameters", "gradients", "optimizer_state", "residuals"]
    left = [0.0] * len(ok)
    for part in parts:
        values = [m[part] / 2**20 for m in mem]
        axes[2].barh(labels, values, left=left, label=part)
        left = [a + b for a, b in zip(left, values)]
    axes[2].set_xlabel("memory per rank (MB)")
    axes[2].legend(fontsize=7)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--bandwidth", default="1gbit")
    parser.add_argument("--latency", default="0.5ms")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help="comma list: configurations whose label contains one of these")
    parser.add_argument("--ranks-per-node", type=int, default=1)
    parser.add_argument("--hsdp", action="store_true", help="the HSDP rows (use --ranks-per-node >= 2)")
    parser.add_argument("--two-hop", action="store_true",
                        help="one-hop vs two-hop compressed reduce-scatter rows (use --ranks-per-node >= 2)")
    parser.add_argument("--out", default=str(RESULTS / "bench_fsdp.json"))
    args = parser.parse_args()
    global RANKS_PER_NODE
    RANKS_PER_NODE = args.ranks_per_node
    configs = HSDP_CONFIGS if args.hsdp else TWO_HOP_CONFIGS if args.two_hop else CONFIGS
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        configs = [c for c in configs if any(w in c[0].lower() for w in wanted)]

    cluster = open_cluster(args.nodes, args.bandwidth, args.latency, log=lambda m: print(m, file=sys.stderr))
    emulated = isinstance(cluster, EmulatedCluster)
    link_bps = bandwidth_bytes_per_second(args.bandwidth) if emulated else None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=len(configs) * args.repeat, desc="bench_fsdp", unit="run") if tqdm else None

    def progress(label):
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)

    started = time.time()
    with cluster:
        rows = sweep(cluster, configs, args.steps, args.warmup, args.repeat, progress)
    if bar is not None:
        bar.close()
    report = table(rows, link_bps)
    where = f"emulated nodes, links shaped to {args.bandwidth}" if emulated else "ranks on UNSHAPED loopback"
    print(f"\n{args.nodes} {where}, {args.ranks_per_node} rank(s) per node; {args.steps} steps, {args.warmup} warm-up, median of {args.repeat} runs; "
          f"{time.time() - started:.0f} s\n")
    print(report)
    meta = {"nodes": args.nodes, "ranks_per_node": args.ranks_per_node, "bandwidth": args.bandwidth, "latency": args.latency, "emulated": emulated,
            "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat, "model": MODEL,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(args.out).with_suffix(".md").write_text(report + "\n")
    try:
        plot(rows, Path(args.out).with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plot")
    print(f"\nwrote {args.out} (+ .md, .png); median spread: "
          f"{statistics.median([max(r['runs_samples_per_second']) / min(r['runs_samples_per_second']) for r in rows if 'runs_samples_per_second' in r]):.2f}x max/min")


if __name__ == "__main__":
    main()
