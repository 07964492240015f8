"""Kernel benchmark: commlib's compiled ops against torch.clone's bandwidth and the pure-torch references.

    python benchmarks/bench_kernels.py [--numel 67108864] [--topk-numel 16777216] [--runs 7]

For each op: median time, effective bandwidth (bytes read + written per second), the ratio to
``torch.clone``'s bandwidth on the same input measured in the same run (the machine's practical
memcpy limit), and the speed-up over the op's pure-PyTorch reference (``commlib.ops.REFERENCES``,
defined in the op families of ``commlib/ops/``).
Top-k is also compared with ``torch.topk`` and its threshold mode reports recall and captured energy.
Writes ``benchmarks/results/bench_kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import commlib
from commlib import ops
from commlib.ops import REFERENCES as ref

DEVICE = torch.device("cpu")  # --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_time(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unfused_ef_round(compressor, grad, residual, seed=1):
    """One error-feedback round as the hooks did it before the fused kernels: v = g + e
    materialized, compress, decompress, e = v - decompress (``ef_step``), then the result written."""
    from commlib.hooks.ef import ef_step

    payload, new_residual = ef_step(grad, residual, compressor, seed)
    grad.copy_(compressor.decompress(payload))
    return new_residual


def fused_ef_round(compressor, grad, residual, seed=1):
    """The same round through the fused passes: compress g + e in place, residual in place, result into grad."""
    payload = compressor.compress_ef(grad, residual, seed=seed)
    compressor.update_residual_(residual, grad, payload)
    compressor.decompress_into_(grad, payload)
    return residual


def fused_error_feedback(args, gen, clone_bw) -> list[dict]:
    """One EF round per compressor (and PowerSGD's passes), fused against unfused, on ``numel`` floats.

    Bytes moved by the fused round: read g and e (pass 1); read g, e and write e (pass 2); write g
    (decompress into it), plus the payload. The unfused round's time is on the same bytes."""
    from commlib import compress

    n = args.numel // 4  # four buffers live at once
    grad0 = torch.randn(n, generator=gen).to(DEVICE)
    residual0 = (0.1 * torch.randn(n, generator=gen)).to(DEVICE)
    cases = [("EF sign", compress.Sign()), ("EF QSGD 4 bit", compress.QSGD(bits=4)),
             ("EF top-k 1%", compress.TopK(0.01)), ("EF random-k 1%", compress.RandomK(0.01))]
    print(f"\nFused error feedback, {n} floats: one round = compress g + e, new residual, result written")
    header = f"{'round':<18}{'fused ms':>10}{'GB/s':>8}{'vs clone':>10}{'unfused ms':>12}{'vs unfused':>12}"
    print(header)
    print("-" * len(header))
    out = []
    grad, residual = grad0.clone(), residual0.clone()

    def timed(fn):
        def run():
            grad.copy_(grad0)
            residual.copy_(residual0)
            fn()
        restore = median_time(lambda: (grad.copy_(grad0), residual.copy_(residual0)), args.runs)
        return max(median_time(run, args.runs) - restore, 1e-9)

    for name, c in cases:
        fused_s = timed(lambda c=c: fused_ef_round(c, grad, residual))
        unfused_s = timed(lambda c=c: unfused_ef_round(c, grad, residual))
        nbytes = 4 * n * 6 + c.nbytes((n,))
        out.append({"round": name, "numel": n, "fused_ms": fused_s * 1e3, "unfused_ms": unfused_s * 1e3,
                    "bytes_moved": nbytes, "gb_per_s": nbytes / fused_s / 1e9,
                    "vs_clone_bandwidth": nbytes / fused_s / clone_bw, "speedup_vs_unfused": unfused_s / fused_s})
        r = out[-1]
        print(f"{name:<18}{r['fused_ms']:>10.1f}{r['gb_per_s']:>8.2f}{r['vs_clone_bandwidth']:>9.2f}x"
              f"{r['unfused_ms']:>12.1f}{r['speedup_vs_unfused']:>11.2f}x")
    # PowerSGD's two passes: (G + E, P = M Q) and (out = P Q^T, M -= P Q^T) against torch's ops
    cols = 1024
    rows_ = n // cols
    g, e = grad0[: rows_ * cols].view(rows_, cols), residual0[: rows_ * cols].view(rows_, cols)
    m, o = torch.empty_like(g), torch.empty_like(g)
    for r in (1, 4):
        q = torch.randn(cols, r, generator=gen).to(DEVICE)
        p = ops.powersgd_project(g, e, q, m)
        fused_s = median_time(lambda q=q, p=p: (ops.powersgd_project(g, e, q, m), ops.powersgd_backproject_(m, p, q, o)),
                              args.runs)
        unfused_s = median_time(lambda q=q, p=p: (torch.mm(torch.add(g, e, out=m), q), torch.mm(p, q.t(), out=o),
                                                  m.sub_(o)), args.runs)
        nbytes = 4 * g.numel() * 6  # read G, E, write M; read M, write M and out
        out.append({"round": f"PowerSGD rank {r} passes", "numel": g.numel(), "fused_ms": fused_s * 1e3,
                    "unfused_ms": unfused_s * 1e3, "bytes_moved": nbytes, "gb_per_s": nbytes / fused_s / 1e9,
                    "vs_clone_bandwidth": nbytes / fused_s / clone_bw, "speedup_vs_unfused": unfused_s / fused_s})
        row = out[-1]
        print(f"{row['round']:<18}{row['fused_ms']:>10.1f}{row['gb_per_s']:>8.2f}{row['vs_clone_bandwidth']:>9.2f}x"
              f"{row['unfused_ms']:>12.1f}{row['speedup_vs_unfused']:>11.2f}x")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=64 * 2**20, help="floats for packing / quantization")
    parser.add_argument("--topk-numel", type=int, default=16 * 2**20, help="floats for top-k")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per kernel (median)")
    parser.add_argument("--ref-runs", type=int, default=3, help="timed runs per reference (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check); clone bandwidth is that device's")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_kernels.json"))
    args = parser.parse_args(argv)

    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print("command:", " ".join([sys.executable, *sys.argv]))
    backend = commlib.kernel_backend(DEVICE)
    print(f"torch {torch.__version__}, {args.threads} threads, kernel backend: {backend}")
    if backend == "python":
        print("warning: compiled kernels are not loaded; 'kernel' timings below are the references")

    n = args.numel
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen).to(DEVICE)
    clone_s = median_time(lambda: x.clone(), args.runs)
    clone_bw = 2 * 4 * n / clone_s
    print(f"torch.clone of {n} floats: {clone_s * 1e3:.1f} ms, {clone_bw / 1e9:.2f} GB/s (read + write)\n")

    packed, scales = ops.sign_pack(x, 0)
    codes8, qs8 = ops.qsgd_quantize(x, 8, 512, 1)
    codes4, qs4 = ops.qsgd_quantize(x, 4, 512, 1)
    cases = [
        ("sign_pack", lambda: ops.sign_pack(x, 0), lambda: ref["sign_pack"](x, 0), 4 * n + n // 8 + 4),
        (
            "sign_unpack",
            lambda: ops.sign_unpack(packed, scales, n, 0),
            lambda: ref["sign_unpack"](packed, scales, n, 0, torch.float32),
            n // 8 + 4 * n,
        ),
        (
            "qsgd_quantize 8b",
            lambda: ops.qsgd_quantize(x, 8, 512, 1),
            lambda: ref["qsgd_quantize"](x, 8, 512, 1),
            4 * n + n + 4 * n // 512,
        ),
        (
            "qsgd_dequantize 8b",
            lambda: ops.qsgd_dequantize(codes8, qs8, 8, 512, n),
            lambda: ref["qsgd_dequantize"](codes8, qs8, 8, 512, n, torch.float32),
            n + 4 * n // 512 + 4 * n,
        ),
        (
            "qsgd_quantize 4b",
            lambda: ops.qsgd_quantize(x, 4, 512, 1),
            lambda: ref["qsgd_quantize"](x, 4, 512, 1),
            4 * n + n // 2 + 4 * n // 512,
        ),
        (
            "qsgd_dequantize 4b",
            lambda: ops.qsgd_dequantize(codes4, qs4, 4, 512, n),
            lambda: ref["qsgd_dequantize"](codes4, qs4, 4, 512, n, torch.float32),
            n // 2 + 4 * n // 512 + 4 * n,
        ),
    ]
    rows = []
    header = f"{'op':<22}{'kernel ms':>11}{'GB/s':>8}{'vs clone':>10}{'ref ms':>10}{'vs ref':>9}"
    print(header)
    print("-" * len(header))
    for name, kernel, reference, nbytes in cases:
        k_s = median_time(kernel, args.runs)
        r_s = median_time(reference, args.ref_runs, warmup=0)
        row = {
            "op": name,
            "numel": n,
            "kernel_ms": k_s * 1e3,
            "reference_ms": r_s * 1e3,
            "bytes_moved": nbytes,
            "gb_per_s": nbytes / k_s / 1e9,
            "vs_clone_bandwidth": (nbytes / k_s) / clone_bw,
            "vs_clone_time": clone_s / k_s,
            "speedup_vs_reference": r_s / k_s,
        }
        rows.append(row)
        print(
            f"{name:<22}{row['kernel_ms']:>11.1f}{row['gb_per_s']:>8.2f}{row['vs_clone_bandwidth']:>9.2f}x"
            f"{row['reference_ms']:>10.0f}{row['speedup_vs_reference']:>8.1f}x"
        )

    # top-k at `density` of topk-numel floats
    m = args.topk_numel
    y = torch.randn(m, generator=gen).to(DEVICE)
    k = max(1, int(args.density * m))
    topk_s = median_time(lambda: torch.topk(y.abs(), k), args.ref_runs)
    exact_s = median_time(lambda: ops.topk_abs(y, k, True), args.runs)
    thr_s = median_time(lambda: ops.topk_abs(y, k, False), args.runs)
    ref_s = median_time(lambda: ref["topk_abs"](y, k, True), args.ref_runs, warmup=0)
    _, exact_idx = ops.topk_abs(y, k, True)
    thr_vals, thr_idx = ops.topk_abs(y, k, False)
    recall = torch.isin(thr_idx, exact_idx).sum().item() / k
    energy = thr_vals.pow(2).sum().item() / y[exact_idx.long()].pow(2).sum().item()
    clone_m_s = median_time(lambda: y.clone(), args.runs)
    print(f"\ntop-k of {m} floats at density {args.density} (k = {k}); torch.topk(|x|, k): {topk_s * 1e3:.1f} ms")
    header = f"{'mode':<12}{'ms':>9}{'vs torch.topk':>15}{'vs ref':>9}{'read GB/s':>11}{'vs clone':>10}"
    print(header)
    print("-" * len(header))
    for mode, s in [("exact", exact_s), ("threshold", thr_s)]:
        row = {
            "op": f"topk_abs {mode}",
            "numel": m,
            "k": k,
            "kernel_ms": s * 1e3,
            "torch_topk_ms": topk_s * 1e3,
            "reference_ms": ref_s * 1e3,
            "speedup_vs_torch_topk": topk_s / s,
            "speedup_vs_reference": ref_s / s,
            "gb_per_s": 4 * m / s / 1e9,
            "vs_clone_time": clone_m_s / s,
        }
        if mode == "threshold":
            row.update(recall=recall, energy_captured=energy)
        rows.append(row)
        print(
            f"{mode:<12}{s * 1e3:>9.1f}{topk_s / s:>14.1f}x{ref_s / s:>8.1f}x{4 * m / s / 1e9:>11.2f}"
            f"{clone_m_s / s:>9.2f}x"
        )
    print(f"threshold mode: recall of the exact top-k {recall:.4f}, energy captured {energy:.4f}")

    fused_rows = fused_error_feedback(args, gen, clone_bw)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": str(DEVICE),
        "backend": backend,
        "machine": platform.processor() or platform.machine(),
        "clone_ms": clone_s * 1e3,
        "clone_gb_per_s": clone_bw / 1e9,
        "rows": rows,
        "fused_error_feedback": fused_rows,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
