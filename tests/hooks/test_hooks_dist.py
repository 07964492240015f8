"""Every hook on gloo worlds of 2 and 3: identical ranks, exact equivalences, resume, non-finite steps."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import run_world

from commlib import compress, hooks

from .ddp_harness import Net, batch, build, flat_params, sgd_steps, train

SMALL_BUCKETS = {"bucket_cap_mb": 0.004}  # ~1000 floats: the test net spans several buckets

HOOKS = [
    ("allreduce", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("ef", {"compressor": ("TopK", {"density": 0.1})}),
    ("ef", {"compressor": ("TopK", {"density": 0.1, "exact": False})}),
    ("ef", {"compressor": ("RandomK", {"density": 0.2, "seed": 3})}),
    ("ef", {"compressor": ("QSGD", {"bits": 4, "bucket_size": 64})}),
    ("ef", {"compressor": ("Sign", {}), "collective": "two_phase"}),
    ("ef", {"compressor": ("QSGD", {"bits": 2, "bucket_size": 64}), "collective": "two_phase"}),
    ("ef", {"compressor": ("Cast", {"dtype": torch.bfloat16})}),
    ("powersgd", {"rank": 2}),
    ("powersgd", {"rank": 4, "batch_tensors_with_same_shape": True}),
    ("powersgd", {"rank": 2, "one_round_per_step": False}),
    ("lgreco", {"family": "powersgd", "rank": 2, "retune_every": 4, "accumulate_steps": 2}),
    ("lgreco", {"family": "topk", "density": 0.05, "retune_every": 4, "accumulate_steps": 2}),
    ("lgreco", {"family": "qsgd", "bits": 4, "bucket_size": 64, "retune_every": 4, "accumulate_steps": 2}),
    ("ef21", {"compressor": ("TopK", {"density": 0.1})}),
    ("ef21", {"compressor": ("RandomK", {"density": 0.2, "seed": 3})}),
    ("ef21", {"compressor": ("Sign", {}), "collective": "two_phase"}),
    ("ef21w", {"compressor": ("Cast", {"dtype": torch.float16}), "collective": "allgather", "estimate_every": 4}),
    ("ef21w", {"compressor": ("QSGD", {"bits": 8, "bucket_size": 64}), "estimate_every": 3}),
]
HOOK_IDS = [f"{h}-{o.get('compressor', ('',))[0]}{o.get('collective', '')}{o.get('family', '')}{o.get('rank', '')}"
            for h, o in HOOKS]

VARIANTS = {
    "w2-view": (2, dict(SMALL_BUCKETS, gradient_as_bucket_view=True), torch.float32),
    "w3-static": (3, dict(SMALL_BUCKETS, static_graph=True), torch.float32),
    "w2-bf16": (2, dict(SMALL_BUCKETS), torch.bfloat16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("hook,options", HOOKS, ids=HOOK_IDS)
def test_fifty_steps_keep_ranks_bit_identical(hook, options, variant):
    world, ddp_kwargs, dtype = VARIANTS[variant]
    out = run_world(train, world, kwargs=dict(hook=hook, options=options, steps=50, ddp_kwargs=ddp_kwargs,
                                              dtype=dtype))
    for other in out[1:]:
        assert torch.equal(out[0]["params"], other["params"])
    assert torch.isfinite(out[0]["params"]).all()
    stats = out[0]["stats"]
    assert stats["step"] == 50 and stats["bytes_dense"] > 0
    if hook != "allreduce" and dtype == torch.float32:
        assert stats["compression_ratio"] > 1.0
    assert stats["compression_ratio"] >= 1.0


@pytest.mark.parametrize("world", [2, 3])
def test_allreduce_hook_equals_ddp_without_hook(world):
    plain = run_world(train, world, kwargs=dict(steps=10, ddp_kwargs=SMALL_BUCKETS))
    hooked = run_world(train, world, kwargs=dict(hook="allreduce", steps=10, ddp_kwargs=SMALL_BUCKETS))
    assert torch.equal(plain[0]["params"], hooked[0]["params"])


def test_ef_with_identity_equals_ddp_without_hook():
    plain = run_world(train, 2, kwargs=dict(steps=10, ddp_kwargs=SMALL_BUCKETS))
    hooked = run_world(train, 2, kwargs=dict(hook="ef", options={"compressor": ("Identity", {})}, steps=10,
                                             ddp_kwargs=SMALL_BUCKETS))
    assert torch.equal(plain[0]["params"], hooked[0]["params"])


# ------------------------------------------------------------------------------------------------
def _record_ef(rank, world_size, steps):
    """Run the ef hook on TopK and record, per step, each parameter's local input and the output."""
    model = Net()
    state, _ = hooks.make("ef", compressor=compress.TopK(density=0.05), model=model)
    records = []

    def recording_hook(st, bucket):
        views = st.param_views(bucket)
        inputs = {v.key: v.grad.clone() for v in views}
        step = st.step
        fut = hooks.commlib_hook(st, bucket)

        def after(f):
            records.append((step, inputs, {v.key: v.grad.clone() for v in views}))
            return f.value()

        return fut.then(after)

    ddp = torch.nn.parallel.DistributedDataParallel(model, **SMALL_BUCKETS)
    ddp.register_comm_hook(state, recording_hook)
    sgd_steps(ddp, model, rank, steps)
    dist.barrier()
    return {"records": records, "residuals": {k: v.clone() for k, v in state.residuals.items()},
            "start_iter": state.start_iter}


