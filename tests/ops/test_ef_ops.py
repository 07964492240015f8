"""Fused error-feedback ops against the reference ``ef_step`` that materializes v = g + e.

Pass 1 (compress v) must give the same payload as compressing the materialized, zero-padded v
(bits, codes and indices bit-exact; sign's float reduction within its documented 1e-6), and pass 2
(the new residual) must equal ``v - decompress(payload)`` bit for bit given that payload, in
float32, bfloat16 and float16, with and without a previous residual. Run with the kernels and again
under ``COMMLIB_FORCE_PYTHON=1`` (then the references answer, and the parity is with themselves).
"""

import pytest
import torch

from commlib import ops
from commlib.ops import REFERENCES as ref
from commlib.ops.sparse import check_int32_indexable

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 31, 33, 1000, 70_001]


def pair(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + n)
    grad = torch.randn(n, generator=gen).to(dtype)
    residual = (0.3 * torch.randn(n, generator=gen)).to(dtype)
    return grad, residual


def materialized(grad, residual, numel=None):
    v = grad if residual is None else grad + residual
    return torch.nn.functional.pad(v.reshape(-1), (0, (numel or v.numel()) - v.numel()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("chunk_size,pad", [(0, 0), (64, 0), (0, 70), (256, 300)])
def test_ef_sign_parity(dtype, n, with_residual, chunk_size, pad):
    grad, residual = pair(n, dtype)
    e = residual if with_residual else None
    numel = n + pad
    packed, scales = ops.ef_sign_pack(grad, e, chunk_size, numel)
    want_packed, want_scales = ref["sign_pack"](materialized(grad, e, numel), chunk_size)
    assert torch.equal(packed, want_packed)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)
    new = residual.clone() if with_residual else torch.full_like(grad, float("nan"))  # garbage is never read
    ops.ef_sign_residual_(new, grad, packed, scales, chunk_size, numel, with_residual)
    hat = ref["sign_unpack"](packed, scales, numel, chunk_size, dtype)[:n]
    assert torch.equal(new, materialized(grad, e) - hat)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("bits,bucket,pad", [(4, 64, 0), (2, 512, 0), (8, 8, 5), (3, 64, 200)])
def test_ef_qsgd_parity(dtype, n, with_residual, bits, bucket, pad):
    grad, residual = pair(n, dtype, 1)
    e = residual if with_residual else None
    numel = n + pad
    codes, scales = ops.ef_qsgd_quantize(grad, e, bits, bucket, 77, numel)
    want_codes, want_scales = ref["qsgd_quantize"](materialized(grad, e, numel), bits, bucket, 77)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    new = residual.clone() if with_residual else torch.full_like(grad, float("nan"))
    ops.ef_qsgd_residual_(new, grad, codes, scales, bits, bucket, numel, with_residual)
    hat = ref["qsgd_dequantize"](codes, scales, bits, bucket, numel, dtype)[:n]
    assert torch.equal(new, materialized(grad, e) - hat)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("exact", [True, False])
def test_ef_topk_parity_and_residual(dtype, n, exact):
    grad, residual = pair(n, dtype, 2)
    k = max(1, n // 100)
    values, indices = ops.ef_topk_abs(grad, residual, k, exact)
    want_values, want_indices = ref["topk_abs"](materialized(grad, residual), k, exact)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    new = residual.clone()
    ops.ef_sparse_residual_(new, grad, indices, values)
    hat = torch.zeros(n, dtype=dtype).index_add_(0, indices.long(), values)
    assert torch.equal(new, materialized(grad, residual) - hat)
    # what was sent is gone from the residual, the rest is kept whole
    assert torch.equal(new[indices.long()][values != 0], torch.zeros_like(values[values != 0]))


def test_ef_sparse_residual_zero_padding_and_int64():
    """top-k's threshold mode pads with (index 0, value 0): subtracting them one at a time equals
    subtracting their scatter-added sum, whether index 0 was really chosen or not."""
    grad, residual = pair(50, torch.float32, 3)
    v = grad + residual
    for indices, values in [
        (torch.tensor([0, 7, 0, 0], dtype=torch.int32), torch.stack([v[0], v[7], torch.tensor(0.0), torch.tensor(0.0)])),
        (torch.tensor([7, 9, 0, 0], dtype=torch.int64), torch.stack([v[7], v[9], torch.tensor(0.0), torch.tensor(0.0)])),
    ]:
        new = residual.clone()
        ops.ef_sparse_residual_(new, grad, indices, values)
        want = v - torch.zeros(50).index_add_(0, indices.long(), values)
        assert torch.equal(new, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ef_gather_values_and_guard(dtype):
    grad, residual = pair(10_000, dtype, 4)
    indices = torch.tensor([1, 50, 9999], dtype=torch.int64)
    values, guard = ops.ef_gather(grad, residual, indices)
    assert torch.equal(values, materialized(grad, residual)[indices]) and guard.item() == 0.0
    grad[5000] = float("inf")  # outside the sample: the guard still carries it
    values, guard = ops.ef_gather(grad, residual, indices)
    assert torch.isfinite(values).all() and guard.isnan()
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # finite + finite overflows in v
    _, guard = ops.ef_gather(big, big.clone(), torch.tensor([3]))
    assert guard.isnan()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_inputs_reach_the_payload(dtype):
    grad, residual = pair(4096, dtype, 5)
    residual[100] = float("nan")
    grad[3000] = float("inf")
    _, scales = ops.ef_sign_pack(grad, residual, 1024)
    assert scales[0].isnan() and scales[2].isinf() and torch.isfinite(scales[[1, 3]]).all()
    _, qscales = ops.ef_qsgd_quantize(grad, residual, 4, 512, 1)
    assert qscales[0].isnan() and qscales[5].isinf()
    values, indices = ops.ef_topk_abs(grad, residual, 2)
    assert set(indices.tolist()) == {100, 3000}


def test_bad_arguments_raise():
    grad, residual = pair(100, torch.float32)
    with pytest.raises(RuntimeError, match="residual"):
        ops.ef_sign_pack(grad, residual.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="residual"):
        ops.ef_qsgd_quantize(grad, residual[:50], 4, 64, 0)
    with pytest.raises(RuntimeError, match="numel"):
        ops.ef_sign_pack(grad, residual, 0, 99)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.ef_topk_abs(grad, residual, 101)
    with pytest.raises(RuntimeError, match="bits"):
        ops.ef_qsgd_quantize(grad, residual, 9, 64, 0)


def opcheck_cases():
    grad, residual = pair(1000, torch.float32, 6)
    gb, rb = pair(999, torch.bfloat16, 6)
    packed, scales = ops.ef_sign_pack(grad, residual, 64, 1024)
    codes, qscales = ops.ef_qsgd_quantize(grad, residual, 4, 64, 3, 1024)
    values, indices = ops.ef_topk_abs(grad, residual, 10)
    return {
        "ef_sign_pack": [(grad, residual, 64, 1024), (gb, None, 0, 999)],
        "ef_sign_residual_": [(residual.clone(), grad, packed, scales, 64, 1024, True)],
        "ef_qsgd_quantize": [(grad, residual, 4, 64, 3, 1024), (gb, rb, 3, 8, 1, 1000)],
        "ef_qsgd_residual_": [(residual.clone(), grad, codes, qscales, 4, 64, 1024, False)],
        "ef_topk_abs": [(grad, residual, 10, True), (gb, rb, 5, False)],
        "ef_sparse_residual_": [(residual.clone(), grad, indices, values, True)],
        "ef_gather": [(grad, residual, indices.long()), (gb, None, indices)],
    }


@pytest.mark.parametrize("name", sorted(opcheck_cases()))
def test_opcheck(name):
    op = getattr(torch.ops.commlib, name).default
    for args in opcheck_cases()[name]:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------- PowerSGD
def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), u = 2^-24: the float32 bound of an n-term dot product."""
    u = 2.0**-24
    return n * u / (1 - n * u)


@pytest.mark.parametrize("rows,cols,r", [(1, 1, 1), (33, 17, 3), (512, 256, 4), (100, 1000, 8), (64, 300, 5)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_powersgd_project_parity(rows, cols, r, with_residual):
    gen = torch.Generator().manual_seed(rows * cols + r)
    grad, residual = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    q = torch.randn(cols, r, generator=gen)
    e = residual if with_residual else None
    m = torch.full_like(grad, float("nan"))
    p = ops.powersgd_project(grad, e, q, m)
    want_m = grad + residual if with_residual else grad
    assert torch.equal(m, want_m)  # M = G + E exactly
    # P = M Q: the kernel and BLAS each within gamma_cols of sum |m_j q_jk|
    bound = 2 * gamma(cols) * (want_m.abs() @ q.abs())
    assert ((p - want_m.double().matmul(q.double()).float()).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("rows,cols,r", [(1, 1, 1), (33, 17, 3), (512, 256, 4), (100, 1000, 8), (64, 300, 5)])
def test_powersgd_backproject_parity(rows, cols, r):
    gen = torch.Generator().manual_seed(rows + cols * r)
    m, p, q = torch.randn(rows, cols, generator=gen), torch.randn(rows, r, generator=gen), torch.randn(cols, r,
                                                                                                    generator=gen)
    m_before = m.clone()
    out = torch.full_like(m, float("nan"))
    ops.powersgd_backproject_(m, p, q, out)
    exact = p.double().matmul(q.double().t())
    assert ((out.double() - exact).abs() <= gamma(r) * (p.abs() @ q.abs().t()).double() + 1e-30).all()
    assert torch.equal(m, m_before - out)  # E = M - P Q^T with the P Q^T that was written out


def test_powersgd_ops_refuse_bad_shapes():
    m = torch.randn(8, 6)
    with pytest.raises(RuntimeError, match="chain|shape"):
        ops.powersgd_project(m, None, torch.randn(5, 2), torch.empty_like(m))
    with pytest.raises(RuntimeError, match="p must|shape"):
        ops.powersgd_backproject_(m, torch.randn(7, 2), torch.randn(6, 2), torch.empty_like(m))


def test_powersgd_opcheck():
    gen = torch.Generator().manual_seed(0)
    g, e, q = torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen), torch.randn(30, 3, generator=gen)
    torch.library.opcheck(torch.ops.commlib.powersgd_project.default, (g, e, q, torch.empty_like(g)))
    torch.library.opcheck(torch.ops.commlib.powersgd_backproject_.default,
                          (g.clone(), torch.randn(40, 3, generator=gen), q, torch.empty_like(g)))


# ---------------------------------------------------------------------------------------------- decompress into
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("payload_dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("n,numel", [(1, 1), (1000, 1000), (1000, 1088), (33, 64), (70_001, 70_001)])
def test_unpack_into_parity(out_dtype, payload_dtype, accumulate, n, numel):
    """out <- (out +) decompress(payload)[:n], rounded as out.add_(x.to(out.dtype)) rounds it."""
    x = pair(numel, payload_dtype, 8)[0]
    start = pair(n, out_dtype, 9)[0]
    packed, scales = ops.sign_pack(x, 64)
    codes, qscales = ops.qsgd_quantize(x, 3, 64, 5)
    for fused, reference in [
        (lambda o: ops.sign_unpack_into_(o, packed, scales, 64, numel, payload_dtype, accumulate),
         lambda o: ref["sign_unpack_into_"](o, packed, scales, 64, numel, payload_dtype, accumulate)),
        (lambda o: ops.qsgd_dequantize_into_(o, codes, qscales, 3, 64, numel, payload_dtype, accumulate),
         lambda o: ref["qsgd_dequantize_into_"](o, codes, qscales, 3, 64, numel, payload_dtype, accumulate)),
    ]:
        got, want = start.clone(), start.clone()
        fused(got)
        reference(want)
        assert torch.equal(got, want)


def test_unpack_into_matches_decompress_add():
    from commlib.compress import QSGD, Sign

    x = torch.randn(5000)
    for c in (Sign(chunk_size=512), QSGD(bits=4, bucket_size=128)):
        p = c.compress(x, seed=3)
        out = torch.randn(5000)
        want = out + c.decompress(p)
        assert torch.equal(c.decompress_add_(out, p), want)
        assert torch.equal(c.decompress_into_(torch.empty(5000), p), c.decompress(p))


def test_unpack_into_opcheck():
    x = torch.randn(1000)
    packed, scales = ops.sign_pack(x, 64)
    codes, qscales = ops.qsgd_quantize(x, 4, 64, 3)
    torch.library.opcheck(torch.ops.commlib.sign_unpack_into_.default,
                          (torch.randn(1000), packed, scales, 64, 1000, torch.float32, True))
    torch.library.opcheck(torch.ops.commlib.qsgd_dequantize_into_.default,
                          (torch.randn(900), codes, qscales, 4, 64, 1000, torch.float32, False))


@pytest.mark.parametrize("bad", [50, -1, 1 << 40])
def test_a_bad_index_leaves_the_residual_untouched(bad):
    """Every index is checked before the first write (it used to leave a half-updated residual)."""
    grad, residual = pair(50, torch.float32, 8)
    before = residual.clone()
    indices = torch.tensor([3, 7, bad, 9], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.ef_sparse_residual_(residual, grad, indices, torch.ones(4))
    assert torch.equal(residual, before)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.ef_gather(grad, residual, indices)


def test_top_k_refuses_tensors_its_int32_indices_cannot_address():
    from commlib import compress

    huge = torch.empty(2**31, device="meta")
    with pytest.raises(ValueError, match="int32"):
        compress.TopK(0.01).compress(huge)
    with pytest.raises(RuntimeError, match="2\\^31"):
        check_int32_indexable("topk_abs", 2**31)
    check_int32_indexable("topk_abs", 2**31 - 1)
