"""Low-rank optimizers against AdamW on a LLaMA-style byte LM: state bytes, step time, refresh time, loss.

The model is ``transformers.LlamaForCausalLM`` from a small ``LlamaConfig`` (random init, byte
vocabulary) trained on the Python install's own sources (:mod:`workloads.train`). The attention
and MLP projection matrices go to the low-rank group (rank = dim/4), embeddings, norms and the head
get AdamW, as in the GaLore/Fira/FRUGAL papers. Every optimizer trains the same steps from the same
seed; validation loss on held-out windows at the end. Optimizer-state bytes are counted from the
state tensors after training. Also times one projector refresh at 1024 x 1024 (SVD vs DCT vs random).

    python benchmarks/bench_optim.py            # ~6 minutes; JSON + plot in benchmarks/results/
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_output import write_results  # noqa: E402

from commlib.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW  # noqa: E402
from commlib.optim import projectors as pj  # noqa: E402
from workloads.data import ByteBatches  # noqa: E402
from workloads.models import lm_loss  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama(dim: int, layers: int, context: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = LlamaConfig(vocab_size=256, hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, dim // 32),
                         num_key_value_heads=max(1, dim // 32), max_position_embeddings=context,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def param_groups(model, **options):
    """[everything else, the attention/MLP matrices with ``options``]."""
    target = [p for n, p in model.named_parameters() if any(t in n for t in TARGETS) and p.dim() == 2]
    ids = {id(p) for p in target}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": target, **options}]


def configurations(rank_fraction: float, gap: int):
    yield "AdamW (torch)", lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    for projector in ("svd", "random", "dct"):
        yield f"GaLore {projector}", lambda m, lr, p=projector: GaLoreAdamW(
            _rank_groups(m, rank_fraction, update_proj_gap=gap, scale=0.25, projector=p), lr=lr)
        yield f"Fira {projector}", lambda m, lr, p=projector: FiraAdamW(
            _rank_groups(m, rank_fraction, update_proj_gap=gap, alpha=0.25, projector=p), lr=lr)
        yield f"FRUGAL {projector}", lambda m, lr, p=projector: FrugalAdamW(
            param_groups(m, density=rank_fraction, update_proj_gap=gap, projector=p), lr=lr)
    yield "FRUGAL blocks", lambda m, lr: FrugalAdamW(
        param_groups(m, density=rank_fraction, update_proj_gap=gap, projector="blocks",
                     block_order="descending"), lr=lr)


def _rank_groups(model, fraction, **options):
    groups = param_groups(model, **options)
    groups[1]["rank"] = max(1, int(fraction * min(min(p.shape) for p in groups[1]["params"])))
    return groups


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def train(make, args) -> dict:
    torch.manual_seed(args.seed)
    model = llama(args.dim, args.layers, args.context)
    opt = make(model, args.lr)
    data = ByteBatches(0, 1, args.batch, args.context, args.seed)
    losses, times = [], []
    for _ in range(args.steps):
        window = data.next()
        loss = lm_loss(model, window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    with torch.no_grad():
        batches = data.evaluation(16)
        val = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    return {"val_loss": val, "losses": losses, "step_ms_median": 1e3 * statistics.median(times),
            "state_bytes": state_bytes(opt), "params": sum(p.numel() for p in model.parameters())}


def refresh_times(size: int, rank: int, repeats: int = 5) -> dict:
    g = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, fn in {"svd": lambda: pj.svd_basis(g, rank, pj.RIGHT),
                     "dct": lambda: pj.dct_indices(g, rank, pj.RIGHT),
                     "random": lambda: pj.random_basis((size, size), rank, pj.RIGHT, seed=1)}.items():
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(samples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gap", type=int, default=50, help="update_proj_gap")
    parser.add_argument("--rank-fraction", type=float, default=0.25, help="rank = fraction x dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma list of substrings of configuration names")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_optim.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, make in configurations(args.rank_fraction, args.gap):
        if args.only and not any(s.strip().lower() in name.lower() for s in args.only.split(",")):
            continue
        result = train(make, args)
        result["name"] = name
        rows.append(result)
        print(f"{name:16s} val {result['val_loss']:.4f}  state {result['state_bytes']:>10,d} B  "
              f"step {result['step_ms_median']:.1f} ms", flush=True)
    base = next((r for r in rows if r["name"].startswith("AdamW")), rows[0])
    print("\n| optimizer | state bytes | vs AdamW | optimizer step | val loss | vs AdamW |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['state_bytes']:,} | {100 * r['state_bytes'] / base['state_bytes']:.1f}% "
              f"| {r['step_ms_median']:.1f} ms | {r['val_loss']:.4f} | {r['val_loss'] - base['val_loss']:+.4f} |")
    refresh = refresh_times(1024, 256)
    print(f"\nprojector refresh at 1024 x 1024, rank 256: SVD {refresh['svd']:.1f} ms, DCT {refresh['dct']:.1f} ms "
          f"({refresh['svd'] / refresh['dct']:.1f}x faster), random {refresh['random']:.1f} ms")
    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in rows:
            smooth = [sum(r["losses"][max(0, i - 9): i + 1]) / len(r["losses"][max(0, i - 9): i + 1])
                      for i in range(len(r["losses"]))]
            ax.plot(smooth, label=f"{r['name']} (val {r['val_loss']:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.legend(fontsize=7)
        return fig

    write_results(args.out, {"args": vars(args), "runs": rows, "refresh_ms_1024": refresh}, draw)

if __name__ == "__main__":
    main()