def test_ef_matches_single_process_reference_of_the_equations():
    out = run_world(_record_ef, 2, kwargs=dict(steps=8))
    compressor = compress.TopK(density=0.05)
    residuals = [dict(), dict()]
    start = out[0]["start_iter"]
    n_checked = 0
    for (step, in0, out0), (step1, in1, out1) in zip(out[0]["records"], out[1]["records"]):
        assert step == step1
        for key in in0:
            if step < start or in0[key].dim() < 2 or not compressor.shrinks(in0[key].shape):
                continue
            payloads = []
            for r, grad in enumerate((in0[key], in1[key])):
                v = grad + residuals[r][key] if key in residuals[r] else grad.clone()
                p = compressor.compress(v)
                residuals[r][key] = v - compressor.decompress(p)
                payloads.append(p)
            mean = torch.zeros(grad.shape)
            for p in payloads:
                compressor.decompress_add_(mean, p)
            mean /= 2
            assert torch.equal(out0[key], mean) and torch.equal(out1[key], mean)
            n_checked += 1
    assert n_checked >= 4 * (8 - start)
    for r in range(2):
        assert residuals[r].keys() == out[r]["residuals"].keys()
        for key, value in residuals[r].items():
            assert torch.equal(out[r]["residuals"][key], value)


# ------------------------------------------------------------------------------------------------
def _torch_vs_commlib_powersgd(rank, world_size, steps, rank_r):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    one_bucket = {"bucket_cap_mb": 25}
    results = {}
    for impl in ("torch", "commlib"):
        model = Net()
        ddp = torch.nn.parallel.DistributedDataParallel(model, **one_bucket)
        if impl == "torch":
            state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=rank_r, start_powerSGD_iter=2,
                                     random_seed=0)
            ddp.register_comm_hook(state, ps.powerSGD_hook)
        else:
            state, hook = hooks.make("powersgd", rank=rank_r, start_iter=2, model=model)
            torch_seed = np.random.RandomState(0).randint(1_000_000_000)

            def aligned_hook(st, bucket):
                # give commlib the same initial Q as PyTorch's hook draws (its RNG, its order)
                if st.step == st.start_iter and not st.q_memory:
                    views = [v for v in st.param_views(bucket) if st.compressible(v)]
                    order = {}
                    for v in views:
                        order.setdefault(v.grad.view(v.grad.shape[0], -1).shape, []).append(v)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(torch_seed)
                        for group in order.values():
                            for v in group:
                                cols = v.grad.view(v.grad.shape[0], -1).shape[1]
                                st.q_memory[v.key] = torch.randn(1, cols, st.layer_rank(v))[0]
                return hooks.commlib_hook(st, bucket)

            ddp.register_comm_hook(state, aligned_hook)
        sgd_steps(ddp, model, rank, steps)
        results[impl] = flat_params(model)
    return results


@pytest.mark.parametrize("rank_r", [1, 4])
def test_powersgd_matches_pytorch_hook_on_one_bucket(rank_r):
    out = run_world(_torch_vs_commlib_powersgd, 2, kwargs=dict(steps=12, rank_r=rank_r))
    for r in out:
        torch.testing.assert_close(r["commlib"], r["torch"], rtol=1e-5, atol=1e-6)
    # and the compressed steps really differ from plain averaging
    plain = run_world(train, 2, kwargs=dict(steps=12, ddp_kwargs={"bucket_cap_mb": 25}))
    assert not torch.allclose(plain[0]["params"], out[0]["commlib"], rtol=1e-4, atol=1e-5)


