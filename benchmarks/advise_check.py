"""The advisor's cost model against the emulated-cluster scaling study, and its table for common clusters.

    python benchmarks/advise_check.py

Inputs: ``benchmarks/results/scaling/n{nodes}_{bandwidth}.json``, written by ``throughput.py`` runs
on 2 and 4 emulated nodes at 100 Mbit/s, 1 Gbit/s and 10 Gbit/s (see the README). Steps:

1. the hooks' per-element costs are timed on this machine (:func:`commlib.advise.calibrate`, one
   thread, the hooks' own code), uncontended, before anything else runs;
2. three network constants are fitted on the **dense rows only**: the share of the shaped link a
   gloo collective achieves, a host-side transfer cap (gloo's TCP copies run on the same two cores
   as training) and the overlap of communication with compute;
3. every compressed row is then predicted out of sample: compute time = the no-communication row
   of the same run, payload = the hook's byte count of that row, hook time = calibrated cost x
   parameters x (ranks per core when ranks outnumber cores).

4. with ``throughput_hier_2x2.json`` (``throughput.py --hierarchy --ranks-per-node 2``) and a
   ceiling run of the same shape (``throughput_ceiling_2x2.json``): the flat and two-level rows at
   2 nodes x 2 ranks, with the intra-node fabric fitted on the one dense two-level row and the
   hook costs scaled by one contention factor fitted on the 1-rank-per-node rows.

Writes ``benchmarks/results/advise_check.{json,md}`` (prediction error per point and overall) and
``benchmarks/results/advise_table.md`` (the advisor's defaults for common cluster shapes).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commlib import advise  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# throughput.py rows -> advisor methods
ROW_TO_METHOD = {
    ("dense allreduce", "-"): "dense all-reduce",
    ("commlib fp16", "-"): "fp16 cast",
    ("commlib PowerSGD", "rank=4"): "PowerSGD rank 4",
    ("commlib EF sign", "Sign(), collective=two_phase"): "EF sign, two-phase",
    ("commlib EF top-k", "TopK(density=0.01)"): "EF top-k 1%",
}
LATENCY_US = 50.0  # TCP over veth, no added delay (the kernel has no sch_netem)


def load_points() -> list[dict]:
    points = []
    for path in sorted((RESULTS / "scaling").glob("n*_*.json")):
        data = json.loads(path.read_text())
        meta, rows = data["meta"], data["rows"]
        ceiling = next(r for r in rows if r["method"] == "no communication (ceiling)" and not r.get("crashed"))
        dense = next(r for r in rows if r["method"] == "dense allreduce" and not r.get("crashed"))
        for r in rows:
            key = (r["method"], r["setting"])
            if r.get("crashed") or key not in ROW_TO_METHOD:
                continue
            points.append({"nodes": meta["nodes"], "bandwidth": meta["bandwidth"],
                           "gbit": advise_gbit(meta["bandwidth"]), "method": ROW_TO_METHOD[key],
                           "step_seconds": r["step_seconds_median"], "payload_bytes": r["bytes_per_step"],
                           "compute_seconds": ceiling["step_seconds_median"],
                           "dense_step_seconds": dense["step_seconds_median"],
                           "params": dense["bytes_per_step"] / 4})
    return points


def advise_gbit(text: str) -> float:
    for unit, scale in (("gbit", 1.0), ("mbit", 1e-3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)


def predict_point(p: dict, costs: dict, efficiency: float, transfer_gbps: float, overlap: float,
                  intra_gbps: float = 200.0, mem_gbps: float = 2000.0) -> float:
    """The advisor's step time for one measured point (``ranks_per_node`` and ``hierarchical`` where
    the point has them; ``intra_gbps`` and ``mem_gbps`` only matter to the two-level form)."""
    cores = os.cpu_count() or 1
    local = p.get("ranks_per_node", 1)
    cluster = advise.Cluster(p["nodes"], local, p["gbit"], LATENCY_US, efficiency, transfer_gbps,
                             hook_slowdown=max(1.0, p["nodes"] * local / cores), intra_gbps=intra_gbps)
    hierarchical = p.get("hierarchical", False)
    name = f"{p['method']}, hierarchical" if hierarchical else p["method"]
    method = next(m for m in (advise.HIERARCHICAL_METHODS if hierarchical else advise.METHODS) if m.name == name)
    return advise.predict(method, cluster, p["params"], p["compute_seconds"], overlap=overlap,
                          seconds_per_element=costs.get(p["method"], 0.0), mem_gbps=mem_gbps,
                          payload_bytes=p["payload_bytes"]).step_seconds


def score(points: list[dict], predict) -> list[dict]:
    """Each point with its predicted step time and speedup against dense all-reduce (both from
    ``predict(point)``), its measured speedup and the relative speedup error."""
    rows = []
    for p in points:
        predicted = predict(p)
        dense = predict({**p, "method": "dense all-reduce", "hierarchical": False, "payload_bytes": 4 * p["params"]})
        measured = p["dense_step_seconds"] / p["step_seconds"]
        rows.append({**p, "predicted_step_seconds": predicted, "measured_speedup": measured,
                     "predicted_speedup": dense / predicted, "speedup_error": dense / predicted / measured - 1})
    return rows


def compressed_errors(rows: list[dict]) -> list[float]:
    """|speedup error| of the rows that compress (dense rows are the fits' and the reference)."""
    return [abs(r["speedup_error"]) for r in rows if r["method"] != "dense all-reduce"]


def fit(points: list[dict], costs: dict) -> tuple[float, float, float]:
    """Least squares in log step time over the dense rows, on a grid."""
    dense = [p for p in points if p["method"] == "dense all-reduce"]
    best, best_err = None, math.inf
    for eff, cap, ov in itertools.product([0.3 + 0.05 * i for i in range(15)],
                                          [10 ** (-1.5 + 0.1 * i) for i in range(26)],
                                          [0.1 * i for i in range(11)]):
        err = sum((math.log(predict_point(p, costs, eff, cap, ov)) - math.log(p["step_seconds"])) ** 2
                  for p in dense)
        if err < best_err:
            best, best_err = (eff, cap, ov), err
    return best


# throughput.py --hierarchy rows (2 nodes x 2 ranks) -> advisor methods; EF21 has no advisor row
HIER_ROW_TO_METHOD = {
    "dense allreduce": "dense all-reduce",
    "commlib allreduce, hierarchical": "dense all-reduce",
    "commlib fp16": "fp16 cast",
    "commlib EF sign": "EF sign, two-phase",
    "commlib EF QSGD": "EF QSGD 4-bit, two-phase",
    "commlib EF top-k": "EF top-k 1%",
    "commlib PowerSGD": "PowerSGD rank 4",
}
HIER_FILES = ("throughput_hier_2x2.json", "throughput_hier_powersgd_2x2.json")
CEILING_FILE = "throughput_ceiling_2x2.json"


def load_hierarchy_points() -> tuple[list[dict], dict] | None:
    """The 2 x 2 rows of ``throughput.py --hierarchy`` with the ceiling and dense rows of
    ``throughput_ceiling_2x2.json`` (a separate run of the same shape, for the compute time)."""
    if not (RESULTS / CEILING_FILE).exists() or not (RESULTS / HIER_FILES[0]).exists():
        return None
    ceiling_run = json.loads((RESULTS / CEILING_FILE).read_text())
    ceiling = next(r for r in ceiling_run["rows"] if r["method"] == "no communication (ceiling)")
    main = json.loads((RESULTS / HIER_FILES[0]).read_text())
    meta = main["meta"]
    dense = next(r for r in main["rows"] if r["method"] == "dense allreduce")
    points = []
    for name in HIER_FILES:
        path = RESULTS / name
        if not path.exists():
            continue
        for r in json.loads(path.read_text())["rows"]:
            label = r["method"]
            hierarchical = label.endswith(", hierarchical")
            base = label.removesuffix(", hierarchical").removesuffix(", flat")
            method = HIER_ROW_TO_METHOD.get(label) or HIER_ROW_TO_METHOD.get(base)
            if r.get("crashed") or method is None or label == "commlib allreduce, flat":
                continue
            local = meta["ranks_per_node"]
            points.append({"nodes": meta["nodes"], "ranks_per_node": local, "bandwidth": meta["bandwidth"],
                           "gbit": advise_gbit(meta["bandwidth"]), "row": label, "method": method,
                           "hierarchical": hierarchical, "step_seconds": r["step_seconds_median"],
                           # the hook books one rank's rail bytes: the piece, 1/L of the per-rank payload
                           "payload_bytes": r["bytes_per_step"] * (local if hierarchical else 1),
                           "compute_seconds": ceiling["step_seconds_median"],
                           "dense_step_seconds": dense["step_seconds_median"], "params": dense["bytes_per_step"] / 4,
                           "source": name})
    return points, {"ceiling_step_seconds": ceiling["step_seconds_median"],
                    "dense_step_seconds_ceiling_run": next(r for r in ceiling_run["rows"]
                                                           if r["method"] == "dense allreduce")["step_seconds_median"],
                    "dense_step_seconds": dense["step_seconds_median"]}


def copy_gbps(numel: int = 1 << 24, repeats: int = 7) -> float:
    """This machine's memcpy bandwidth (read + write, GB/s), the limit of the two-level copies."""
    import time

    import torch

    src, dst = torch.randn(numel), torch.empty(numel)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / statistics.median(times) / 1e9


def fit_contention(points: list[dict], costs: dict, efficiency: float, transfer_gbps: float,
                   overlap: float) -> float:
    """One factor on every calibrated hook cost, for hooks that run next to backward and gloo's
    threads instead of alone: the median speedup error over the compressed 1-rank-per-node rows
    (in sample there), minimised on a grid."""
    grid = [1.0 + 0.25 * i for i in range(29)]
    return min(grid, key=lambda k: statistics.median(compressed_errors(score(
        points, lambda p: predict_point(p, {m: k * v for m, v in costs.items()}, efficiency, transfer_gbps,
                                        overlap)))))


def check_hierarchy(costs: dict, efficiency: float, transfer_gbps: float, overlap: float,
                    contention: float = 1.0) -> tuple[str, dict] | None:
    """The 2 x 2 points: the intra-node fabric (gloo over loopback on shared cores) is fitted on the
    one dense hierarchical row, as the link constants are on the dense rows, and the hook costs are
    scaled by ``contention`` (fitted on the 1-rank-per-node rows); every compressed row, flat and
    hierarchical, is then predicted out of sample."""
    loaded = load_hierarchy_points()
    if loaded is None:
        return None
    points, info = loaded
    costs = {m: contention * v for m, v in costs.items()}
    mem = copy_gbps()
    fit_row = next(p for p in points if p["row"] == "commlib allreduce, hierarchical")
    intra, best = None, math.inf
    for gbps in (10 ** (-1.5 + 0.02 * i) for i in range(200)):
        err = abs(math.log(predict_point(fit_row, costs, efficiency, transfer_gbps, overlap, gbps, mem))
                  - math.log(fit_row["step_seconds"]))
        if err < best:
            intra, best = gbps, err
    out = [{**r, "fitted_on": r["method"] == "dense all-reduce"}
           for r in score(points, lambda p: predict_point(p, costs, efficiency, transfer_gbps, overlap, intra, mem))]
    errors = compressed_errors(out)
    lines = [f"2 nodes x 2 ranks, 1 Gbit/s (`{HIER_FILES[0]}`, PowerSGD from `{HIER_FILES[1]}`, compute time "
             f"from the ceiling row of `{CEILING_FILE}`: {1e3 * info['ceiling_step_seconds']:.0f} ms; its dense row "
             f"{1e3 * info['dense_step_seconds_ceiling_run']:.0f} ms against {1e3 * info['dense_step_seconds']:.0f} ms "
             f"in the main run). Link constants from the fit above; the intra-node fabric fitted on the dense "
             f"hierarchical row: {intra:.2f} GB/s per rank (NVLink: ~200); memcpy here {mem:.1f} GB/s; hook costs "
             f"x {contention:.2f} (the contention factor).", "",
             "| row | measured step | predicted step | measured speedup | predicted speedup | error |",
             "|---|---|---|---|---|---|"]
    for r in out:
        tag = " (fitted)" if r["hierarchical"] and r["fitted_on"] else " (reference)" if r["fitted_on"] else ""
        lines.append(f"| {r['row']}{tag} | {1e3 * r['step_seconds']:.0f} ms "
                     f"| {1e3 * r['predicted_step_seconds']:.0f} ms | {r['measured_speedup']:.2f}x "
                     f"| {r['predicted_speedup']:.2f}x | {100 * r['speedup_error']:+.0f}% |")
    lines += ["", f"Compressed rows at 2 x 2, out of sample: {len(errors)} points, median |error| "
              f"{100 * statistics.median(errors):.0f}%, max {100 * max(errors):.0f}%, within 20%: "
              f"{sum(e <= 0.2 for e in errors)}/{len(errors)}."]
    return "\n".join(lines), {"intra_gbps": intra, "memcpy_gbps": mem, "contention": contention, **info,
                              "points": out}


def common_clusters_table() -> str:
    rows = ["| model | cluster | link | dense step | best method | its speedup | PowerSGD r4 | EF sign 2-phase "
            "| EF top-k 1% | fp16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for params in (1.3e9, 7e9):
        for nodes, gbit in ((2, 10), (16, 25), (16, 100), (64, 100), (64, 400)):
            cluster = advise.Cluster(nodes, 8, gbit)
            compute = advise.compute_seconds_for(params, 8192, 400.0)
            preds = {p.method: p for p in advise.advise(cluster, params, compute,
                                                        hidden=advise.hidden_for(params))}
            best = max(preds.values(), key=lambda p: p.speedup)
            rows.append(f"| {params / 1e9:g}B | {nodes} x 8 GPUs | {gbit:g} Gbit/s "
                        f"| {1e3 * preds['dense all-reduce'].step_seconds:,.0f} ms | {best.method} "
                        f"| {best.speedup:.2f}x | {preds['PowerSGD rank 4'].speedup:.2f}x "
                        f"| {preds['EF sign, two-phase'].speedup:.2f}x | {preds['EF top-k 1%'].speedup:.2f}x "
                        f"| {preds['fp16 cast'].speedup:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    costs = advise.calibrate(threads=1)  # first, while nothing else runs
    points = load_points()
    if not points:
        raise SystemExit("no scaling results: run the throughput.py scaling study first (README)")
    efficiency, transfer_gbps, overlap = fit(points, costs)
    out = score(points, lambda p: predict_point(p, costs, efficiency, transfer_gbps, overlap))
    errors = compressed_errors(out)
    lines = [f"Fitted on the {sum(p['method'] == 'dense all-reduce' for p in points)} dense rows: link efficiency "
             f"{efficiency:.2f}, host transfer cap {transfer_gbps:.2f} GB/s, overlap {overlap:.1f}. Hook costs "
             "timed here (ns/element, 1 thread): "
             + ", ".join(f"{k} {1e9 * v:.2f}" for k, v in costs.items()) + ".", "",
             "| nodes | link | method | measured step | predicted step | measured speedup | predicted speedup "
             "| error |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(out, key=lambda r: (r["nodes"], advise_gbit(r["bandwidth"]), r["method"])):
        lines.append(f"| {r['nodes']} | {r['bandwidth']} | {r['method']} | {1e3 * r['step_seconds']:.0f} ms "
                     f"| {1e3 * r['predicted_step_seconds']:.0f} ms | {r['measured_speedup']:.2f}x "
                     f"| {r['predicted_speedup']:.2f}x | {100 * r['speedup_error']:+.0f}% |")
    summary = (f"Compressed methods, out of sample: {len(errors)} points, median |error| "
               f"{100 * statistics.median(errors):.0f}%, mean {100 * statistics.mean(errors):.0f}%, "
               f"max {100 * max(errors):.0f}%, within 20%: {sum(e <= 0.2 for e in errors)}/{len(errors)}.")
    lines += ["", summary]
    contention = fit_contention(points, costs, efficiency, transfer_gbps, overlap)
    scaled = {m: contention * v for m, v in costs.items()}
    fitted_errors = compressed_errors(score(points, lambda p: predict_point(p, scaled, efficiency, transfer_gbps,
                                                                            overlap)))
    lines += ["", f"With one contention factor on the hook costs fitted on these rows (x {contention:.2f}; in "
              f"sample): median |error| {100 * statistics.median(fitted_errors):.0f}%, within 20%: "
              f"{sum(e <= 0.2 for e in fitted_errors)}/{len(fitted_errors)}."]
    hierarchy = check_hierarchy(costs, efficiency, transfer_gbps, overlap, contention)
    if hierarchy is not None:
        lines += ["", "### Several ranks per node", "", hierarchy[0]]
    report = "\n".join(lines)
    print(report)
    (RESULTS / "advise_check.md").write_text(report + "\n")
    (RESULTS / "advise_check.json").write_text(json.dumps(
        {"efficiency": efficiency, "transfer_gbps": transfer_gbps, "overlap": overlap, "latency_us": LATENCY_US,
         "costs_seconds_per_element": costs, "points": out, "contention": contention,
         "hierarchy": hierarchy[1] if hierarchy is not None else None}, indent=1))
    table = common_clusters_table()
    print("\n" + table)
    (RESULTS / "advise_table.md").write_text(
        "Advisor defaults (no calibration): 8192 tokens per GPU per step at 400 TFLOP/s, fp32 gradients, "
        "hook costs from memory traffic at 2000 GB/s, 90% link efficiency, overlap 0.5.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
