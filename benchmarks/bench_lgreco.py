"""L-GreCo against uniform compression on a real small training run (bytes per step at final loss).

Each configuration trains the GPT-2-style byte LM of :mod:`workloads.train` with torchrun on 2
local ranks from the same seed and data, and reports the bytes each rank sends per step (after
warm-up, including the dense 1-D tensors) and the held-out loss at the end. L-GreCo runs against
the uniform setting of the same family with the same default. Results: JSON and a table.

    python benchmarks/bench_lgreco.py                     # powersgd family, default rank 8, ~6 minutes
    python benchmarks/bench_lgreco.py --family topk --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_config(hook_args: list[str], args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "workloads.train", "--model", "gpt2", "--dim", str(args.dim), "--layers", str(args.layers),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--context", str(args.context), "--seed", str(args.seed), *hook_args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def configurations(family: str, default: str, candidates: str | None, alphas: list[float], retune: int):
    key = {"powersgd": "rank", "topk": "density", "qsgd": "bits"}[family]
    if family == "powersgd":
        uniform = ["--hook", "powersgd", "--option", f"rank={default}"]
    else:
        compressor = f"TopK(density={default})" if family == "topk" else f"QSGD(bits={default})"
        uniform = ["--hook", "ef", "--compressor", compressor, "--option", "collective=allgather"]
    yield f"uniform {key}={default}", uniform
    for alpha in alphas:
        lgreco = ["--hook", "lgreco", "--option", f"family={family}", "--option", f"{key}={default}",
                  "--option", f"alpha={alpha}", "--option", f"retune_every={retune}"]
        if candidates:
            lgreco += ["--option", f"candidates={candidates}"]
        yield f"L-GreCo alpha={alpha}", lgreco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="powersgd", choices=["powersgd", "topk", "qsgd"])
    parser.add_argument("--default", help="uniform default (rank / density / bits)")
    parser.add_argument("--candidates", help="python list literal; default for powersgd: [1,2,3,4,6,8,12,16,24,32]")
    parser.add_argument("--alpha", type=float, action="append", help="error budget factor(s)")
    parser.add_argument("--retune-every", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_lgreco.json"))
    args = parser.parse_args()
    default = args.default or {"powersgd": "8", "topk": "0.01", "qsgd": "4"}[args.family]
    if args.candidates is None and args.family == "powersgd" and args.default is None:
        args.candidates = "[1,2,3,4,6,8,12,16,24,32]"
    alphas = args.alpha or [1.0, 1.25]
    rows = []
    for label, hook_args in configurations(args.family, default, args.candidates, alphas, args.retune_every):
        result = run_config(hook_args, args)
        result["label"] = label
        rows.append(result)
        print(f"{label:28s} bytes/step {result['bytes_per_step']:>12,.0f}  eval loss {result['eval_loss']:.4f}"
              f"  train loss {result['train_loss_last']:.4f}", flush=True)
    base = rows[0]
    print("\n| run | bytes/step | vs uniform | held-out loss | vs uniform |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['bytes_per_step']:,.0f} | {base['bytes_per_step'] / r['bytes_per_step']:.2f}x fewer"
              f" | {r['eval_loss']:.4f} | {100 * (r['eval_loss'] / base['eval_loss'] - 1):+.2f}% |")
    for r in rows:
        r.pop("losses", None)
        r.pop("step_seconds", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"family": args.family, "default": default, "args": vars(args),
                                          "runs": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