def test_powersgd_one_round_per_step_equals_per_bucket_rounds():
    """Holding the buckets for one P and one Q round per step changes when, not what, is reduced."""
    runs = {}
    for flag in (True, False):
        options = {"rank": 2, "one_round_per_step": flag}
        runs[flag] = run_world(train, 2, kwargs=dict(hook="powersgd", options=options, steps=15,
                                                     ddp_kwargs=SMALL_BUCKETS))
    assert torch.equal(runs[True][0]["params"], runs[False][0]["params"])
    assert torch.equal(runs[True][0]["params"], runs[True][1]["params"])
    assert runs[True][0]["stats"]["total_bytes_sent"] == runs[False][0]["stats"]["total_bytes_sent"]


# ------------------------------------------------------------------------------------------------
RESUMABLE = HOOKS[:1] + HOOKS[3:4] + HOOKS[5:8] + HOOKS[10:]


@pytest.mark.parametrize("hook,options", RESUMABLE, ids=[HOOK_IDS[HOOKS.index(h)] for h in RESUMABLE])
def test_checkpoint_resume_is_bit_identical(hook, options):
    k = 6
    full = run_world(train, 2, kwargs=dict(hook=hook, options=options, steps=2 * k, ddp_kwargs=SMALL_BUCKETS,
                                           save_at=k))
    checkpoints = [full[0]["checkpoint"], full[1]["checkpoint"]]
    resumed = run_world(_resume_rank, 2, kwargs=dict(hook=hook, options=options, k=k, checkpoints=checkpoints))
    for r in range(2):
        assert torch.equal(resumed[r]["params"], full[r]["params"])


def _resume_rank(rank, world_size, hook, options, k, checkpoints):
    return train(rank, world_size, hook=hook, options=options, steps=k, ddp_kwargs=SMALL_BUCKETS, start_step=k,
                 checkpoint=checkpoints[rank])


# ------------------------------------------------------------------------------------------------
NONFINITE = [HOOKS[0], HOOKS[1], HOOKS[3], HOOKS[5], HOOKS[6], HOOKS[7], HOOKS[10], HOOKS[12], *HOOKS[15:]]


@pytest.mark.parametrize("hook,options", NONFINITE, ids=[HOOK_IDS[HOOKS.index(h)] for h in NONFINITE])
def test_inf_on_one_rank_reaches_every_rank_and_spares_the_buffers(hook, options):
    inf_at = 5
    out = run_world(train, 3, kwargs=dict(hook=hook, options=options, steps=9, ddp_kwargs=SMALL_BUCKETS,
                                          inf_at=inf_at, snapshots=(inf_at - 1, inf_at)))
    for r in out:
        assert r["finite"] == [s != inf_at for s in range(9)]  # every rank saw the overflow, only then
        assert torch.isfinite(r["params"]).all()
        before, after = r["buffers"].get(inf_at - 1, {}), r["buffers"].get(inf_at, {})
        assert before.keys() == after.keys()
        for kind in before:
            assert before[kind].keys() == after[kind].keys()
            for key in before[kind]:
                assert torch.equal(before[kind][key], after[kind][key]), (kind, key)
    assert torch.equal(out[0]["params"], out[1]["params"]) and torch.equal(out[0]["params"], out[2]["params"])
    if hook != "allreduce" and hook != "fp16":
        assert out[0]["stats"]["skipped_steps"] == 1


# ------------------------------------------------------------------------------------------------
def _uneven(rank, world_size, hook, options):
    model, ddp, state = build(hook, options, SMALL_BUCKETS)
    with ddp.join():
        sgd_steps(ddp, model, rank, 8 + 3 * rank)  # rank r runs 3 r more batches
    return flat_params(model)


@pytest.mark.parametrize("hook,options", [HOOKS[3], HOOKS[7], HOOKS[10], HOOKS[13]],
                         ids=["ef-topk", "ef-two-phase", "psgd", "lgreco-topk"])
def test_join_with_uneven_inputs(hook, options):
    out = run_world(_uneven, 3, kwargs=dict(hook=hook, options=options))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


# ------------------------------------------------------------------------------------------------
def _lgreco_plans(rank, world_size, family):
    opts = {"powersgd": {"rank": 2}, "topk": {"density": 0.05}, "qsgd": {"bits": 4, "bucket_size": 64}}[family]
    model, ddp, state = build("lgreco", dict(opts, family=family, retune_every=5, accumulate_steps=3), SMALL_BUCKETS)
    ranks_seen = []

    def record_ranks(step):
        if family == "powersgd":
            ranks_seen.append({k: q.shape[1] for k, q in state.q_memory.items()})

    sgd_steps(ddp, model, rank, 17, after_step=record_ranks)
    return {"stats": state.stats(), "history": state.history, "ranks_seen": ranks_seen,
            "residual_keys": sorted(state.residuals)}


