"""Compressed FSDP2 reduce-scatter and quantized all-gather on gloo worlds of 2 and 3 ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

from commlib.checkpoint import HookStateful
from commlib.compress import QSGD, Cast, Identity, PowerSGD, RandomK, Sign, TopK
from commlib.fsdp import QuantizedAllGather, compress_gradients, quantize_all_gather
from commlib.fsdp.all_gather import dequantize_int8_blocks, quantize_int8_blocks
from commlib.fsdp.codec import row_segments
from commlib.fsdp.reduce_scatter import CompressedReduceScatter, reference_reduce_scatter
from commlib.fsdp.state import GradientCompression
from commlib.hooks import gather_state_dict
from tests.conftest import run_world
from tests.fsdp.fsdp_harness import all_ranks_equal, full_grads, full_params, local_batch, loss_of, mlp, shard

COMPRESSORS = {
    "identity": Identity(),
    "bf16": Cast(torch.bfloat16),
    "qsgd8": QSGD(bits=8, bucket_size=16),
    "qsgd4": QSGD(bits=4, bucket_size=16),
    "sign": Sign(),
    "topk": TopK(density=0.25),
    "randomk": RandomK(density=0.25, seed=3),
    "powersgd": PowerSGD(rank=1),
}


def _train(rank, world, steps, compressor=None, error_feedback=False, mp=None, reshard=True, accumulate=1,
           qag=False, lr=0.1):
    model = shard(mlp(), mp=mp, reshard=reshard)
    state = compress_gradients(model, compressor, error_feedback=error_feedback) if compressor is not None else None
    if qag:
        quantize_all_gather(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads = []
    for step in range(steps):
        for micro in range(accumulate):
            model.set_requires_gradient_sync(micro == accumulate - 1)
            x, y = local_batch(step * accumulate + micro, rank, world)
            loss_of(model, x, y).backward()
        grads.append(full_grads(model))
        opt.step()
        opt.zero_grad()
    return model, state, grads


# ---------------------------------------------------------------------------------------- Identity == plain
def _identity_matches_plain(rank, world, mp, reshard, accumulate):
    _, _, plain = _train(rank, world, 3, None, mp=mp, reshard=reshard, accumulate=accumulate)
    _, state, ours = _train(rank, world, 3, Identity(), mp=mp, reshard=reshard, accumulate=accumulate)
    diff = max(float((a - b).abs().max()) for ga, gb in zip(plain, ours) for a, b in zip(ga, gb))
    return diff, state.stats()["step"]


@pytest.mark.parametrize("world", [2, 3])
def test_identity_equals_plain_fsdp(world):
    for diff, steps in run_world(_identity_matches_plain, world, args=(None, True, 1)):
        assert diff <= 1e-6
        assert steps == 3


@pytest.mark.parametrize("case", ["no_reshard", "accumulate", "bf16_reduce"])
def test_identity_equals_plain_fsdp_composes(case):
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    mp = bf16 if case == "bf16_reduce" else None
    reshard = case != "no_reshard"
    accumulate = 3 if case == "accumulate" else 1
    for diff, steps in run_world(_identity_matches_plain, 2, args=(mp, reshard, accumulate)):
        # the bf16 reduce sums in float32 here and rounds once; gloo's sums in bf16: one bf16 ulp of |g| <= 1
        assert diff <= (2 ** -7 if case == "bf16_reduce" else 1e-6)
        assert steps == 3  # one reduce-scatter per optimizer step, also with 3 micro-batches


# ---------------------------------------------------------------------------------------- the recursion
def _direct_calls(rank, world, name, error_feedback, shapes):
    compressor = COMPRESSORS[name]
    state = GradientCompression(compressor, error_feedback=error_feedback, seed=5)
    chunk = sum(torch.Size(s).numel() for s in shapes)
    comm = CompressedReduceScatter(state, 0, "layer", shapes)
    state.comms.append(comm)
    outs = []
    for step in range(4):
        gen = torch.Generator().manual_seed(100 * step + rank)
        inp = torch.randn(world * chunk, generator=gen)
        out = torch.empty(chunk)
        comm(out, inp, dist.group.WORLD, dist.ReduceOp.AVG)
        outs.append(out)
    return outs, comm.residual


RECURSION_CASES = [(name, True) for name in COMPRESSORS] + [
    (name, ef) for name in ("qsgd4", "randomk", "powersgd") for ef in (False, "bf16")]


@pytest.mark.parametrize("name,error_feedback", RECURSION_CASES)
def test_reduce_scatter_follows_its_recursion(name, error_feedback):
    """Every rank's output equals the one-process simulation of all ranks (same seeds): the sum of
    the decoded rows, and with error feedback e' = v - D(C(v)), v = g + e."""
    world, shapes = 2, [(3, 4), (2,)]
    results = run_world(_direct_calls, world, args=(name, error_feedback, shapes))
    compressor = COMPRESSORS[name]
    state = GradientCompression(compressor, error_feedback=error_feedback, seed=5)
    chunk = 14
    segments = row_segments(chunk, shapes, isinstance(compressor, PowerSGD))
    probe = CompressedReduceScatter(state, 0, "layer", shapes)
    residual_dtype = state.residual_dtype
    residuals = [torch.zeros(world, chunk, dtype=residual_dtype) for _ in range(world)] if residual_dtype else None
    warm = [{} for _ in range(world)]
    for step in range(4):
        probe.step = step
        inputs = [torch.randn(world * chunk, generator=torch.Generator().manual_seed(100 * step + r)).view(world, -1)
                  for r in range(world)]
        expect = reference_reduce_scatter(inputs, compressor, segments,
                                          lambda i: probe.row_seeds(i, world, state.shared_seed), residuals,
                                          residual_dtype or torch.float32, warm_q=warm, shared=state.shared_seed)
        for r in range(world):
            assert torch.equal(results[r][0][step], expect[r]), (name, error_feedback, step, r)
    for r in range(world):
        if residuals is None:
            assert results[r][1] is None
        else:
            assert torch.equal(results[r][1], residuals[r])
    if name == "identity" and residuals is not None:
        assert all(float(e.abs().max()) == 0 for e in residuals)


