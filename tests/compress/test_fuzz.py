"""Property-based tests (hypothesis) for every compressor and op.

Shapes: 0-d, empty, odd, huge-odd, non-contiguous and channels-last views. Dtypes: fp32, bf16,
fp16. Values: normal, with inf/nan, denormals, +-0, huge magnitudes. Properties: shape and dtype
kept; ``nbytes`` == wire bytes; the compiled kernel == the Python reference bit for bit;
non-finite in => non-finite out; finite in => finite out (all-zero inputs included); the
contraction bounds the theory gives. A derandomized profile with a fixed example budget keeps
CI time bounded (``COMMLIB_FUZZ_EXAMPLES`` raises it for a longer local run).
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commlib import compress, ops
from commlib.ops import REFERENCES as ref

EXAMPLES = int(os.environ.get("COMMLIB_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (0,), (1,), (7,), (33,), (3, 5), (1, 1), (64, 48), (2, 3, 4, 5), (100_003,), (0, 4)]
SPECIALS = ["none", "zeros", "inf", "nan", "denormal", "signed_zero", "huge"]


@st.composite
def tensors(draw, allow_nonfinite=True):
    """A tensor with a drawn shape, dtype, layout and value pattern; returns (tensor, pattern)."""
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    special = draw(st.sampled_from(SPECIALS if allow_nonfinite else [s for s in SPECIALS if s not in ("inf", "nan")]))
    layout = draw(st.sampled_from(["contiguous", "strided", "channels_last"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    base = torch.randn(max(numel, 1) * 2, generator=gen)[: numel * 2].view(*shape, 2) if shape else torch.randn(2)
    t = base[..., 0] if shape else base[0]  # every other element: a non-contiguous view of the storage
    if layout != "strided":
        t = t.contiguous()
    if layout == "channels_last" and t.dim() == 4:
        t = t.to(memory_format=torch.channels_last)
    t = t.to(dtype)
    finfo = torch.finfo(dtype)
    flat = t.view(-1) if t.is_contiguous() else None
    if numel:
        index = draw(st.integers(0, numel - 1))
        where = torch.zeros(numel, dtype=torch.bool)
        where[index] = True
        where = where.view(shape)
        value = {"none": None, "zeros": 0.0, "inf": math.inf * draw(st.sampled_from([1, -1])), "nan": math.nan,
                 "denormal": finfo.tiny / 4, "signed_zero": -0.0, "huge": finfo.max / 4}[special]
        if special == "zeros":
            t = torch.zeros_like(t)
        elif value is not None:
            t = torch.where(where, torch.tensor(value, dtype=dtype), t)
            if special in ("denormal", "huge") and numel > 1:  # a share of the tensor, not one value
                t = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.tensor(value, dtype=dtype), t)
    del flat
    return t, special


def compressors():
    return st.one_of(
        st.just(compress.Identity()),
        st.sampled_from([torch.float16, torch.bfloat16]).map(compress.Cast),
        st.builds(compress.QSGD, bits=st.integers(1, 8), bucket_size=st.sampled_from([8, 64, 512])),
        st.builds(compress.Sign, scaled=st.booleans(), chunk_size=st.sampled_from([0, 32, 64])),
        st.builds(compress.TopK, density=st.sampled_from([0.01, 0.1, 0.5, 1.0]), exact=st.booleans()),
        st.builds(compress.RandomK, density=st.sampled_from([0.05, 0.3, 1.0]), seed=st.integers(0, 99),
                  unbiased=st.booleans()),
        st.builds(compress.PowerSGD, rank=st.integers(1, 4)),
    )


def _fits_wire(c, t) -> bool:
    """Whether the compressor's arithmetic can represent the result: a 16-bit cast of an fp32 value
    above its range is inf, and PowerSGD's products P = M Q, Q = M^T P are bounded by ||M||_F, so
    they stay finite when ||M||_F is; unbiased random-k scales by d / k (the other compressors keep
    any finite input finite)."""
    if isinstance(c, compress.Cast) and t.numel():
        return bool(t.abs().max() <= torch.finfo(c.dtype).max)
    if isinstance(c, compress.PowerSGD) and t.numel():
        return float(t.double().norm()) < torch.finfo(t.dtype).max / 4
    if isinstance(c, compress.RandomK) and c.unbiased and t.numel():  # sends x d / k
        return float(t.double().abs().max()) * t.numel() / max(1, math.ceil(c.density * t.numel())) < \
            torch.finfo(t.dtype).max
    return True


@FUZZ
@given(case=tensors(), c=compressors(), seed=st.integers(0, 2**40))
def test_compressors_keep_shape_dtype_wire_size_and_finiteness(case, c, seed):
    t, special = case
    original = t.clone()
    payload = c.compress(t, seed=seed)
    out = c.decompress(payload)
    assert torch.equal(t, original) or (t.isnan() == original.isnan()).all()  # the input is not modified
    assert out.shape == t.shape and out.dtype == t.dtype
    assert payload.wire_bytes() == c.nbytes(t.shape, t.dtype)
    finite_in = bool(torch.isfinite(t).all())
    if not finite_in:
        assert not bool(torch.isfinite(out).all()), f"{c!r} hid a {special} ({t.dtype}, {tuple(t.shape)})"
    elif _fits_wire(c, t):
        assert bool(torch.isfinite(out).all()), f"{c!r} made a finite {special} input non-finite"
    if special == "zeros" and t.numel():
        assert not out.any(), f"{c!r}: zero in, non-zero out"


def _sq(x):
    return float(x.double().pow(2).sum())


@FUZZ
@given(case=tensors(allow_nonfinite=False), c=compressors(), seed=st.integers(0, 2**40))
def test_contraction_bounds(case, c, seed):
    """The bounds the theory gives, each deterministic for one draw:
    top-k and (biased) random-k: ||x - C(x)||^2 <= (1 - k/d) ||x||^2 resp. exactly the dropped mass;
    scaled sign: ||x - C(x)||^2 = ||x||^2 - ||x||_1^2 / d per chunk (<= ||x||^2);
    QSGD: every value within one grid step 2 s / (2^bits - 1) of the input (s = the bucket's max);
    PowerSGD: P P^T M is a projection, so ||M - C(M)|| <= ||M||."""
    t, special = case
    if special == "huge" or t.numel() == 0:
        return  # squares of huge values overflow float64 sums of the test itself, not the compressor
    x = t.float()
    out = c.decompress(c.compress(t, seed=seed)).float()
    err, norm = _sq(x - out), _sq(x)
    slack = 1e-2 * norm + 1e-30 if t.dtype != torch.float32 else 1e-5 * norm + 1e-30  # output rounding
    if isinstance(c, compress.TopK) and c.exact:
        k = max(1, math.ceil(c.density * t.numel())) if t.numel() else 0
        assert err <= (1 - min(k, t.numel()) / t.numel()) * norm + slack
    elif isinstance(c, compress.RandomK) and not c.unbiased:
        kept = out != 0
        assert err <= norm + slack and torch.equal(out[kept], x[kept])
    elif isinstance(c, compress.Sign) and c.scaled:
        assert err <= norm + slack
    elif isinstance(c, compress.QSGD):
        flat = x.reshape(-1)
        pad = -flat.numel() % c.bucket_size
        buckets = torch.nn.functional.pad(flat, (0, pad)).view(-1, c.bucket_size)
        step = 2 * buckets.abs().amax(dim=1, keepdim=True) / (2**c.bits - 1)
        diff = torch.nn.functional.pad((flat - out.reshape(-1)).abs(), (0, pad)).view(-1, c.bucket_size)
        rounding = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, c.bucket_size) * torch.finfo(t.dtype).eps
        assert bool((diff <= step * (1 + 1e-2) + rounding + torch.finfo(t.dtype).tiny).all())
    elif isinstance(c, compress.PowerSGD):
        assert err <= norm * (1 + 1e-3) + slack


# ------------------------------------------------------------------------------------------------ ops
@FUZZ
@given(case=tensors(), chunk=st.sampled_from([0, 32, 96]))
def test_sign_pack_kernel_equals_reference(case, chunk):
    x = case[0].reshape(-1)
    bits, scales = ops.sign_pack(x, chunk)
    rbits, rscales = ref["sign_pack"](x.contiguous(), chunk)
    assert torch.equal(bits, rbits)
    torch.testing.assert_close(scales, rscales, rtol=1e-6, atol=0, equal_nan=True)
    out = ops.sign_unpack(bits, scales, x.numel(), chunk, x.dtype)
    torch.testing.assert_close(out, ref["sign_unpack"](rbits, rscales, x.numel(), chunk, x.dtype), rtol=1e-6, atol=0,
                               equal_nan=True)


@FUZZ
@given(case=tensors(), bits=st.integers(1, 8), bucket=st.sampled_from([8, 64, 512]), seed=st.integers(0, 2**40))
def test_qsgd_kernel_equals_reference(case, bits, bucket, seed):
    x = case[0].reshape(-1)
    codes, scales = ops.qsgd_quantize(x, bits, bucket, seed)
    rcodes, rscales = ref["qsgd_quantize"](x.contiguous(), bits, bucket, seed)
    assert torch.equal(codes, rcodes)
    torch.testing.assert_close(scales, rscales, rtol=1e-6, atol=0, equal_nan=True)
    out = ops.qsgd_dequantize(codes, scales, bits, bucket, x.numel(), x.dtype)
    torch.testing.assert_close(out, ref["qsgd_dequantize"](rcodes, rscales, bits, bucket, x.numel(), x.dtype),
                               rtol=1e-6, atol=0, equal_nan=True)


@FUZZ
@given(case=tensors(allow_nonfinite=False), density=st.sampled_from([0.001, 0.01, 0.3, 1.0]))
def test_topk_kernel_equals_reference(case, density):
    x = case[0].reshape(-1)
    k = min(x.numel(), max(1, math.ceil(density * x.numel()))) if x.numel() else 0
    values, indices = ops.topk_abs(x, k, True)
    rvalues, rindices = ref["topk_abs"](x.contiguous(), k, True)
    assert torch.equal(indices.sort().values, rindices.sort().values)
    assert torch.equal(values[indices.argsort()], rvalues[rindices.argsort()])


@pytest.mark.parametrize("c", [compress.QSGD(4, 64), compress.Sign(), compress.TopK(0.1), compress.PowerSGD(2),
                               compress.RandomK(0.2, seed=1), compress.Cast(torch.bfloat16)], ids=repr)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_inputs_give_zero_outputs(c, dtype):
    for shape in [(1,), (64,), (16, 16), (3, 7, 5)]:
        out = c.decompress(c.compress(torch.zeros(shape, dtype=dtype)))
        assert torch.isfinite(out).all() and not out.any()
