"""Every op against its Python reference: bit-exact codes/bits/indices, fp32/bf16/fp16, odd sizes.

Run twice by ``make test``: once with the compiled kernels, once with ``COMMLIB_FORCE_PYTHON=1``
(then the dispatcher serves the reference and these tests check the fallback path end to end).
"""

import os

import numpy as np
import pytest
import torch

from commlib import _ext, ops
from commlib.ops import REFERENCES as ref
from commlib.ops._common import hash32, seed_key, uniform24

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 31, 33, 1000, 1_000_007]


def make_input(n, dtype, seed=0, noncontiguous=False):
    gen = torch.Generator().manual_seed(seed + n)
    if noncontiguous:
        x = torch.randn(n, 2, generator=gen)[:, 0]
        assert not x.is_contiguous() or n <= 1
    else:
        x = torch.randn(n, generator=gen)
    return x.to(dtype)


def test_backend_matches_environment():
    status = _ext.ensure_loaded()
    if os.environ.get("COMMLIB_FORCE_PYTHON") == "1":
        assert status["cpu"] == "python"
    elif os.environ.get("CI") or os.environ.get("COMMLIB_REQUIRE_KERNELS") == "1":
        assert status["cpu"] == "cpp", status  # CI has a compiler: the kernels must build


# ----------------------------------------------------------------------------------------------
# Hash / RNG: the Python reference equals a NumPy uint32 re-implementation of lowbias32.
def test_hash_matches_numpy_uint32():
    x = np.arange(0, 2**32, 2**32 // 4099, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = x.astype(np.uint32)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    got = hash32(torch.from_numpy(x.astype(np.int64)))
    assert np.array_equal(got.numpy().astype(np.uint32), h)


def test_uniform24_is_uniform_and_seeded():
    idx = torch.arange(200_000)
    u = uniform24(seed_key(5), idx)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert not torch.equal(u, uniform24(seed_key(6), idx))
    # large indices use the high word too
    assert not torch.equal(uniform24(1, idx), uniform24(1, idx + 2**32))


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("chunk_size", [0, 64])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_sign_pack_parity(dtype, n, chunk_size, noncontiguous):
    x = make_input(n, dtype, noncontiguous=noncontiguous)
    packed, scales = ops.sign_pack(x, chunk_size)
    ref_packed, ref_scales = ref["sign_pack"](x, chunk_size)
    assert packed.dtype == torch.int32 and packed.shape == (-(-n // 32),)
    assert torch.equal(packed, ref_packed)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    out = ops.sign_unpack(packed, scales, n, chunk_size, dtype)
    assert torch.equal(out, ref["sign_unpack"](packed, scales, n, chunk_size, dtype))
    assert out.dtype == dtype
    # the sign survives exactly (zeros are +0 here: randn never yields -0)
    assert torch.equal(torch.signbit(out), torch.signbit(x))


def test_sign_bits_layout():
    x = torch.tensor([-1.0, 2.0, -0.0, 0.0] + [1.0] * 28 + [-3.0])
    packed, scales = ops.sign_pack(x, 0)
    assert packed.tolist() == [0b101, 1]
    assert scales.item() == pytest.approx((1 + 2 + 28 + 3) / 33)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8])
def test_qsgd_parity(dtype, n, bits):
    x = make_input(n, dtype, seed=bits, noncontiguous=(bits % 2 == 1))
    codes, scales = ops.qsgd_quantize(x, bits, 64, 12345)
    ref_codes, ref_scales = ref["qsgd_quantize"](x, bits, 64, 12345)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-n // 8) * bits
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)
    out = ops.qsgd_dequantize(codes, scales, bits, 64, n, dtype)
    assert torch.equal(out, ref["qsgd_dequantize"](codes, scales, bits, 64, n, dtype))


def test_qsgd_code_layout():
    # bits=2: values at the grid points -s, -s/3, s/3, s are exact and deterministic (codes 0..3)
    s = 3.0
    x = torch.tensor([-s, -1.0, 1.0, s, s, 1.0, -1.0, -s])
    codes, scales = ops.qsgd_quantize(x, 2, 8, 0)
    assert scales.tolist() == [s]
    # code j of the group sits at bits [2j, 2j+2): codes 0,1,2,3 | 3,2,1,0
    assert codes.tolist() == [0b11100100, 0b00011011]
    torch.testing.assert_close(ops.qsgd_dequantize(codes, scales, 2, 8, 8), x)