def _train_loss(model, rank, world):
    with torch.no_grad():
        return sum(float(loss_of(model, *local_batch(step, rank, world))) for step in range(6)) / 6


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_every_compressor_trains_consistently(name):
    """3 ranks, error feedback: the loss goes down, every rank gathers the same parameters, and the
    bytes sent are the compressor's wire size."""
    def run(rank, world):
        start = _train_loss(shard(mlp()), rank, world)
        model, state, _ = _train(rank, world, 6, COMPRESSORS[name], error_feedback=True, lr=0.05)
        return all_ranks_equal(full_params(model)), _train_loss(model, rank, world), state.stats(), start

    for equal, loss, stats, start in run_world(run, 3):
        assert equal
        assert loss < start
        assert stats["step"] == 6 and stats["bytes_sent"] > 0
        if name not in ("identity", "powersgd"):
            assert stats["compression_ratio"] > 1.3, stats


# ---------------------------------------------------------------------------------------- edge cases
def _nonfinite(rank, world):
    model = shard(mlp())
    state = compress_gradients(model, RandomK(density=0.1), error_feedback=True)
    x, y = local_batch(0, rank, world)
    loss_of(model, x, y).backward()
    before = {c.name: c.residual.clone() for c in state.comms if c.residual is not None}
    model.zero_grad()
    x, y = local_batch(1, rank, world)
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("inf")
    loss_of(model, x, y).backward()
    finite = [bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters()]
    kept = torch.equal(before["0"], state.comms[1].residual)  # module "0": the first Linear
    return finite, kept, state.stats()["skipped_steps"]


def test_nonfinite_gradient_reaches_every_rank():
    """An inf in rank 1's input: random-k keeps 10% of the values, yet every shard of the weight of the
    first layer is non-finite on every rank (GradScaler's check sees it), and every rank, not only
    rank 1, leaves that layer's residual as it was (the verdict travels with the messages)."""
    for finite, kept, skipped in run_world(_nonfinite, 2):
        assert not finite[0]
        assert kept
        assert skipped == 1


def _residual_of_another_model(rank, world, path):
    model = shard(mlp())
    state = compress_gradients(model, Sign(), error_feedback=True)
    x, y = local_batch(0, rank, world)
    loss_of(model, x, y).backward()
    saved = gather_state_dict(state)
    first = saved[f"rank{rank}"]["buffers"]["residuals"]
    key = sorted(first)[0]
    first[key] = torch.zeros(first[key].shape[0], first[key].shape[1] + 8)  # another model's module
    fresh = compress_gradients(shard(mlp()), Sign(), error_feedback=True)
    try:
        fresh.load_state_dict(saved)
    except ValueError as err:
        return str(err)
    return None


def test_a_residual_of_another_shape_is_refused():
    """It used to be re-zeroed silently at the first step."""
    for message in run_world(_residual_of_another_model, 2, args=("",)):
        assert message is not None and "has shape" in message


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="error_feedback"):
        GradientCompression(Identity(), error_feedback="int3")
    with pytest.raises(ValueError, match="compressor"):
        GradientCompression("qsgd")
    with pytest.raises(ValueError, match="seed"):
        GradientCompression(Identity(), seed=-1)
    with pytest.raises(ValueError, match="FSDPModule"):
        compress_gradients(torch.nn.Linear(2, 2), Identity())
    with pytest.raises(ValueError, match="block_size"):
        QuantizedAllGather(0)
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantizedAllGather(12)  # used to crash at the first gather


def _divide_factor(rank, world, force_sum):
    model = shard(mlp())
    compress_gradients(model, Identity())
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(4.0)
            if force_sum:
                m.set_force_sum_reduction_for_comms(True)
    x, y = local_batch(0, rank, world)
    try:
        loss_of(model, x, y).backward()
    except ValueError as err:
        return str(err)
    reference = shard(mlp())
    loss_of(reference, x, y).backward()
    return max(float((full(p.grad) - full(q.grad) * world / 4).abs().max())
               for p, q in zip(model.parameters(), reference.parameters()))


