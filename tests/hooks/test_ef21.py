"""EF21 / EF21-W: the hooks against a single-process reference of the equations, exact special cases, theory."""

import math

import pytest
import torch
import torch.distributed as dist
from conftest import WorkerError, run_world
from torch import nn

from commlib import compress, hooks
from commlib.hooks.ef21 import ef21_message

from .ddp_harness import Net, batch, build, sgd_steps, train

SMALL_BUCKETS = {"bucket_cap_mb": 0.004}
LR = 0.05


# ------------------------------------------------------------------------------------------------ DDP vs reference
def _ddp_iterates(rank, world_size, hook, options, steps):
    model, ddp, state = build(hook, options, SMALL_BUCKETS)
    sgd_steps(ddp, model, rank, steps, lr=LR)
    dist.barrier()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "aggregates": {k: v.clone() for k, v in state.aggregates.items()},
            "start_iter": state.start_iter}


def reference_ef21(world, steps, compressor, start_iter, weights=None):
    """EF21 / EF21-W in one process: every rank's gradient at the shared iterate, the paper's updates."""
    model = Net()
    weights = weights or [1.0 / world] * world
    local, agg = [dict() for _ in range(world)], {}
    for step in range(steps):
        grads = []
        for r in range(world):
            model.zero_grad()
            x, y = batch(r, step)
            nn.functional.mse_loss(model(x), y).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        update = {}
        for name, p in model.named_parameters():
            gs = [g[name] for g in grads]
            mean = sum(g * (1.0 / world) for g in gs)
            if step < start_iter or p.dim() < 2 or not compressor.shrinks(p.shape):
                update[name] = mean
                continue
            targets = [g / (world * w) for g, w in zip(gs, weights)]
            if name not in agg:  # the dense first round
                for r in range(world):
                    local[r][name] = targets[r]
                agg[name] = mean
            else:
                messages = [ef21_message(targets[r], local[r][name], compressor, 0)[1] for r in range(world)]
                for r in range(world):
                    local[r][name] = local[r][name] + messages[r]
                agg[name] = agg[name] + sum(w * c for w, c in zip(weights, messages))
            update[name] = agg[name]
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(update[name], alpha=-LR)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, agg, local


@pytest.mark.parametrize("world", [2, 3])
def test_ef21_iterates_match_the_reference_over_100_steps(world):
    """The whole training trajectory (TopK over all-gather) against a one-process simulation."""
    steps = 100
    options = {"compressor": ("TopK", {"density": 0.1})}
    out = run_world(_ddp_iterates, world, kwargs=dict(hook="ef21", options=options, steps=steps), timeout=240)
    params, agg, _ = reference_ef21(world, steps, compress.TopK(density=0.1), out[0]["start_iter"])
    for r in range(world):
        assert out[r]["aggregates"].keys() == agg.keys() and len(agg) >= 3
        for key in agg:  # all ranks hold the same g, and it is the reference's
            assert torch.equal(out[r]["aggregates"][key], out[0]["aggregates"][key])
            torch.testing.assert_close(out[r]["aggregates"][key], agg[key], rtol=1e-4, atol=1e-5)
        for name, value in params.items():
            torch.testing.assert_close(out[r]["params"][name], value, rtol=1e-4, atol=1e-5)


def _record_ef21(rank, world_size, options, steps):
    """Per step: each parameter's local gradient going into the hook and g coming out."""
    model = Net()
    state, _ = hooks.make("ef21", model=model, compressor=compress.Cast(torch.float16), **options)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **SMALL_BUCKETS)
    records = []

    def recording_hook(st, bucket):
        views = st.param_views(bucket)
        inputs = {v.key: v.grad.clone() for v in views}
        step = st.step
        return hooks.commlib_hook(st, bucket).then(
            lambda f: (records.append((step, inputs, {v.key: v.grad.clone() for v in views})), f.value())[1])

    ddp.register_comm_hook(state, recording_hook)
    sgd_steps(ddp, model, rank, steps, lr=LR)
    dist.barrier()
    return {"records": records, "start_iter": state.start_iter}


