"""Wall-clock time to train J jobs with the coded runtime under injected bursty stragglers:
uncoded wait-for-all, GC(s), SR-SGC and M-SGC (Krishnan, Ebrahimi, Khisti, ICLR 2023).

Every configuration is a real run of ``python -m workloads.coded`` under torchrun (gloo; or
mpiexec with ``--transport mpi``): one master and n worker processes training ``T + 1`` digit MLPs
concurrently (the largest T of the compared schemes, so all schemes train the same models on the same
batches). Worker w's emulated work in round r lasts ``job_seconds x load x (1 + Exp(jitter))``, times
``slowdown`` while w is in a burst; the bursts are one pattern sampled from the (B, W, lambda) model,
the same for every scheme. The master closes a round at ``(1 + mu)`` x the first arrival when the
scheme tolerates the missing workers, else it waits. Reported per scheme: median wall-clock over
``--repeats`` runs, speed-up against GC(lambda), rounds with masked stragglers, rounds kept open, the
load per round (measured from the assignments, and the formula), and the held-out loss of each model
(all schemes decode the same gradients, so the same losses).

    python benchmarks/bench_sgc.py                 # n = 4 and 8 workers, ~6 min; JSON + plot
    python benchmarks/bench_sgc.py --workers 8 --repeats 1 --jobs 40   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_output import write_results  # noqa: E402

from commlib.coding import MSGC, SRSGC  # noqa: E402
from commlib.coding.runtime import make_scheme  # noqa: E402


def configurations(n: int, B: int, W: int, lam: int) -> list[tuple[str, list[str]]]:
    """(label, runtime arguments): uncoded, GC(lambda) (the paper's baseline), GC at SR-SGC's s (equal
    load to SR-SGC), SR-SGC, M-SGC."""
    s_sr = SRSGC.parameter_s(B, W, lam)
    out = [("uncoded (wait for all)", ["--scheme", "uncoded"]),
           (f"GC(s={lam})", ["--scheme", "gc", "--tolerance", str(lam)])]
    if s_sr != lam:
        out.append((f"GC(s={s_sr})", ["--scheme", "gc", "--tolerance", str(s_sr)]))
    if (W - 1) % B == 0:
        out.append((f"SR-SGC (s={s_sr})", ["--scheme", "srsgc"]))
    out.append(("M-SGC", ["--scheme", "msgc"]))
    return out


def launch(n: int, args: list[str], transport: str, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if transport == "mpi":
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        cmd = [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", str(n + 1), sys.executable,
               "-m", "workloads.coded", *args, "--transport", "mpi"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n + 1),
               "-m", "workloads.coded", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"failure": f"exit {proc.returncode}: {proc.stderr[-800:]}"}


def run_setting(n, B, W, lam, jobs, job_seconds, slowdown, jitter, probability, mu, repeats, transport, seed):
    labels = configurations(n, B, W, lam)
    schemes = {label: make_scheme(a[1], n, s=int(a[3]) if "--tolerance" in a else 1, B=B, W=W, lam=lam) for label, a in labels}
    T = max(s.T for s in schemes.values())
    batch = math.lcm(*(s.batch_unit for s in schemes.values()))
    while batch < 96:
        batch *= 2
    common = ["--jobs", str(jobs), "--batch", str(batch), "--models", str(T + 1), "--B", str(B), "--W", str(W),
              "--lam", str(lam), "--mu", str(mu), "--job-seconds", str(job_seconds), "--jitter", str(jitter),
              "--slowdown", str(slowdown), "--burst-probability", str(probability),
              "--burst-rounds", str(jobs + T), "--dead-after", "60"]
    rows = []
    for label, scheme_args in labels:
        runs = []
        for rep in range(repeats):
            result = launch(n, scheme_args + common + ["--seed", str(seed + rep)], transport,
                            timeout=60 + 20 * jobs * job_seconds * slowdown)
            if result.get("failure"):
                print(f"  {label}: FAILED {result['failure'][:300]}", flush=True)
            runs.append(result)
            print(f"  n={n} {label:24s} rep {rep}: {result.get('wall_seconds', float('nan')):7.2f} s", flush=True)
        ok = [r for r in runs if not r.get("failure")]
        scheme = schemes[label]
        rows.append({
            "scheme": label, "n": n, "T": scheme.T, "formula_load": scheme.normalized_load,
            "measured_load": ok[0]["measured_load"] if ok else None,
            "measured_load_max": ok[0]["measured_load_max"] if ok else None,
            "wall_seconds": [r.get("wall_seconds") for r in ok],
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in ok) if ok else None,
            "straggler_rounds": [r["straggler_rounds"] for r in ok],
            "waited_rounds": [r["waited_rounds"] for r in ok],
            "late_results": [r["late_results"] for r in ok],
            "held_out_loss": ok[0]["held_out_loss"] if ok else None,
            "digests_agree": len({r["digest"] for r in ok}) <= 1,
            "failures": [r["failure"] for r in runs if r.get("failure")],
        })
    baseline = next(r for r in rows if r["scheme"] == f"GC(s={lam})")["median_wall_seconds"]
    for row in rows:
        if row["median_wall_seconds"] and baseline:
            row["vs_gc_lambda"] = baseline / row["median_wall_seconds"]
    return {"n": n, "B": B, "W": W, "lam": lam, "jobs": jobs, "batch": batch, "models": T + 1, "rows": rows}


def table(setting) -> str:
    lines = [f"n = {setting['n']} workers, (B, W, lambda) = ({setting['B']}, {setting['W']}, {setting['lam']}), "
             f"{setting['jobs']} jobs, batch {setting['batch']}, {setting['models']} models",
             "| scheme | T | load (formula) | load (measured) | wall s (median) | vs GC(lambda) | straggler rounds | "
             "rounds kept open | held-out loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in setting["rows"]:
        loss = "/".join(f"{v:.4f}" for v in r["held_out_loss"]) if r["held_out_loss"] else "-"
        wall = f"{r['median_wall_seconds']:.2f}" if r["median_wall_seconds"] else "failed"
        lines.append(f"| {r['scheme']} | {r['T']} | {r['formula_load']:.4f} | "
                     f"{r['measured_load'] if r['measured_load'] is None else round(r['measured_load'], 4)} | {wall} | "
                     f"{r.get('vs_gc_lambda', float('nan')):.2f}x | {r['straggler_rounds']} | {r['waited_rounds']} | {loss} |")
    return "\n".join(lines)


def paper_loads(n: int = 256) -> list[dict]:
    """The note's n = 256 load table from the formulas (no runs)."""
    out = []
    for B, W, lam in [(1, 2, 4), (1, 3, 8), (2, 5, 16), (2, 7, 32)]:
        s = SRSGC.parameter_s(B, W, lam)
        out.append({"B": B, "W": W, "lam": lam, "gc_load_x_n": lam + 1, "srsgc_load_x_n": s + 1,
                    "msgc_load_x_n": MSGC.load_formula(n, B, W, lam) * n})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    p.add_argument("--jobs", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--job-seconds", type=float, default=0.6)
    p.add_argument("--slowdown", type=float, default=5.0)
    p.add_argument("--jitter", type=float, default=0.05)
    p.add_argument("--burst-probability", type=float, default=0.08)
    p.add_argument("--mu", type=float, default=0.5)
    p.add_argument("--transport", default="gloo", choices=["gloo", "mpi"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_sgc.json"))
    args = p.parse_args(argv)
    models = {4: (1, 2, 1), 6: (1, 3, 2), 8: (1, 3, 2)}
    settings = []
    begin = time.monotonic()
    for n in args.workers:
        B, W, lam = models.get(n, (1, 3, 2))
        print(f"n = {n}, (B, W, lambda) = ({B}, {W}, {lam})", flush=True)
        settings.append(run_setting(n, B, W, lam, args.jobs, args.job_seconds, args.slowdown, args.jitter,
                                    args.burst_probability, args.mu, args.repeats, args.transport, args.seed))
        print(table(settings[-1]), flush=True)
    payload = {"settings": settings, "paper_loads_n256": paper_loads(), "seconds": time.monotonic() - begin,
               "arguments": vars(args)}

    def draw(plt):
        fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            rows = [r for r in setting["rows"] if r["median_wall_seconds"]]
            names = [r["scheme"] for r in rows]
            ax.bar(range(len(rows)), [r["median_wall_seconds"] for r in rows], color="tab:blue")
            for i, r in enumerate(rows):
                ax.text(i, r["median_wall_seconds"], f"load {r['formula_load']:.3f}", ha="center", va="bottom",
                        fontsize=8)
            ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
            ax.set_ylabel(f"seconds for {setting['jobs']} jobs (median)")
            ax.set_title(f"n={setting['n']}, (B,W,lambda)=({setting['B']},{setting['W']},{setting['lam']})")
        return fig

    write_results(args.out, payload, draw, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
