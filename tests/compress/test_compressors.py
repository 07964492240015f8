"""Compressors: error bounds that follow from each definition, exact wire sizes, argument checks."""

import math

import pytest
import torch

from commlib import compress
from commlib.compress.base import derive_seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def all_compressors():
    return [
        compress.Identity(),
        compress.Cast(torch.float16),
        compress.Cast(torch.bfloat16),
        compress.QSGD(bits=8, bucket_size=512),
        compress.QSGD(bits=3, bucket_size=64),
        compress.QSGD(bits=1, bucket_size=8),
        compress.Sign(),
        compress.Sign(chunk_size=64),
        compress.Sign(scaled=False),
        compress.TopK(density=0.1),
        compress.TopK(density=0.1, exact=False),
        compress.RandomK(density=0.1, seed=3),
        compress.RandomK(density=0.3, seed=3, unbiased=True),
        compress.PowerSGD(rank=1),
        compress.PowerSGD(rank=4),
    ]


SHAPES = [(1,), (31,), (33,), (7, 9), (64, 3, 3), (257, 129), (0,)]


@pytest.mark.parametrize("c", all_compressors(), ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nbytes_is_wire_size_and_shape_kept(c, shape, dtype):
    if isinstance(c, compress.PowerSGD) and math.prod(shape) == 0:
        pytest.skip("PowerSGD of an empty matrix is not defined")
    t = torch.randn(shape).to(dtype)
    payload = c.compress(t, seed=11)
    assert payload.wire_bytes() == c.nbytes(shape, dtype)
    out = c.decompress(payload)
    assert out.shape == t.shape and out.dtype == t.dtype


def test_identity_and_cast_bounds():
    t = torch.randn(1000) * 100
    assert torch.equal(compress.Identity().decompress(compress.Identity().compress(t)), t)
    for dtype, eps in [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)]:
        c = compress.Cast(dtype)
        err = (c.decompress(c.compress(t)) - t).abs()
        assert torch.all(err <= eps * t.abs() + 1e-30)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_qsgd_error_bound_and_unbiased(bits):
    torch.manual_seed(0)
    t = torch.randn(2048)
    c = compress.QSGD(bits=bits, bucket_size=256)
    levels = 2**bits - 1
    scale = t.view(-1, 256).abs().amax(dim=1).repeat_interleave(256)
    seeds = 400
    total = torch.zeros_like(t)
    for s in range(seeds):
        out = c.decompress(c.compress(t, seed=s))
        # every value lands on a neighbouring grid point: error below one step 2s/L
        assert torch.all((out - t).abs() <= 2 * scale / levels * (1 + 1e-6))
        total += out
    mean = total / seeds
    # unbiased: per-element variance <= (s/L)^2, so the mean over seeds is within 6 sigma
    assert torch.all((mean - t).abs() <= 6 * (scale / levels) / math.sqrt(seeds))


def test_qsgd_zero_bucket_is_exact_zero():
    t = torch.zeros(100)
    c = compress.QSGD(bits=4, bucket_size=32)
    assert torch.equal(c.decompress(c.compress(t, seed=1)), t)