@pytest.mark.parametrize("world", [2, 3])
def test_ef21_fp16_allreduce_follows_the_equations_exactly(world):
    """Cast(fp16) over allreduce: from each step's recorded local gradients, the equations give g
    bit for bit on 2 ranks (the mean of the messages is taken on the fp16 wire: scale by 1/n, then
    sum), and to the fp16 wire's rounding on 3 (gloo's ring sums chunks in different orders)."""
    steps = 100
    out = run_world(_record_ef21, world, kwargs=dict(options={}, steps=steps), timeout=240)
    cast = compress.Cast(torch.float16)
    local, agg, checked = [dict() for _ in range(world)], {}, 0
    for records in zip(*(o["records"] for o in out)):
        step = records[0][0]
        for key, grad0 in records[0][1].items():
            if step < out[0]["start_iter"] or grad0.dim() < 2:
                continue
            grads = [rec[1][key] for rec in records]
            if key not in agg:
                wire = [g * (1.0 / world) for g in grads]
                agg[key] = wire[0] if world == 1 else sum(wire[1:], wire[0])
                magnitude = sum(w.abs() for w in wire) * 2.0**-12  # float32 roundings only
                for r in range(world):
                    local[r][key] = grads[r].clone()
            else:
                messages = [ef21_message(grads[r], local[r][key], cast, 0)[1] for r in range(world)]
                wire = [m.to(torch.float16) * (1.0 / world) for m in messages]
                agg[key] = agg[key] + sum(wire[1:], wire[0]).float()
                magnitude = sum(w.float().abs() for w in wire)
                for r in range(world):
                    local[r][key] = local[r][key] + messages[r]
            for rec in records:
                if world == 2:  # a + b is one rounding whatever the order
                    assert torch.equal(rec[2][key], agg[key]), (step, key)
                else:  # gloo's ring sums three ranks in a chunk-dependent order: two fp16 roundings
                    bound = 4 * 2.0**-11 * magnitude + 1e-6  # each order: two roundings of <= 2^-11 x partial sum
                    assert bool(((rec[2][key] - agg[key]).abs() <= bound).all()), (step, key)
            agg[key] = records[0][2][key]  # continue from the hook's g: per-step equations, no drift
            checked += 1
    assert checked >= 4 * (steps - out[0]["start_iter"])


def test_ef21w_iterates_match_the_weighted_reference():
    """Cast(fp16) is not homogeneous, so the weights change the algorithm: check against EF21-W's equations."""
    world, steps, smoothness = 3, 60, [1.0, 2.0, 5.0]
    options = {"compressor": ("Cast", {"dtype": torch.float16}), "collective": "allgather", "smoothness": smoothness}
    out = run_world(_ddp_iterates, world, kwargs=dict(hook="ef21w", options=options, steps=steps), timeout=240)
    weights = [s / sum(smoothness) for s in smoothness]
    params, agg, _ = reference_ef21(world, steps, compress.Cast(torch.float16), out[0]["start_iter"], weights)
    for r in range(world):
        for key in agg:
            assert torch.equal(out[r]["aggregates"][key], out[0]["aggregates"][key])
            torch.testing.assert_close(out[r]["aggregates"][key], agg[key], rtol=1e-4, atol=1e-5)
        for name, value in params.items():
            torch.testing.assert_close(out[r]["params"][name], value, rtol=1e-4, atol=1e-5)