def test_qsgd_seed_changes_rounding():
    x = make_input(4096, torch.float32)
    a, _ = ops.qsgd_quantize(x, 2, 512, 1)
    b, _ = ops.qsgd_quantize(x, 2, 512, 2)
    assert not torch.equal(a, b)
    assert torch.equal(a, ops.qsgd_quantize(x, 2, 512, 1)[0])


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("exact", [True, False])
def test_topk_parity(dtype, n, exact):
    x = make_input(n, dtype, noncontiguous=(n % 2 == 1))
    for k in sorted({0, min(n, 1), n // 100, n // 3, n}):
        values, indices = ops.topk_abs(x, k, exact)
        ref_values, ref_indices = ref["topk_abs"](x, k, exact)
        assert indices.dtype == torch.int32 and values.dtype == dtype and values.numel() == k
        assert torch.equal(indices, ref_indices), (k, exact)
        assert torch.equal(values, ref_values)


def test_topk_large_exact_equals_torch_topk_set():
    x = make_input(3_000_017, torch.float32)
    k = 30_000
    values, indices = ops.topk_abs(x, k, True)
    expected = torch.topk(x.abs(), k).indices.sort().values
    assert torch.equal(indices.long(), expected)  # randn values: no ties
    assert torch.equal(values, x[expected])
    assert torch.all(indices[1:] > indices[:-1])


def test_topk_ties_and_nonfinite():
    x = torch.tensor([1.0, -1.0, 1.0, float("nan"), -float("inf"), 0.5, 1.0])
    values, indices = ops.topk_abs(x, 4, True)
    # NaN and -inf first, then the two lowest-index ties of magnitude 1
    assert indices.tolist() == [0, 1, 3, 4]
    assert torch.equal(indices, ref["topk_abs"](x, 4, True)[1])


def test_topk_threshold_mode_is_close_on_large_inputs():
    x = make_input(2_000_000, torch.float32)
    k = 20_000
    _, approx = ops.topk_abs(x, k, False)
    _, exact = ops.topk_abs(x, k, True)
    recall = np.intersect1d(approx.numpy(), exact.numpy()).size / k
    assert recall > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_parity(dtype):
    x = make_input(5000, dtype)
    x[3], x[700], x[701], x[4999] = float("nan"), float("inf"), -float("inf"), float("nan")
    for got, want, scale_rtol in [
        (ops.sign_pack(x, 64), ref["sign_pack"](x, 64), 1e-6),  # float reduction: documented tolerance
        (ops.qsgd_quantize(x, 5, 64, 9), ref["qsgd_quantize"](x, 5, 64, 9), 0),
        (ops.topk_abs(x, 50, True), ref["topk_abs"](x, 50, True), 0),
    ]:
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[1], want[1], rtol=scale_rtol, atol=0, equal_nan=True)
    codes, scales = ops.qsgd_quantize(x, 5, 64, 9)
    assert scales[0].isnan() and scales[10].isinf() and scales[-1].isnan()
    out = ops.qsgd_dequantize(codes, scales, 5, 64, 5000, dtype)
    assert out[:64].isnan().all() and out[640:704].isinf().all() and torch.isfinite(out[64:640]).all()


# ----------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    x = torch.randn(100)
    with pytest.raises(RuntimeError, match="bits"):
        ops.qsgd_quantize(x, 9, 64, 0)
    with pytest.raises(RuntimeError, match="bucket_size"):
        ops.qsgd_quantize(x, 4, 12, 0)
    with pytest.raises(RuntimeError, match="chunk_size"):
        ops.sign_pack(x, 40)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.topk_abs(x, 101, True)
    with pytest.raises(RuntimeError):
        ops.sign_pack(torch.arange(10), 0)  # integer input


def opcheck_cases():
    x = torch.randn(1000)
    xb = torch.randn(999, 2)[:, 0].to(torch.bfloat16)  # non-contiguous bf16
    packed, scales = ops.sign_pack(x, 64)
    codes, qscales = ops.qsgd_quantize(x, 4, 64, 3)
    return {
        "sign_pack": [(x, 64), (xb, 0)],
        "sign_unpack": [(packed, scales, 1000, 64, torch.float32), (packed, scales, 1000, 64, torch.float16)],
        "qsgd_quantize": [(x, 4, 64, 3), (xb, 3, 8, 1)],
        "qsgd_dequantize": [(codes, qscales, 4, 64, 1000, torch.float32)],
        "topk_abs": [(x, 17, True), (x, 17, False), (xb, 5, True)],
    }


@pytest.mark.parametrize("name", ["sign_pack", "sign_unpack", "qsgd_quantize", "qsgd_dequantize", "topk_abs"])
def test_opcheck(name):
    op = getattr(torch.ops.commlib, name).default
    for args in opcheck_cases()[name]:
        torch.library.opcheck(op, args)
