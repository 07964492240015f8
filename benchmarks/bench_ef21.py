"""EF21 vs EF21-W vs classic EF vs no EF: squared gradient norm against bits sent (logistic regression).

The problem of the EF21 papers: f(x) = 1/n sum_i f_i(x), f_i the logistic loss on worker i's rows
plus the non-convex regulariser lam * sum_j x_j^2 / (1 + x_j^2) (lam = 0.1), split heterogeneously:

* ``breast_cancer``: scikit-learn's bundled Wisconsin breast-cancer data (569 x 30, standardised),
  sorted by label and the first feature, so workers see different classes and scales;
* ``synthetic``: Gaussian features whose scale on worker i grows geometrically up to ``--spread``
  (the spread of the L_i is controlled; L_i = lambda_max(A_i^T A_i) / (4 m_i) + 2 lam).

Every method uses the same top-k compressor (``commlib.compress.TopK``) and counts bits as k values
and k indices of 32 bits per worker and step (EF21's first round is dense: d values). Step sizes: EF21
with its theory step 1/(L + L_QM sqrt(beta/theta)), EF21-W with 1/(L + L_AM sqrt(beta/theta))
(:mod:`commlib.hooks.ef21_theory`); each method is also run with its best multiplier of its base step
from {1, 4, 16, 64} ("tuned"; classic EF and no EF use EF21's base step). The EF21 updates are
:func:`commlib.hooks.ef21.ef21_message`, the same function the DDP hooks run.

    python benchmarks/bench_ef21.py            # JSON + plot in benchmarks/results/, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commlib import compress, hooks  # noqa: E402
from commlib.hooks.ef21 import ef21_message  # noqa: E402

LAM = 0.1
MULTIPLIERS = (1, 4, 16, 64)


# ---------------------------------------------------------------------------------------- problem
def breast_cancer_split(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    a = torch.tensor(data.data, dtype=torch.float64)
    a = (a - a.mean(0)) / a.std(0)
    b = torch.tensor(data.target, dtype=torch.float64) * 2 - 1
    order = sorted(range(len(b)), key=lambda i: (float(b[i]), float(a[i, 0])))
    a, b = a[order], b[order]
    return [(a[idx], b[idx]) for idx in torch.arange(len(b)).chunk(n)]


def synthetic_split(n: int, d: int, m: int, spread: float, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x_true = torch.randn(d, generator=gen, dtype=torch.float64)
    parts = []
    for i in range(n):
        scale = spread ** (i / max(1, n - 1) / 2)  # L_i ~ scale^2: from 1 to spread
        a = torch.randn(m, d, generator=gen, dtype=torch.float64) * scale + 0.3 * i / n
        b = torch.sign(a @ x_true + 0.5 * torch.randn(m, generator=gen, dtype=torch.float64))
        parts.append((a, b))
    return parts


def local_gradient(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """grad of mean log(1 + exp(-b a x)) + lam sum x^2 / (1 + x^2)."""
    margins = b * (a @ x)
    loss_grad = -(a * (b * torch.sigmoid(-margins))[:, None]).mean(0)
    return loss_grad + LAM * 2 * x / (1 + x * x) ** 2


def smoothness(a: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(a.T @ a / a.shape[0]).max()) / 4 + 2 * LAM


# ---------------------------------------------------------------------------------------- methods
def run(method: str, parts, compressor, gamma: float, steps: int) -> tuple[list[float], list[float]]:
    """Returns (bits sent per worker so far, ||grad f||^2) after each step."""
    n, d = len(parts), parts[0][0].shape[1]
    k = compress.topk.topk_count(d, compressor.density)
    x = torch.zeros(d, dtype=torch.float64)
    grads = [local_gradient(x, a, b) for a, b in parts]
    bits, norms, sent = [], [], 0
    if method in ("ef21", "ef21w"):
        estimates = [g.clone() for g in grads]  # one dense round
        g = sum(estimates) / n
        sent += 32 * d
    errors = [torch.zeros(d, dtype=torch.float64) for _ in range(n)]
    for _ in range(steps):
        if method in ("ef21", "ef21w"):
            x = x - gamma * g
            grads = [local_gradient(x, a, b) for a, b in parts]
            messages = [ef21_message(grads[i], estimates[i], compressor, 0)[1] for i in range(n)]
            estimates = [e + c for e, c in zip(estimates, messages)]
            g = g + sum(messages) / n
        elif method == "ef":  # EF14: v_i = C(e_i + gamma grad_i); e_i += gamma grad_i - v_i
            vs = []
            for i in range(n):
                corrected = errors[i] + gamma * grads[i]
                v = compressor.decompress(compressor.compress(corrected))
                errors[i] = corrected - v
                vs.append(v)
            x = x - sum(vs) / n
            grads = [local_gradient(x, a, b) for a, b in parts]
        else:  # no EF: x -= gamma mean C(grad_i)
            x = x - gamma * sum(compressor.decompress(compressor.compress(gr)) for gr in grads) / n
            grads = [local_gradient(x, a, b) for a, b in parts]
        sent += 64 * k
        full = sum(grads) / n
        bits.append(float(sent))
        norms.append(float(full @ full) if torch.isfinite(full).all() else float("inf"))
    return bits, norms


def at_bits(bits: list[float], norms: list[float], budget: float) -> float:
    """||grad f||^2 at the last step whose bits are within ``budget``."""
    value = norms[0]
    for b, v in zip(bits, norms):
        if b > budget:
            break
        value = v
    return value


def experiment(name: str, parts, densities, steps: int) -> dict:
    n, d = len(parts), parts[0][0].shape[1]
    Ls = [smoothness(a) for a, _ in parts]
    L = smoothness(torch.cat([a for a, _ in parts]))
    out = {"dataset": name, "workers": n, "dim": d, "L": L, "L_i": Ls, "L_AM": sum(Ls) / n,
           "L_QM": math.sqrt(sum(v * v for v in Ls) / n), "runs": []}
    for density in densities:
        compressor = compress.TopK(density=density)
        alpha = hooks.compressor_alpha(compressor, d)
        base = {"ef21": hooks.ef21_stepsize_from_smoothness(alpha, L, Ls), "ef21w": hooks.ef21w_stepsize(alpha, L, Ls)}
        base["ef"] = base["none"] = base["ef21"]
        for method in ("none", "ef", "ef21", "ef21w"):
            best = None
            for mult in MULTIPLIERS:
                bits, norms = run(method, parts, compressor, base[method] * mult, steps)
                record = {"method": method, "density": density, "k": compress.topk.topk_count(d, density),
                          "alpha": alpha, "multiplier": mult, "gamma": base[method] * mult,
                          "bits": bits, "grad_norm_sq": norms}
                if mult == 1:
                    out["runs"].append(dict(record, tuned=False))
                if best is None or _final(norms) < _final(best["grad_norm_sq"]):
                    best = record
            out["runs"].append(dict(best, tuned=True))
    return out


def _final(norms: list[float]) -> float:
    value = norms[-1]
    return value if math.isfinite(value) else float("inf")


def report(result: dict) -> str:
    lines = [f"\n## {result['dataset']}: n={result['workers']}, d={result['dim']}, L={result['L']:.3g}, "
             f"L_AM={result['L_AM']:.3g}, L_QM={result['L_QM']:.3g} (L_QM/L_AM={result['L_QM'] / result['L_AM']:.2f})",
             "| top-k | step | no EF | classic EF | EF21 | EF21-W |", "|---|---|---|---|---|---|"]
    densities = sorted({r["density"] for r in result["runs"]})
    for density in densities:
        runs = [r for r in result["runs"] if r["density"] == density]
        budget = min(r["bits"][-1] for r in runs)  # equal bits for all four
        k = runs[0]["k"]
        for tuned in (False, True):
            cells = []
            for method in ("none", "ef", "ef21", "ef21w"):
                r = next(x for x in runs if x["method"] == method and x["tuned"] == tuned)
                tag = f" (x{r['multiplier']})" if tuned else ""
                cells.append(f"{at_bits(r['bits'], r['grad_norm_sq'], budget):.3g}{tag}")
            lines.append(f"| k={k} | {'best of x1..x64' if tuned else 'theory'} | " + " | ".join(cells) + " |")
    lines.append("(||grad f||^2 at equal bits per worker within each row: the least any of the four sent, "
                 "k x 64 bits per step, EF21's dense first round counted)")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({r["density"] for res in results for r in res["runs"]})
    fig, axes = plt.subplots(len(results), len(densities), figsize=(4.5 * len(densities), 3.6 * len(results)),
                             squeeze=False)
    names = {"none": "no EF", "ef": "classic EF", "ef21": "EF21", "ef21w": "EF21-W"}
    for row, res in enumerate(results):
        for col, density in enumerate(densities):
            ax = axes[row][col]
            for r in res["runs"]:
                if r["density"] != density:
                    continue
                style = "-" if r["tuned"] else ":"
                ax.semilogy(r["bits"], r["grad_norm_sq"], style,
                            label=f"{names[r['method']]} {'x' + str(r['multiplier']) if r['tuned'] else 'theory'}")
            ax.set_title(f"{res['dataset']}, top-k density {density:g}", fontsize=9)
            ax.set_xlabel("bits sent per worker")
            ax.set_ylabel("||grad f||^2")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=100.0, help="max L_i / min L_i of the synthetic data")
    parser.add_argument("--densities", default="0.034,0.1,0.3", help="top-k densities (k/d)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_ef21.json"))
    args = parser.parse_args()
    densities = [float(x) for x in args.densities.split(",")]
    results = [experiment("breast_cancer", breast_cancer_split(args.workers), densities, args.steps),
               experiment(f"synthetic (L_i spread {args.spread:g})",
                          synthetic_split(args.workers, 30, 60, args.spread), densities, args.steps)]
    for res in results:
        print(report(res))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results))
    try:
        plot(results, Path(args.out).with_suffix(".png"))
        print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.png')}")
    except ImportError:
        print(f"\nwrote {args.out} (no matplotlib: no plot)")


if __name__ == "__main__":
    main()
