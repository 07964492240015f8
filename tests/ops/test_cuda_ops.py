"""Every CUDA kernel op against its Python reference on CPU, bit for bit (PowerSGD's float sums and
the sign scales' float64 atomics within a rounding). Runs only where CUDA is available, once per
backend: ``scripts/gpu_check.sh`` runs it with ``COMMLIB_CUDA_BACKEND=extension`` and ``=cupy``."""

import pytest
import torch

from commlib import _ext
from commlib.ops import REFERENCES as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def cases():
    g = torch.Generator().manual_seed(0)

    def rnd(n, dtype=torch.float32):
        return torch.randn(n, generator=g).to(dtype)

    for dtype in FLOATS:
        n = 10_007
        yield "sign_pack", (rnd(n, dtype), 1024)
        packed, scales = ref["sign_pack"](rnd(n, dtype), 1024)
        yield "sign_unpack", (packed, scales, n, 1024, dtype)
        yield "qsgd_quantize", (rnd(n, dtype), 4, 512, 7)
        codes, qscales = ref["qsgd_quantize"](rnd(n, dtype), 4, 512, 7)
        yield "qsgd_dequantize", (codes, qscales, 4, 512, n, dtype)
        grad, residual = rnd(n, dtype), rnd(n, dtype)
        yield "ef_sign_pack", (grad, residual, 1024, n + 64)
        packed, scales = ref["ef_sign_pack"](grad, residual, 1024, n + 64)
        yield "ef_sign_residual_", (residual.clone(), grad, packed, scales, 1024, n + 64, True)
        yield "sign_unpack_into_", (rnd(n, torch.float32), packed, scales, 1024, n + 64, dtype, True)
        yield "ef_qsgd_quantize", (grad, residual, 3, 256, 11, n + 8)
        codes, qscales = ref["ef_qsgd_quantize"](grad, residual, 3, 256, 11, n + 8)
        yield "ef_qsgd_residual_", (residual.clone(), grad, codes, qscales, 3, 256, n + 8, True)
        yield "qsgd_dequantize_into_", (rnd(n, dtype), codes, qscales, 3, 256, n + 8, torch.float32, False)
        idx = torch.randperm(n, generator=g)[:300]
        yield "ef_gather", (grad, residual, idx)
        yield "ef_sparse_residual_", (residual.clone(), grad, idx.int(), rnd(300, dtype), True)
    m = rnd(300 * 200).view(300, 200)
    yield "powersgd_project", (rnd(300 * 200).view(300, 200), m.clone(), rnd(200 * 4).view(200, 4),
                               torch.empty(300, 200))
    yield "powersgd_backproject_", (m.clone(), rnd(300 * 4).view(300, 4), rnd(200 * 4).view(200, 4),
                                    torch.empty(300, 200))


CASES = list(cases())


def to_cuda(a):
    return a.cuda() if isinstance(a, torch.Tensor) else a


def close(op: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    if op.startswith("powersgd") or (op.endswith("sign_pack") and got.dtype == torch.float32):
        return torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-6)
    return torch.equal(got, want)


@pytest.mark.parametrize("op,args", CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(CASES)])
def test_cuda_op_equals_reference(op, args):
    assert _ext.kernel_backend("cuda") in ("cuda", "cupy"), f"no compiled CUDA backend: {_ext.ensure_loaded()}"
    cpu_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    gpu_args = [to_cuda(a) for a in args]
    want = ref[op](*cpu_args)
    got = getattr(torch.ops.commlib, op)(*gpu_args)
    torch.cuda.synchronize()
    outs_want = list(want) if isinstance(want, tuple) else ([want] if isinstance(want, torch.Tensor) else [])
    outs_got = list(got) if isinstance(got, (tuple, list)) else ([got] if isinstance(got, torch.Tensor) else [])
    for w, g in zip(outs_want, outs_got, strict=True):
        assert close(op, g.cpu(), w), op
    for w, g in zip(cpu_args, gpu_args, strict=True):  # in-place outputs (residuals, out, m)
        if isinstance(w, torch.Tensor):
            assert close(op, g.cpu(), w), f"{op}: an in-place argument differs"


def test_cuda_launchers_refuse_host_tensors_and_wrong_scale_counts():
    """A residual loaded with map_location="cpu" next to a CUDA gradient, or a payload with the
    wrong number of scales, is refused before a launch (check_device / check_scales; _cupy's twins)."""
    grad = torch.randn(1000, device="cuda")
    packed, scales = torch.ops.commlib.ef_sign_pack(grad, None, 256, 1024)
    with pytest.raises(RuntimeError, match="every tensor must be on|residual must match"):
        torch.ops.commlib.ef_sign_residual_(torch.zeros(1000), grad, packed, scales, 256, 1024, True)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.commlib.ef_sign_residual_(torch.zeros_like(grad), grad, packed, scales[:2], 256, 1024, True)
    with pytest.raises(RuntimeError, match="every tensor must be on"):
        torch.ops.commlib.ef_sparse_residual_(torch.zeros_like(grad), grad, torch.tensor([1, 2]),
                                              torch.ones(2, device="cuda"), True)
    m, q = torch.randn(30, 20, device="cuda"), torch.randn(20, 2)
    with pytest.raises(RuntimeError, match="every tensor must be on|CUDA"):
        torch.ops.commlib.powersgd_project(m, None, q, torch.empty_like(m))


def test_an_out_of_range_index_stops_the_kernel_before_any_write():
    """Device-side bounds check: the kernel traps (in a subprocess: a trapped kernel ends the CUDA
    context) and the launch fails loudly instead of writing out of bounds."""
    import subprocess
    import sys

    code = ("import torch, commlib\n"
            "g = torch.randn(100, device='cuda'); e = torch.zeros_like(g)\n"
            "torch.ops.commlib.ef_sparse_residual_(e, g, torch.tensor([3, 1000], device='cuda'), "
            "torch.ones(2, device='cuda'), True)\n"
            "torch.cuda.synchronize()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout
