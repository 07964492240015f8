"""Merge repeated ``throughput.py`` runs: per configuration, keep the run with the median samples/s.

    python benchmarks/merge_runs.py benchmarks/results/throughput_lowrank_rep*.json --out benchmarks/results/throughput_lowrank.json

Writes the merged JSON (each row names the file it was kept from and every run's samples/s) and a
Markdown table in ``throughput.py``'s format next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def ceiling_shares(loaded) -> list[list[float]]:
    """Per row, samples/s / the same run's no-communication ceiling, for every run where both ran."""
    out = []
    for i in range(len(loaded[0][1]["rows"])):
        shares = []
        for _, data in loaded:
            row = data["rows"][i]
            ceiling = next((r for r in data["rows"] if r["method"] == "no communication (ceiling)"
                            and r["model_name"] == row["model_name"] and not r.get("crashed")), None)
            if ceiling is not None and not row.get("crashed") and row is not ceiling:
                shares.append(row["samples_per_second"] / ceiling["samples_per_second"])
        out.append(shares)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from bench_output import bandwidth_bytes_per_second
    from throughput import table

    loaded = [(path, json.loads(Path(path).read_text())) for path in args.runs]
    merged = []
    for i, row in enumerate(loaded[0][1]["rows"]):
        candidates = [(data["rows"][i], path) for path, data in loaded
                      if not data["rows"][i].get("crashed")]
        if not candidates:
            merged.append(row)
            continue
        candidates.sort(key=lambda c: c[0]["samples_per_second"])
        kept, path = candidates[len(candidates) // 2]
        merged.append({**kept, "kept_from": Path(path).name,
                       "runs_samples_per_second": [c[0]["samples_per_second"] for c in candidates]})
    meta = {**loaded[0][1]["meta"], "runs": [Path(p).name for p, _ in loaded], "kept": "median samples/s per row"}
    shares = ceiling_shares(loaded)
    for row, share in zip(merged, shares):
        if share:
            row["ceiling_share_runs"] = share
            row["ceiling_share_median"] = statistics.median(share)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": merged}, indent=1))
    link = bandwidth_bytes_per_second(meta["bandwidth"]) if meta.get("emulated") else None
    report = table(merged, link)
    if any(shares):
        report += ("\n\nShare of the no-communication ceiling, each run against the ceiling of the same run "
                   "(median; the runs):\n\n| method | setting | median | runs |\n|---|---|---|---|\n")
        report += "\n".join(f"| {r['method']} | {r['setting']} | {100 * statistics.median(s):.0f}% "
                             f"| {', '.join(f'{100 * x:.0f}%' for x in s)} |" for r, s in zip(merged, shares) if s)
    Path(args.out).with_suffix(".md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
