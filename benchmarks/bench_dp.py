"""DP-SGD with clipping (Opacus) vs DiceSGD at equal (epsilon, delta), across clipping thresholds C1.

Problems:

* skewed mean estimation (the DiceSGD note's): f(w) = 1/(2N) sum ||w - a_i||^2, N = 5000, d = 10,
  a_i ~ N(0, 0.1^2 I) with 10% of them shifted by 10 u; clipping pulls DP-SGD's fixed point towards the
  90% cluster. Excess loss f(w_T) - f(w*);
* logistic regression on scikit-learn's breast-cancer data (569 x 30, standardised; 80/20 split):
  test accuracy and training loss.

Both optimizers are Opacus ``GradSampleModule`` + optimizer pairs with the same noise multiplier sigma
from ``opacus.accountants.utils.get_noise_multiplier(target_epsilon, target_delta, q, steps)`` (RDP),
Poisson-free fixed batches of the stated size (sample rate q = B / N), the same steps and seeds;
DiceSGD uses C2 = C1 and its inflated noise sigma C1 sqrt(1 + 2 C2/C1). lr scales as 1/C1 for both.

    python benchmarks/bench_dp.py            # ~2 minutes; JSON + plot in benchmarks/results/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_output import write_results  # noqa: E402

from commlib.privacy import DiceSGD  # noqa: E402


def skewed_mean(n: int = 5000, d: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.1
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    a[: n // 10] += 10 * u / u.norm()
    return a


def breast_cancer(seed: int = 0):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def optimizer(kind, params, lr, sigma, c1, batch, seed):
    base = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    if kind == "dpsgd":
        return DPOptimizer(base, noise_multiplier=sigma, max_grad_norm=c1, expected_batch_size=batch, generator=gen)
    return DiceSGD(base, noise_multiplier=sigma, max_grad_norm=c1, error_max_grad_norm=c1, expected_batch_size=batch,
                   generator=gen, process_group=False)


def run_mean(kind, c1, sigma, args):
    a = skewed_mean()
    w_star = a.mean(0)
    f = lambda w: 0.5 * ((w - a) ** 2).sum(1).mean()  # noqa: E731
    model = GradSampleModule(torch.nn.Linear(1, a.shape[1], bias=True).double())  # w = bias; weight frozen at 0
    model._module.weight.requires_grad_(False)
    with torch.no_grad():
        model._module.weight.zero_()
        model._module.bias.zero_()
    opt = optimizer(kind, [model._module.bias], args.lr_mean / c1, sigma, c1, args.batch, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ones = torch.ones(args.batch, 1, dtype=torch.float64)
    for _ in range(args.steps):
        idx = torch.randint(0, len(a), (args.batch,), generator=gen)
        opt.zero_grad()
        (0.5 * ((model(ones) - a[idx]) ** 2).sum(1)).mean().backward()
        opt.step()
    w = model._module.bias.detach()
    return {"excess_loss": float(f(w) - f(w_star)), "distance": float((w - w_star).norm())}


def run_logistic(kind, c1, sigma, args):
    xtr, ytr, xte, yte = breast_cancer(args.seed)
    torch.manual_seed(args.seed)
    model = GradSampleModule(torch.nn.Linear(xtr.shape[1], 1).double())
    opt = optimizer(kind, model.parameters(), args.lr_logistic / c1, sigma, c1, args.batch, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(args.steps):
        idx = torch.randint(0, len(ytr), (args.batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(xtr[idx]).squeeze(1), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        train_loss = float(loss_fn(model(xtr).squeeze(1), ytr))
        accuracy = float(((model(xte).squeeze(1) > 0).double() == yte).double().mean())
    return {"train_loss": train_loss, "test_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--lr-mean", type=float, default=0.2, help="x 1/C1")
    parser.add_argument("--lr-logistic", type=float, default=0.5, help="x 1/C1")
    parser.add_argument("--c1", default="0.1,1,3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_dp.json"))
    args = parser.parse_args()
    rows = []
    for problem, n, runner in (("skewed mean", 5000, run_mean), ("breast cancer logistic", 455, run_logistic)):
        q = args.batch / n
        sigma = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta, sample_rate=q,
                                     steps=args.steps, accountant="rdp")
        for c1 in (float(c) for c in args.c1.split(",")):
            for kind in ("dpsgd", "dicesgd"):
                result = runner(kind, c1, sigma, args)
                rows.append({"problem": problem, "method": kind, "C1": c1, "sigma": sigma, "q": q, **result})
                print(problem, kind, f"C1={c1}", {k: round(v, 5) for k, v in result.items()}, flush=True)
    print(f"\nepsilon {args.epsilon}, delta {args.delta}, {args.steps} steps, batch {args.batch}\n")
    print("| problem | C1 | DP-SGD (clipping) | DiceSGD | ratio |\n|---|---|---|---|---|")
    for problem, key in (("skewed mean", "excess_loss"), ("breast cancer logistic", "test_accuracy")):
        for c1 in sorted({r["C1"] for r in rows}):
            dp = next(r for r in rows if r["problem"] == problem and r["C1"] == c1 and r["method"] == "dpsgd")
            dice = next(r for r in rows if r["problem"] == problem and r["C1"] == c1 and r["method"] == "dicesgd")
            ratio = dice[key] / dp[key] if dp[key] else float("nan")
            print(f"| {problem} ({key}) | {c1:g} | {dp[key]:.4g} | {dice[key]:.4g} | {ratio:.3g} |")
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (problem, key) in zip(axes, (("skewed mean", "excess_loss"), ("breast cancer logistic",
                                                                              "test_accuracy"))):
            for kind in ("dpsgd", "dicesgd"):
                pts = sorted((r["C1"], r[key]) for r in rows if r["problem"] == problem and r["method"] == kind)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label="DP-SGD (clipping)" if kind == "dpsgd" else "DiceSGD")
            ax.set_xscale("log")
            ax.set_xlabel("C1")
            ax.set_ylabel(key)
            ax.set_title(f"{problem}, eps={args.epsilon:g}")
            if key == "excess_loss":
                ax.set_yscale("log")
            ax.legend()
        return fig

    write_results(args.out, {"args": vars(args), "rows": rows}, draw, indent=1)

if __name__ == "__main__":
    main()
