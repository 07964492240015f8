"""The main job: training throughput per compression ratio on an emulated multi-node cluster.

Every configuration trains a real architecture (GPT-2-style byte LM or ResNet, from ``transformers``
configs, random init; :mod:`workloads.train`) for a fixed number of steps across ``--nodes``
network namespaces joined by ``tc``-shaped links (:mod:`commlib.launch.cluster`), one rank per node.
The baselines run in the same sweep: DDP's dense allreduce, PyTorch's fp16 hook and PyTorch's
PowerSGD hook (marked ``crashed`` where it crashes). For each configuration it reports samples/s
(median step after warm-up), bytes on the wire per step (the hook's count and the node's NIC
counter), the compression ratio, the held-out loss at the end, and the link's limit (the seconds
per step the link needs for those bytes, as samples/s). Results go to JSON, a Markdown table and a
matplotlib plot of throughput and final loss against compression ratio, one line per method.

    sudo python benchmarks/throughput.py                # embedded default: 2 nodes, small model, < 5 min
    sudo python benchmarks/throughput.py --full          # the headline sweep (GPT-2-style + ResNet)

Without root it falls back to unshaped loopback and says so (figures are then compute-bound).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_output import bandwidth_bytes_per_second, table_cell  # noqa: E402

from commlib.launch.cluster import EmulatedCluster, open_cluster  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# (method line in the plot, hook, extra workload arguments)
QUICK = [
    ("dense allreduce", "none", []),
    # the compute-only ceiling: DDP with a hook that sends nothing (parameters drift apart; timing only)
    ("no communication (ceiling)", "dp_ef", []),
    ("torch fp16", "torch_fp16", []),
    ("torch PowerSGD", "torch_powersgd", ["--option", "rank=4"]),
    ("commlib fp16", "fp16", []),
    ("commlib PowerSGD", "powersgd", ["--option", "rank=1"]),
    # PowerSGD sends KBs: one bucket means one P and one Q round per step instead of per 25 MB bucket
    ("commlib PowerSGD", "powersgd", ["--option", "rank=1", "--bucket-cap-mb", "1000"]),
    ("commlib PowerSGD", "powersgd", ["--option", "rank=4"]),
    ("commlib EF top-k", "ef", ["--compressor", "TopK(density=0.01)"]),
    ("commlib EF QSGD", "ef", ["--compressor", "QSGD(bits=4)", "--option", "collective=two_phase"]),
    ("commlib EF sign", "ef", ["--compressor", "Sign()", "--option", "collective=two_phase"]),
    ("commlib L-GreCo", "lgreco", ["--option", "family=powersgd", "--option", "rank=4",
                                   "--option", "retune_every=100", "--option", "accumulate_steps=2"]),
]
FULL_EXTRA = [
    ("torch PowerSGD", "torch_powersgd", ["--option", "rank=4", "--bucket-cap-mb", "4096"]),
    ("torch PowerSGD", "torch_powersgd", ["--option", "rank=16", "--bucket-cap-mb", "4096"]),
    ("commlib PowerSGD", "powersgd", ["--option", "rank=16"]),
    ("commlib EF top-k", "ef", ["--compressor", "TopK(density=0.1)"]),
    ("commlib EF top-k", "ef", ["--compressor", "TopK(density=0.001)"]),
    ("commlib EF QSGD", "ef", ["--compressor", "QSGD(bits=8)", "--option", "collective=two_phase"]),
    ("commlib EF QSGD", "ef", ["--compressor", "QSGD(bits=2)", "--option", "collective=two_phase"]),
]
# the FSDP2 rows of `--fsdp` (labels of bench_fsdp.CONFIGS)
FSDP_IN_MAIN = ("DDP + AdamW (reference)", "FSDP2 + AdamW", "FSDP2, RS sends nothing (ceiling)",
                "FSDP2 + RS QSGD 8-bit", "FSDP2 + int8 AG + RS QSGD 8-bit", "FSDP2 + GaLore (dct)")
# GaLore / Fira / FRUGAL over DDP's dense all-reduce and through the lowrank hook (projected gradients
# on the wire), a refresh every 10 steps so that refresh steps (sent dense) are part of the timing
_GAP = ["--update-proj-gap", "10"]
LOWRANK = [
    ("galore dct, dense DDP", "none", ["--optimizer", "galore", *_GAP]),
    ("galore dct, lowrank hook", "lowrank", ["--optimizer", "galore", *_GAP]),
    ("galore svd, dense DDP", "none", ["--optimizer", "galore", "--projector", "svd", *_GAP]),
    ("galore svd, lowrank hook", "lowrank", ["--optimizer", "galore", "--projector", "svd", *_GAP]),
    ("fira dct, dense DDP", "none", ["--optimizer", "fira", *_GAP]),
    ("fira dct, lowrank hook", "lowrank", ["--optimizer", "fira", *_GAP, "--option", "residual=none"]),
    ("frugal dct, dense DDP", "none", ["--optimizer", "frugal", *_GAP]),
    ("frugal dct, lowrank hook", "lowrank", ["--optimizer", "frugal", *_GAP, "--option", "residual=none"]),
    ("fira dct, lowrank hook, sign residual", "lowrank", ["--optimizer", "fira", *_GAP, "--compressor", "Sign()"]),
    ("frugal dct, lowrank hook, sign residual", "lowrank", ["--optimizer", "frugal", *_GAP, "--compressor", "Sign()"]),
]
# multi-GPU nodes (--hierarchy, with --ranks-per-node L): each method flat (every rank exchanges its
# own payload across the NIC) and hierarchical (dense in the node, the 1/L piece across it)
_FLAT, _HIER = ["--option", "hierarchical=False"], ["--option", "hierarchical=True"]
_HIER_METHODS = [
    ("commlib allreduce", "allreduce", []),
    ("commlib fp16", "fp16", []),
    ("commlib EF sign", "ef", ["--compressor", "Sign()", "--option", "collective=two_phase"]),
    ("commlib EF QSGD", "ef", ["--compressor", "QSGD(bits=4)", "--option", "collective=two_phase"]),
    ("commlib EF top-k", "ef", ["--compressor", "TopK(density=0.01)"]),
    ("commlib EF21 top-k", "ef21", ["--compressor", "TopK(density=0.01)"]),
    ("commlib PowerSGD", "powersgd", ["--option", "rank=4"]),
]
HIERARCHY = [("dense allreduce", "none", [])] + [
    (f"{label}, {kind}", hook, extra + flag) for label, hook, extra in _HIER_METHODS
    for kind, flag in (("flat", _FLAT), ("hierarchical", _HIER))]
MODELS = {
    # GPT-2-style: wide and shallow with short sequences, so that gradients are large next to compute
    "gpt2": ["--model", "gpt2", "--dim", "512", "--layers", "2", "--heads", "8", "--context", "16", "--batch", "4"],
    "gpt2-large": ["--model", "gpt2", "--dim", "768", "--layers", "2", "--heads", "12", "--context", "16",
                   "--batch", "4"],
    "gpt2-xl": ["--model", "gpt2", "--dim", "1024", "--layers", "2", "--heads", "16", "--context", "16",
                "--batch", "4"],
    "resnet": ["--model", "resnet", "--dim", "64", "--batch", "16"],
    # communication-heavy: 8 x Linear(1024), 8.4M parameters, little compute per byte
    "mlp": ["--model", "mlp", "--dim", "1024", "--layers", "8", "--batch", "16"],
}


def setting_label(hook: str, extra: list[str]) -> str:
    parts = []
    for flag, value in zip(extra[::2], extra[1::2]):
        if value.startswith("hierarchical="):
            continue  # said by the method's label
        parts.append(f"one {value} MB bucket" if flag == "--bucket-cap-mb" else value)
    return ", ".join(parts) if parts else "-"


def run_one(cluster, model_args, hook, extra, steps, warmup, port, ranks_per_node: int = 1) -> dict:
    args = ["-m", "workloads.train", *model_args, "--hook", hook, *extra, "--steps", str(steps),
            "--warmup", str(warmup), "--timeout", "120"]
    try:
        outputs = cluster.torchrun(args, nproc_per_node=ranks_per_node, port=port, timeout=900)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raised = [ln for ln in lines if ("Error:" in ln or "Exception:" in ln or "error:" in ln)
                  and not ln.startswith("File ") and "ChildFailedError" not in ln and "elastic" not in ln]
        reason = raised[-1] if raised else (lines[-1] if lines else "failed")
        return {"crashed": True, "reason": reason.strip()[:300], "stderr_tail": "\n".join(lines[-60:])}
    for line in outputs[0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"crashed": True, "reason": "no result line"}


def table(rows: list[dict], link_bps: float | None) -> str:
    head = ("| model | method | setting | samples/s | vs dense | bytes/step (hook) | wire bytes/step | ratio "
            "| link limit samples/s | link share of step | held-out loss | vs dense |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    # each row against dense DDP with the same optimizer
    dense = {(r["model_name"], r.get("optimizer", "adamw"), r.get("projector")): r for r in rows
             if r["hook"] == "none" and not r.get("crashed")}
    for r in rows:
        if r.get("crashed"):
            out.append(f"| {r['model_name']} | {r['method']} | {r['setting']} | crashed: {table_cell(r['reason'])} "
                       "| | | | | | | | |")
            continue
        base = dense.get((r["model_name"], r.get("optimizer", "adamw"), r.get("projector")))
        speed = f"{r['samples_per_second'] / base['samples_per_second']:.2f}x" if base else "-"
        dloss = f"{100 * (r['eval_loss'] / base['eval_loss'] - 1):+.2f}%" if base else "-"
        wire = r.get("wire_tx_bytes_per_step")
        link_s = (wire if wire else r["bytes_per_step"]) / link_bps if link_bps else None
        samples = r["samples_per_second"] * r["step_seconds_median"]
        limit = f"{samples / link_s:,.0f}" if link_s else "-"
        share = f"{100 * link_s / r['step_seconds_median']:.0f}%" if link_s else "-"
        out.append(f"| {r['model_name']} | {r['method']} | {r['setting']} | {r['samples_per_second']:.1f} | {speed} "
                   f"| {r['bytes_per_step']:,.0f} | {f'{wire:,.0f}' if wire else '-'} | {r['compression_ratio']:.1f}x "
                   f"| {limit} | {share} | {r['eval_loss']:.4f} | {dloss} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model_name"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}  # one color per method everywhere
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        ok = [r for r in rows if r["model_name"] == model and not r.get("crashed")
              and r["compression_ratio"] != float("inf")]  # the no-communication ceiling has no ratio
        for method in dict.fromkeys(r["method"] for r in ok):
            pts = sorted((r["compression_ratio"], r["samples_per_second"], r["eval_loss"])
                         for r in ok if r["method"] == method)
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1] for p in pts], marker="o", label=method, color=colors[method])
            axes[1][col].plot(xs, [p[2] for p in pts], marker="o", label=method, color=colors[method])
        for ax, ylabel in zip((axes[0][col], axes[1][col]), ("samples/s", "held-out loss")):
            ax.set_xscale("log")
            ax.set_xlabel("compression ratio (dense bytes / bytes sent)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0][col].set_title(f"{model}")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--bandwidth", default="1gbit")
    parser.add_argument("--latency", default="0.5ms")
    parser.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="the headline sweep: more settings, both models")
    parser.add_argument("--only", help="comma list: run only configurations whose method or setting contains one")
    parser.add_argument("--lowrank", action="store_true",
                        help="run the low-rank optimizer rows (dense DDP vs the lowrank hook) instead of the hooks")
    parser.add_argument("--fsdp", action="store_true",
                        help="also run FSDP2 rows (plain, compressed, low-rank; from bench_fsdp.py) as a second table")
    parser.add_argument("--ranks-per-node", type=int, default=1,
                        help="ranks per emulated node (they share its namespace: intra-node traffic is loopback)")
    parser.add_argument("--hierarchy", action="store_true",
                        help="run the multi-GPU-node rows: each method flat and hierarchical (use --ranks-per-node)")
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    args = parser.parse_args()
    models = (args.models or ("gpt2-large,resnet" if args.full else "gpt2")).split(",")
    steps = args.steps or (60 if args.full else 20)
    warmup = args.warmup or (10 if args.full else 6)
    configs = (HIERARCHY if args.hierarchy else LOWRANK if args.lowrank
               else QUICK + (FULL_EXTRA + LOWRANK if args.full else []))
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        configs = [c for c in configs if any(w in f"{c[0]} {setting_label(c[1], c[2])}".lower() for w in wanted)]
    jobs = [(m, c) for m in models for c in configs]

    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    cluster = open_cluster(args.nodes, args.bandwidth, args.latency, log=lambda m: print(m, file=sys.stderr))
    emulated = isinstance(cluster, EmulatedCluster)
    link_bps = bandwidth_bytes_per_second(args.bandwidth) if emulated else None
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the bench extra installs it
        def tqdm(it, **_):
            return it
    started = time.time()
    with cluster:
        bar = tqdm(jobs, desc="throughput", unit="config")
        for i, (model_name, (method, hook, extra)) in enumerate(bar):
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{model_name} {method} {setting_label(hook, extra)}")
            r = run_one(cluster, MODELS[model_name], hook, extra, steps, warmup, port=29500 + i % 50,
                        ranks_per_node=args.ranks_per_node)
            r.update(model_name=model_name, method=method, hook=hook, setting=setting_label(hook, extra))
            r.pop("losses", None)
            r.pop("step_seconds", None)
            rows.append(r)
        fsdp_rows = []
        if args.fsdp:  # the same cluster, model (bench_fsdp.MODEL == MODELS["gpt2"]) and step counts
            import bench_fsdp

            picked = [c for c in bench_fsdp.CONFIGS if c[0] in FSDP_IN_MAIN]
            fsdp_rows = bench_fsdp.sweep(cluster, picked, steps, warmup, 1)
    report = table(rows, link_bps)
    if fsdp_rows:
        report += "\n\nFSDP2 (gpt2 model; vs plain FSDP2, DDP + AdamW as the reference row):\n\n"
        report += bench_fsdp.table(fsdp_rows, link_bps)
    where = f"emulated nodes, links shaped to {args.bandwidth}" if emulated else "ranks on UNSHAPED loopback"
    print(f"\n{args.nodes} {where}, {args.ranks_per_node} rank(s) per node"
          f"{'' if not emulated or cluster.latency_emulated else ' (no added latency: no sch_netem)'}; "
          f"{steps} steps, {warmup} warm-up; {time.time() - started:.0f} s\n")
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"nodes": args.nodes, "ranks_per_node": args.ranks_per_node, "bandwidth": args.bandwidth,
            "latency": args.latency, "emulated": emulated,
            "latency_emulated": bool(emulated and cluster.latency_emulated), "steps": steps, "warmup": warmup,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "fsdp_rows": fsdp_rows}, indent=1))
    Path(args.out).with_suffix(".md").write_text(report + "\n")
    png = Path(args.out).with_suffix(".png")
    try:
        plot(rows, png)
        print(f"\nwrote {args.out}, {Path(args.out).with_suffix('.md')} and {png}")
    except ImportError:
        print(f"\nwrote {args.out}; matplotlib is not installed (pip install -e .[bench]) so no plot")


if __name__ == "__main__":
    main()