@pytest.mark.parametrize("chunk_size", [0, 64])
def test_sign_reconstructs_sign_and_scale(chunk_size):
    t = torch.randn(1000)
    c = compress.Sign(chunk_size=chunk_size)
    out = c.decompress(c.compress(t))
    chunk = 1000 if chunk_size == 0 else chunk_size
    padded = torch.nn.functional.pad(t.abs(), (0, -(-1000 // chunk) * chunk - 1000))
    counts = torch.full((padded.numel() // chunk,), float(chunk))
    counts[-1] = 1000 - (counts.numel() - 1) * chunk
    scales = (padded.view(-1, chunk).sum(1) / counts).repeat_interleave(chunk)[:1000]
    torch.testing.assert_close(out, torch.sign(t) * scales, rtol=1e-6, atol=0)
    unscaled = compress.Sign(scaled=False)
    assert torch.equal(unscaled.decompress(unscaled.compress(t)), torch.sign(t))


@pytest.mark.parametrize("density", [0.001, 0.05, 0.5, 1.0])
def test_topk_exact_keeps_largest(density):
    t = torch.randn(10_007)
    c = compress.TopK(density=density)
    out = c.decompress(c.compress(t))
    k = math.ceil(density * t.numel())
    kept = out != 0
    assert kept.sum().item() == k
    assert torch.equal(out[kept], t[kept])
    assert t[kept].abs().min() >= t[~kept].abs().max() if k < t.numel() else True
    # contraction: ||C(x) - x||^2 <= (1 - k/n) ||x||^2
    assert (out - t).pow(2).sum() <= (1 - k / t.numel()) * t.pow(2).sum() + 1e-6


def test_randomk_shared_indices_make_payloads_summable():
    a, b = torch.randn(1000), torch.randn(1000)
    c = compress.RandomK(density=0.1, seed=7)
    pa, pb = c.compress(a, seed=3), c.compress(b, seed=3)
    assert torch.equal(pa.context[0], pb.context[0])  # same indices on every rank
    summed = compress.Payload((pa.tensors[0] + pb.tensors[0],), a.shape, a.dtype, pa.context)
    torch.testing.assert_close(c.decompress(summed), c.decompress(pa) + c.decompress(pb))
    assert not torch.equal(pa.context[0], c.compress(a, seed=4).context[0])  # new step, new indices


def test_randomk_does_not_touch_global_rng():
    state = torch.get_rng_state()
    compress.RandomK(density=0.1, seed=1).compress(torch.ones(100), seed=2)
    compress.PowerSGD(rank=2).compress(torch.ones(10, 10), seed=2)
    assert torch.equal(state, torch.get_rng_state())


def test_randomk_unbiased_in_expectation():
    t = torch.randn(200)
    c = compress.RandomK(density=0.25, seed=0, unbiased=True)
    seeds = 2000
    mean = sum(c.decompress(c.compress(t, seed=s)) for s in range(seeds)) / seeds
    # per element: variance = x^2 (n/k - 1) = 3 x^2
    assert torch.all((mean - t).abs() <= 6 * t.abs() * math.sqrt(3 / seeds) + 1e-6)


def test_powersgd_error_falls_with_rank_and_is_exact_at_full_rank():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 32, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(48, 32, generator=gen))
    m = u @ torch.diag(0.7 ** torch.arange(32.0)) @ v.t()
    errors = []
    for rank in [1, 2, 4, 8, 16]:
        c = compress.PowerSGD(rank=rank)
        q = None
        for _ in range(6):  # warm start = power iteration: converges to the top subspace
            payload = c.compress(m, seed=1, q=q)
            q = payload.tensors[1]
        errors.append((c.decompress(payload) - m).norm().item())
        best = 0.7 ** torch.arange(rank, 32.0)
        assert errors[-1] <= best.norm().item() * 1.05  # near the Eckart-Young optimum
    assert all(a > b for a, b in zip(errors, errors[1:]))
    exact = compress.PowerSGD(rank=32)
    torch.testing.assert_close(exact.decompress(exact.compress(m, seed=0)), m, atol=1e-5, rtol=0)


def test_powersgd_bf16_uses_gram_schmidt():
    c = compress.PowerSGD(rank=4)
    m = torch.randn(64, 32).to(torch.bfloat16)
    p = c.compress(m, seed=0).tensors[0].float()
    torch.testing.assert_close(p.t() @ p, torch.eye(4), atol=0.05, rtol=0)


@pytest.mark.parametrize("c", all_compressors(), ids=repr)
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_nonfinite_input_gives_nonfinite_output(c, bad):
    t = torch.randn(40, 30)
    t[17, 3] = bad
    out = c.decompress(c.compress(t, seed=5))
    assert not torch.isfinite(out).all()


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: compress.QSGD(bits=0), r"bits must be an integer in \[1, 8\]"),
        (lambda: compress.QSGD(bits=9), r"bits must be an integer in \[1, 8\]"),
        (lambda: compress.QSGD(bits=4, bucket_size=12), r"bucket_size must be a positive multiple of 8"),
        (lambda: compress.QSGD(bits=4, bucket_size=0), r"bucket_size must be an integer >= 8, got 0"),
        (lambda: compress.TopK(density=0.0), r"density must be a number in \(0, 1\]"),
        (lambda: compress.TopK(density=1.5), r"density must be a number in \(0, 1\]"),
        (lambda: compress.TopK(density=0.1, exact="yes"), r"exact must be True or False"),
        (lambda: compress.RandomK(density=-1), r"density must be a number in \(0, 1\]"),
        (lambda: compress.RandomK(density=0.1, seed=-2), r"seed must be an integer >= 0"),
        (lambda: compress.Sign(chunk_size=33), r"chunk_size must be 0 or a positive multiple of 32"),
        (lambda: compress.Sign(scaled=1), r"scaled must be True or False"),
        (lambda: compress.PowerSGD(rank=0), r"rank must be an integer >= 1"),
        (lambda: compress.PowerSGD(rank=2, epsilon=-1), r"epsilon must be a finite number >= 0"),
        (lambda: compress.Cast(torch.int8), r"dtype must be one of"),
    ],
)
def test_invalid_arguments_raise_value_error(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_derive_seed_is_stable_and_spreads():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(0, step, layer) for step in range(50) for layer in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < 2**63 for s in seeds)