def test_ef21w_equals_ef21_for_topk():
    """Top-k is positively homogeneous: EF21-W's iterates are EF21's whatever the weights (paper, Sec. 2.4)."""
    plain = run_world(train, 2, kwargs=dict(hook="ef21", options={"compressor": ("TopK", {"density": 0.1})},
                                            steps=30, ddp_kwargs=SMALL_BUCKETS))
    weighted = run_world(train, 2, kwargs=dict(hook="ef21w", options={"compressor": ("TopK", {"density": 0.1}),
                                                                      "smoothness": [1.0, 7.0]},
                                               steps=30, ddp_kwargs=SMALL_BUCKETS))
    torch.testing.assert_close(plain[0]["params"], weighted[0]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_ef21_with_identity_equals_ddp_exactly(world):
    plain = run_world(train, world, kwargs=dict(steps=10, ddp_kwargs=SMALL_BUCKETS))
    hooked = run_world(train, world, kwargs=dict(hook="ef21", options={"compressor": ("Identity", {})}, steps=10,
                                                 ddp_kwargs=SMALL_BUCKETS))
    assert torch.equal(plain[0]["params"], hooked[0]["params"])


def _online_weights(rank, world_size):
    model, ddp, state = build("ef21w", {"compressor": ("TopK", {"density": 0.1}), "estimate_every": 3},
                              SMALL_BUCKETS)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(20):
        x, y = batch(rank, step)
        x = x * (1 + 3 * rank)  # rank r's loss is ~(1 + 3r)^2 times sharper in the first layer
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    dist.barrier()
    return state.stats()["ef21w"]


def test_online_weights_agree_and_follow_the_smoothness():
    out = run_world(_online_weights, 3)
    assert out[0] == out[1] == out[2]
    w = out[0]["weights"]
    assert out[0]["estimates_taken"] >= 4 and math.isclose(sum(w), 1.0)
    assert w[0] < w[1] < w[2]


# ------------------------------------------------------------------------------------------------ theory
def test_stepsize_formula():
    alpha, L, Lt = 0.1, 2.0, 3.0
    theta = 1 - math.sqrt(1 - alpha)
    beta = (1 - alpha) / (1 - math.sqrt(1 - alpha))
    assert hooks.ef21_theta_beta(alpha) == pytest.approx((theta, beta))
    assert hooks.ef21_stepsize(alpha, L, Lt) == pytest.approx(1 / (L + Lt * math.sqrt(beta / theta)))
    assert hooks.ef21_stepsize(1.0, L, Lt) == pytest.approx(1 / L)  # no compression: gradient descent
    Ls = [1.0, 1.0, 1.0, 100.0]  # the paper's Example 2.1: L_AM 25.75, L_QM ~50
    assert hooks.ef21w_stepsize(0.01, 30.0, Ls) > 1.8 * hooks.ef21_stepsize_from_smoothness(0.01, 30.0, Ls)
    assert hooks.ef21w_weights([1.0, 3.0]) == [0.25, 0.75]


@pytest.mark.parametrize("bad", [dict(alpha=0.0), dict(alpha=1.5), dict(L=-1.0), dict(L_tilde=float("inf"))])
def test_stepsize_rejects_bad_input(bad):
    args = dict(alpha=0.5, L=1.0, L_tilde=1.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        hooks.ef21_stepsize(**args)


@pytest.mark.parametrize("compressor", [compress.TopK(0.05), compress.RandomK(0.1, seed=1), compress.Sign(),
                                        compress.QSGD(bits=8, bucket_size=64), compress.Cast(torch.bfloat16),
                                        compress.Identity()])
def test_compressors_contract_by_at_least_their_alpha(compressor):
    d = 4096
    alpha = hooks.compressor_alpha(compressor, d)
    assert 0 < alpha <= 1
    gen = torch.Generator().manual_seed(0)
    excess = []  # ||C(x) - x||^2 - (1 - alpha) ||x||^2: <= 0 in expectation over the compressor's randomness
    for seed in range(40):
        x = torch.randn(d, generator=gen) * torch.rand(d, generator=gen) ** 3
        error = float((compressor.decompress(compressor.compress(x, seed=seed)) - x).pow(2).sum())
        excess.append(error - (1 - alpha) * float(x.pow(2).sum()) * (1 + 1e-6) - 1e-9)
    excess = torch.tensor(excess, dtype=torch.float64)
    # random-k meets the bound with equality in expectation: allow 4 standard errors of the sample
    # mean (deterministic compressors meet it on every sample, where this slack is not needed)
    assert float(excess.mean()) <= 4 * float(excess.std()) / len(excess) ** 0.5
    if compressor.name not in ("randomk", "qsgd"):
        assert float(excess.max()) <= 0


def test_compressor_alpha_refuses_non_contractive_ones():
    with pytest.raises(ValueError, match="not contractive"):
        hooks.compressor_alpha(compress.QSGD(bits=4, bucket_size=512), 10_000)
    with pytest.raises(ValueError, match="unbiased"):
        hooks.compressor_alpha(compress.RandomK(0.1, unbiased=True), 100)


def test_bad_options_raise_at_construction():
    with pytest.raises(WorkerError, match="ValueError: smoothness"):
        run_world(_make, 2, kwargs=dict(options={"smoothness": [1.0]}))
    with pytest.raises(ValueError, match="estimate_every"):
        hooks.EF21WState.__init__(object.__new__(hooks.EF21WState), None, estimate_every=1)
    with pytest.raises(ValueError, match="collective"):
        hooks.EF21State.__init__(object.__new__(hooks.EF21State), None, collective="ring")


def _make(rank, world_size, options):
    hooks.make("ef21w", **options)