def full(t):
    return t.full_tensor()


def test_gradient_divide_factor():
    """A divide factor f != W: with force-sum FSDP sums and divides by f itself (grads are W/f of the
    mean); without it FSDP asks for PREMUL_SUM, which is refused with the way out."""
    for diff in run_world(_divide_factor, 2, args=(True,)):
        assert diff <= 1e-6
    for message in run_world(_divide_factor, 2, args=(False,)):
        assert "set_force_sum_reduction_for_comms" in message


# ---------------------------------------------------------------------------------------- checkpoints
def _ckpt_run(rank, world, path, phase, mode):
    torch.manual_seed(0)
    model = shard(mlp())
    state = compress_gradients(model, QSGD(bits=4, bucket_size=16), error_feedback=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    if phase == "resume":
        if mode == "dcp":
            import torch.distributed.checkpoint as dcp

            holder = {"model": model.state_dict(), "comm": HookStateful(state)}
            dcp.load(holder, checkpoint_id=path)
            model.load_state_dict(holder["model"])
        else:
            sd = torch.load(os.path.join(path, "model.pt"), weights_only=False)
            for p, v in zip(model.parameters(), sd):
                p.data.to_local().copy_(v[rank])
            state.load_state_dict(torch.load(os.path.join(path, "comm.pt"), weights_only=True))
        start = 4
    for step in range(start, 7):
        x, y = local_batch(step, rank, world)
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        if step == 3 and phase == "full":
            if mode == "dcp":
                import torch.distributed.checkpoint as dcp

                dcp.save({"model": model.state_dict(), "comm": HookStateful(state)}, checkpoint_id=path)
            else:
                locals_ = [p.data.to_local().clone() for p in model.parameters()]
                gathered = [[None] * world for _ in locals_]
                for g, t in zip(gathered, locals_):
                    dist.all_gather_object(g, t)
                merged = gather_state_dict(state)
                if rank == 0:
                    torch.save(gathered, os.path.join(path, "model.pt"))
                    torch.save(merged, os.path.join(path, "comm.pt"))
                dist.barrier()
    return [p.data.to_local().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["dcp", "rank0_file"])
def test_resume_is_bit_identical(tmp_path, mode):
    """Error-feedback residuals saved at step 4 and loaded in fresh processes: steps 5-7 equal the
    uninterrupted run bit for bit (DCP with HookStateful, or rank 0 writing one gathered file)."""
    path = str(tmp_path)
    full_run = run_world(_ckpt_run, 2, args=(path, "full", mode))
    resumed = run_world(_ckpt_run, 2, args=(path, "resume", mode))
    for a, b in zip(full_run, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _own_file_everywhere(rank, world, path):
    model = shard(mlp())
    state = compress_gradients(model, Sign(), error_feedback=True)
    x, y = local_batch(0, rank, world)
    loss_of(model, x, y).backward()
    if rank == 0:
        torch.save(state.state_dict(), os.path.join(path, "rank0.pt"))
    dist.barrier()
    loaded = torch.load(os.path.join(path, "rank0.pt"), weights_only=True)
    try:
        state.load_state_dict(loaded)
        first = "loaded"
    except ValueError as err:
        first = str(err)
    state.load_state_dict(loaded, on_mismatch="reset")
    return first, all(c.residual is None for c in state.comms)


def test_rank0_state_loaded_everywhere_is_refused(tmp_path):
    """Rank 0 saves its own state and every rank loads it: both ranks refuse (rank 1 names the rank
    mismatch); with on_mismatch='reset' every rank drops its residuals."""
    results = run_world(_own_file_everywhere, 2, args=(str(tmp_path),))
    assert "loaded on rank 1" in results[1][0]
    assert "another rank" in results[0][0] or "loaded on rank" in results[0][0]
    assert all(dropped for _, dropped in results)


# ---------------------------------------------------------------------------------------- all-gather
def test_int8_block_quantization_error_bound():
    x = torch.randn(1000) * torch.linspace(0.01, 10, 1000)
    codes, scales = quantize_int8_blocks(x, 64)
    back = dequantize_int8_blocks(codes, scales, 1000, 64)
    bound = torch.repeat_interleave(scales, 64)[:1000] / 2
    assert bool(((back - x).abs() <= bound * (1 + 1e-6) + 1e-12).all())
    assert torch.equal(dequantize_int8_blocks(*quantize_int8_blocks(torch.zeros(10), 8), 10, 8), torch.zeros(10))


def _quantized_gather(rank, world):
    model, _, grads = _train(rank, world, 3, QSGD(bits=8, bucket_size=16), qag=True)
    reference, _, ref_grads = _train(rank, world, 3, None)
    weights = [p.full_tensor() for p in model.parameters()]
    return all_ranks_equal(weights), max(float((a - b).abs().max()) for a, b in zip(grads[0], ref_grads[0]))


def test_quantized_all_gather_trains_close_to_plain():
    """int8 weights on the wire: every rank computes with the same weights; the first step's gradient
    is within the int8 rounding of the plain one."""
    for equal, diff in run_world(_quantized_gather, 3):
        assert equal
        assert diff < 0.02
