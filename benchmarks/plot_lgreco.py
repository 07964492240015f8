"""Per-layer L-GreCo choices over training, from ``state.write_plan_json(path)``.

    python benchmarks/plot_lgreco.py plan.json [--out plan.png]
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = json.load(open(args.plan))
    history = data["history"]
    layers = sorted({k for h in history for k in h["choices"]})
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for layer in layers:
        ax1.plot(steps, [h["choices"].get(layer) for h in history], marker="o", label=layer)
    ax1.set_ylabel(f"{data['family']} setting")
    ax1.legend(fontsize=6, ncol=2)
    ax2.plot(steps, [h["bytes_uniform"] / max(h["bytes_planned"], 1) for h in history], marker="o")
    ax2.set_ylabel("bytes: uniform / L-GreCo")
    ax2.set_xlabel("step")
    fig.tight_layout()
    out = args.out or args.plan.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