@pytest.mark.parametrize("family", ["powersgd", "topk", "qsgd"])
def test_lgreco_same_plan_on_every_rank_and_within_budget(family):
    out = run_world(_lgreco_plans, 3, kwargs=dict(family=family))
    history = out[0]["history"]
    assert [h["step"] for h in history] == [2, 7, 12, 17][: len(history)] and len(history) >= 3
    def without_timing(hist):
        return [{k: v for k, v in h.items() if k != "solve_seconds"} for h in hist]

    for other in out[1:]:  # identical plans, budgets and errors everywhere
        assert without_timing(other["history"]) == without_timing(history)
    for h in history:
        assert h["error_planned"] <= h["error_budget"] * (1 + 1e-9)
        assert h["bytes_planned"] <= h["bytes_uniform"]
        assert h["solve_seconds"] >= 0
    plan = out[0]["stats"]["lgreco"]["plan"]
    assert set(plan) == {"inp.weight", "mid1.weight", "mid2.weight", "out.weight"}
    if family == "powersgd":
        # the warm-start Q follows the plan's ranks after each retune, and stays allocated
        last = out[0]["ranks_seen"][-1]
        for key, r in plan.items():
            if key in last:
                assert last[key] == min(r, 6)
    assert out[0]["residual_keys"]  # error feedback survived the retunes


def _lgreco_tensorboard(rank, world_size, logdir):
    from torch.utils.tensorboard import SummaryWriter

    model, ddp, state = build("lgreco", {"family": "powersgd", "rank": 2, "retune_every": 4, "accumulate_steps": 2},
                              SMALL_BUCKETS)
    writer = SummaryWriter(logdir) if rank == 0 else None

    def log(step):
        if writer is not None:
            state.log_to(writer, step)

    sgd_steps(ddp, model, rank, 9, after_step=log)
    if writer is not None:
        writer.close()
    return state.stats()["lgreco"]["plan"]


def test_lgreco_plan_reaches_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install -e .[test])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plan = run_world(_lgreco_tensorboard, 2, kwargs=dict(logdir=str(tmp_path)))[0]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"lgreco/{k}" for k in plan} | {"lgreco/bytes_ratio_vs_uniform"} <= tags
    for key, value in plan.items():
        last = events.Scalars(f"lgreco/{key}")[-1]
        assert last.step == 8 and last.value == float(value)
    assert events.Scalars("lgreco/bytes_ratio_vs_uniform")[-1].value >= 1.0


# ------------------------------------------------------------------------------------------------ rule 7
def _lgreco_scaler_overflow(rank, world_size, family):
    """A GradScaler whose step 1 overflows in one layer on the last rank only, inside L-GreCo's
    statistics window (retune at step 2 from step 1's gradients, then every 4 steps)."""
    opts = {"powersgd": {"rank": 2}, "topk": {"density": 0.05}, "qsgd": {"bits": 4, "bucket_size": 64}}[family]
    model, ddp, state = build("lgreco", dict(opts, family=family, retune_every=4, accumulate_steps=1), SMALL_BUCKETS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    blown = []
    if rank == world_size - 1:
        model.mid1.weight.register_hook(lambda g: g * float("inf") if blown[-1] == 1 else g)
    skipped = []
    for step in range(8):
        blown.append(step)
        x, y = batch(rank, step)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(ddp(x), y)).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
    return flat_params(model), skipped, state.stats()["lgreco"], state.history


@pytest.mark.parametrize("family", ["topk", "powersgd", "qsgd"])
def test_lgreco_overflow_on_one_rank_trains_on_with_identical_ranks(family):
    """Each rank used to sum only its own finite layers, so the retune's all-reduce differed in
    length ("Received data size doesn't match expected size" on gloo). Now the layer is left out on
    every rank by an all-reduced flag, the GradScaler still sees the overflow (step 1 skipped on
    every rank), and training goes on with identical ranks and one plan."""
    out = run_world(_lgreco_scaler_overflow, 3, kwargs=dict(family=family))
    for params, skipped, stats, history in out:
        assert skipped == [step == 1 for step in range(8)]
        assert torch.isfinite(params).all()
        assert torch.equal(params, out[0][0])
        assert stats["plan"] == out[0][2]["plan"]
        first = history[0]
        assert first["step"] == 2 and "mid1.weight" not in first["choices"]  # dropped from the step-2 retune
        assert "mid1.weight" in history[1]["choices"]  # and back in the next one
