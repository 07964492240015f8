"""DiLoCo / Streaming DiLoCo (commlib.localsgd) on gloo worlds of 2 to 3 (fork, timeouts)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import compress, hooks
from commlib.comm.rank_state import stable_hash
from commlib.compress.base import derive_seed
from commlib.localsgd import DiLoCo, fragment_offset, fragments_due
from tests.conftest import run_world


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def small(seed=0):
    torch.manual_seed(seed)
    return Small()


def data(rank: int, step: int):
    gen = torch.Generator().manual_seed(97 * step + rank)
    return torch.randn(5, 6, generator=gen), torch.randn(5, 4, generator=gen)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------- anchor 1: DiLoCo(H=1) == DDP
def _ddp_vs_diloco(rank, world):
    ddp_model = small()
    ddp = DDP(ddp_model)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    model = small()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = DiLoCo(model, inner, sync_every=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    for step in range(6):
        x, y = data(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        inner.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        inner.step()
        outer.step()
    outer.close()
    return flat(ddp_model), flat(model)


def test_sync_every_step_with_outer_sgd_lr_1_is_ddp():
    """theta_synced - (theta_synced - lr g_i) averaged is lr mean g: the DDP step (Alg. 1 with H = 1)."""
    for ddp_params, diloco_params in run_world(_ddp_vs_diloco, 3):
        assert float((ddp_params - diloco_params).abs().max()) <= 1e-6


# ---------------------------------------------------------------------- anchor 2: Identity == simulation
def _trained(rank, world, options, steps):
    model = small()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = DiLoCo(model, inner, **options)
    after_sync = []
    for step in range(steps):
        x, y = data(rank, step)
        inner.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        inner.step()
        if outer.step():
            after_sync.append(flat(model))
    stats = outer.stats()
    outer.close()
    return flat(model), after_sync, stats


def simulate_adamw(world, options, steps):
    """DiLoCo in one process: a model and an AdamW per replica, the mean of the outer gradients,
    the outer SGD with Nesterov momentum on the synced copy, every replica restarted from it."""
    replicas = [small() for _ in range(world)]
    inners = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in replicas]
    synced = [p.detach().clone() for p in replicas[0].parameters()]
    outer = torch.optim.SGD(synced, lr=options["outer_lr"], momentum=options["outer_momentum"], nesterov=True)
    for step in range(steps):
        for r, (m, opt) in enumerate(zip(replicas, inners)):
            x, y = data(r, step)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        if (step + 1) % options["sync_every"] == 0:
            for i, s in enumerate(synced):
                s.grad = sum(s - list(m.parameters())[i].detach() for m in replicas) / world
            outer.step()
            with torch.no_grad():
                for m in replicas:
                    for p, s in zip(m.parameters(), synced):
                        p.copy_(s)
    return [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in replicas]


def test_identity_equals_a_one_process_simulation_and_ranks_agree_after_every_sync():
    options = {"sync_every": 3, "outer_lr": 0.7, "outer_momentum": 0.9, "compressor": compress.Identity()}
    out = run_world(_trained, 3, args=(options, 10))
    want = simulate_adamw(3, options, 10)
    for (params, after_sync, stats), replica in zip(out, want):
        assert len(after_sync) == 3 and stats["syncs"] == 3 and stats["skipped_syncs"] == 0
        for a, b in zip(after_sync, out[0][1]):
            assert torch.equal(a, b)  # identical replicas after every sync
        assert float((params - replica).abs().max() / replica.abs().max()) <= 1e-6
    assert not torch.equal(out[0][0], out[1][0])  # one inner step after the last sync: replicas differ


# ---------------------------------------------------------------------- the compressed recursion, bit for bit
def inner_update(rank, step, index, shape):
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + index)
    return 0.05 * torch.randn(shape, generator=gen)


def _manual(rank, world, options, steps, poison=None):
    """Replicas whose inner step is a fixed update per (rank, step): the outer loop alone is tested."""
    model = small()
    outer = DiLoCo(model, None, **options)
    params, residuals, history = [], [], []
    for step in range(steps):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.sub_(inner_update(rank, step, i, p.shape))
            if poison is not None and (rank, step) == poison:
                next(model.parameters())[0, 0] = float("inf")
        before = {k: v.clone() for k, v in outer.residuals.items()}
        if outer.step():
            history.append(step + 1)
        params.append(flat(model))
        residuals.append((before, {k: v.clone() for k, v in outer.residuals.items()}))
    stats = outer.stats()
    outer.close()
    return params, residuals, stats, outer.history


def simulate_manual(world, options, steps):
    """The outer loop in one process: deltas, v = delta + e, C(v), mean in rank order, e <- v - C(v),
    outer SGD, restart (late merges mixed), in the order and float operations of the recursion."""
    c, ef = options.get("compressor"), options.get("error_feedback", True)
    H, k = options["sync_every"], options.get("fragments", 1)
    tau, mix = options.get("delay", 0), options.get("mix", 0.0)
    base = small()
    keys = [n for n, _ in base.named_parameters()]
    local = [[p.detach().clone() for p in base.parameters()] for _ in range(world)]
    synced = [p.detach().clone() for p in base.parameters()]
    outer = torch.optim.SGD(synced, lr=options.get("outer_lr", 0.7), momentum=options.get("outer_momentum", 0.9),
                            nesterov=options.get("nesterov", True))
    residuals = [{} for _ in range(world)]
    in_flight, index, out = {}, 0, []

    def merge(frag, means):
        idx = [i for i in range(len(keys)) if i % k == frag]
        for i, m in zip(idx, means):
            synced[i].grad = m
        outer.step()
        for i in idx:
            synced[i].grad = None
            for r in range(world):
                if tau > 0 and mix > 0:
                    local[r][i].copy_(local[r][i].mul(mix).add_(synced[i], alpha=1 - mix))
                else:
                    local[r][i].copy_(synced[i])

    for step in range(steps):
        t = step + 1
        for r in range(world):
            for i, p in enumerate(local[r]):
                p.sub_(inner_update(r, step, i, p.shape))
        for frag in sorted(f for f, (due, _) in in_flight.items() if due <= t):
            merge(frag, in_flight.pop(frag)[1])
        for frag in fragments_due(t, k, H):
            idx = [i for i in range(len(keys)) if i % k == frag]
            means = []
            for i in idx:
                seed = derive_seed(0, index, stable_hash(keys[i]))
                payloads = []
                for r in range(world):
                    v = synced[i] - local[r][i]
                    if ef and keys[i] in residuals[r]:
                        v = v + residuals[r][keys[i]]
                    p = c.compress(v, seed=seed)
                    if ef:
                        residuals[r][keys[i]] = v - c.decompress(p)
                    payloads.append(p)
                mean = torch.zeros(synced[i].shape)
                for p in payloads:
                    c.decompress_add_(mean, p)
                means.append(mean / world)
            index += 1
            if tau == 0:
                merge(frag, means)
            else:
                in_flight[frag] = (t + tau, means)
        out.append(torch.cat([p.reshape(-1) for p in local[0]]))
    return out


RECURSION_CASES = [
    ("topk", {"compressor": compress.TopK(0.3)}),
    ("sign", {"compressor": compress.Sign()}),
    ("qsgd", {"compressor": compress.QSGD(bits=4, bucket_size=16)}),
    ("randomk-allreduce", {"compressor": compress.RandomK(0.5, seed=5)}),
    ("topk-fragments-delay", {"compressor": compress.TopK(0.3), "fragments": 2, "delay": 1}),
    ("qsgd-fragments-delay-mix", {"compressor": compress.QSGD(bits=2, bucket_size=16), "fragments": 2, "delay": 1,
                                  "mix": 0.5}),
]


@pytest.mark.parametrize("label,extra", RECURSION_CASES, ids=[c[0] for c in RECURSION_CASES])
def test_compressed_outer_gradients_follow_the_error_feedback_recursion(label, extra):
    options = {"sync_every": 4, "outer_lr": 0.7, "outer_momentum": 0.9, **extra}
    out = run_world(_manual, 2, args=(options, 13))
    want = simulate_manual(2, options, 13)
    for rank, (params, _, stats, _) in enumerate(out):
        assert stats["total_bytes_dense"] > 1.5 * stats["total_bytes_sent"] and stats["skipped_syncs"] == 0
        for step, (got, expected) in enumerate(zip(params, want)):
            if rank == 0:
                assert torch.equal(got, expected), (label, step, float((got - expected).abs().max()))


def _two_phase(rank, world):
    model = small()
    outer = DiLoCo(model, None, sync_every=3, compressor=compress.Sign(), collective="two_phase")
    after = []
    for step in range(9):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.sub_(inner_update(rank, step, i, p.shape))
        if outer.step():
            after.append(flat(model))
    stats = outer.stats()
    outer.close()
    return after, stats


def test_two_phase_outer_gradients_keep_replicas_identical_and_memory_is_booked():
    """Sign through the two-phase exchange (server-side error feedback on each chunk): every replica
    restarts from the same parameters; the books count 2 fp32 copies (synced, momentum) + residuals."""
    out = run_world(_two_phase, 3)
    numel_bytes = 4 * sum(p.numel() for p in small().parameters())
    for after, stats in out:
        assert len(after) == 3 and all(torch.equal(a, b) for a, b in zip(after, out[0][0]))
        assert stats["compression_ratio"] > 10
        mem = stats["memory_bytes"]
        assert mem["synced"] == mem["outer_state"] == mem["parameters"] == numel_bytes
        assert mem["residuals"] >= numel_bytes  # worker residuals, plus the server errors of its chunks


def test_fragments_sync_on_schedule_and_only_their_parameters_move():
    """k = 3 fragments of a 4-parameter model, H = 6: fragment f at steps (f + 1) H / k + n H."""
    assert [fragment_offset(f, 3, 6) for f in range(3)] == [2, 4, 0]
    options = {"sync_every": 6, "fragments": 3, "compressor": compress.TopK(0.5)}
    (p0, _, stats, history), (p1, _, _, _) = run_world(_manual, 2, args=(options, 13))
    assert history == [(2, 0), (4, 1), (6, 2), (8, 0), (10, 1), (12, 2)]
    sizes = [p.numel() for p in small().parameters()]
    for step in (1, 3, 5):  # right after fragment (step - 1) / 2's sync: its parameters agree across ranks
        frag = (step - 1) // 2
        for i, (a, b) in enumerate(zip(p0[step].split(sizes), p1[step].split(sizes))):
            assert torch.equal(a, b) == (i % 3 == frag), (step, i)
    # at scale: a planner call for 256 fragments of H = 4096 is immediate and each step syncs at most one
    due = [len(fragments_due(t, 256, 4096)) for t in range(1, 4097)]
    assert sum(due) == 256 and max(due) == 1


def test_a_non_finite_outer_gradient_skips_the_sync_everywhere_and_keeps_the_residuals():
    options = {"sync_every": 3, "compressor": compress.TopK(0.3)}
    out = run_world(_manual, 2, args=(options, 7, (1, 4)))  # rank 1 overflows before the sync of step 6
    for params, residuals, stats, _ in out:
        assert stats["skipped_syncs"] == 1 and stats["syncs"] == 2
        before, after = residuals[5]
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.isfinite(params[5]).all()  # every replica restarted from theta_synced
    assert torch.equal(out[0][0][5], out[1][0][5])


# ---------------------------------------------------------------------- checkpoints
def _resume(rank, world, path, phase, options):
    model = small()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = DiLoCo(model, inner, **options)
    start = 0
    if phase != "full":
        blob = torch.load(path, weights_only=True)
        try:
            outer.load_state_dict(blob["outer"] if phase == "resume" else blob["outer_rank0_only"])
        except ValueError as exc:
            outer.close()
            return str(exc)
        if phase != "resume":  # loaded where it should have been refused: report, do not train alone
            outer.close()
            return "loaded"
        model.load_state_dict(blob["models"][rank])
        inner.load_state_dict(blob["inners"][rank])
        start = 6
    for step in range(start, 14):
        x, y = data(rank, step)
        inner.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        inner.step()
        outer.step()
        if phase == "full" and step == 5:  # fragment 0's sync started at inner step 6 is in flight
            gathered = hooks.gather_state_dict(outer)
            inners, models = [None] * world, [None] * world
            dist.all_gather_object(inners, inner.state_dict())
            dist.all_gather_object(models, model.state_dict())
            if rank == 0:
                torch.save({"models": models, "inners": inners, "outer": gathered,
                            "outer_rank0_only": outer.state_dict()}, path)
            dist.barrier()
    outer.close()
    return flat(model)


def test_resume_is_bit_identical_and_wrong_loads_are_refused(tmp_path):
    """Rank 0 saves one file (every replica's model and inner optimizer, the gathered DiLoCo state
    with a sync in flight), every rank loads it: the resumed run equals the uninterrupted one bit
    for bit. A file without rank 1's part, another world size or other options are refused."""
    options = {"sync_every": 4, "fragments": 2, "delay": 1, "compressor": compress.QSGD(bits=4, bucket_size=16)}
    path = str(tmp_path / "ckpt.pt")
    full = run_world(_resume, 2, args=(path, "full", options))
    resumed = run_world(_resume, 2, args=(path, "resume", options))
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    blob = torch.load(path, weights_only=True)
    assert blob["outer"]["pending"] and blob["outer"]["rank1"]["residuals"]  # the sync in flight was saved
    wrong_rank = run_world(_resume, 2, args=(path, "rank0", options))
    assert wrong_rank[0] == "loaded" and "no part for rank 1" in wrong_rank[1]
    wrong_world = run_world(_resume, 3, args=(path, "resume", options))
    assert all(isinstance(m, str) and "world size 2" in m for m in wrong_world)
    other = run_world(_resume, 2, args=(path, "resume", {**options, "sync_every": 6}))
    assert all(isinstance(m, str) and "sync_every" in m for m in other)


def test_bad_arguments_are_refused_at_construction():
    m = small()
    for kwargs, match in [({"sync_every": 0}, "sync_every"), ({"fragments": 0}, "fragments"),
                          ({"sync_every": 4, "fragments": 5}, "fragments"), ({"delay": -1}, "delay"),
                          ({"sync_every": 4, "fragments": 2, "delay": 2}, "delay"), ({"outer_lr": 0}, "outer_lr"),
                          ({"outer_momentum": 1.0}, "outer_momentum"), ({"mix": 1.0}, "mix"),
                          ({"nesterov": 1}, "nesterov"), ({"compressor": "topk"}, "compressor"),
                          ({"collective": "ring"}, "collective"), ({"outer_momentum": 0.0}, "nesterov"),
                          ({"compressor": compress.TopK(0.1), "collective": "allreduce"}, "summable"),
                          ({"outer_optimizer": 3}, "outer_optimizer"), ({"timeout": 0}, "timeout")]:
        with pytest.raises(ValueError, match=match):
            DiLoCo(m, None, **kwargs)
    with pytest.raises(ValueError, match="fragments"):
        DiLoCo(nn.Linear(2, 2), None, sync_every=8, fragments=3)  # 2 parameters


def _different_start(rank, world):
    outer = DiLoCo(small(seed=rank), None, sync_every=2)
    outer.close()


def _per_rank_seed(rank, world):
    outer = DiLoCo(small(), None, sync_every=2, compressor=compress.RandomK(0.5, seed=rank))
    outer.close()


def test_replicas_that_disagree_are_refused_at_bind():
    from tests.conftest import WorkerError

    with pytest.raises(WorkerError, match="different parameters"):
        run_world(_different_start, 2)
    with pytest.raises(WorkerError, match="disagree"):
        run_world(_per_rank_seed, 2)


# ---------------------------------------------------------------------- replicas inside a node
def _inside_nodes(rank, world, kind):
    """2 nodes x 2 ranks: the replica is DDP (or FSDP2) over the node's ranks, DiLoCo syncs it across
    the rail (the same local rank on every node)."""
    from torch.distributed.device_mesh import init_device_mesh

    from commlib.comm import Topology

    layout = Topology(ranks_per_node=2).layout(range(world))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rail", "node"))
    model = small()
    if kind == "ddp":
        from commlib.comm.topology import node_groups

        intra, rail = node_groups(layout)
        trained = DDP(model, process_group=intra)
    else:
        from torch.distributed.fsdp import fully_shard

        rail = mesh["rail"].get_group()
        trained = fully_shard(model, mesh=mesh["node"])
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = DiLoCo(model, inner, sync_every=3, compressor=compress.QSGD(bits=4, bucket_size=16), process_group=rail)
    synced = []
    for step in range(9):
        x, y = data(rank, step)
        inner.zero_grad()
        nn.functional.mse_loss(trained(x), y).backward()
        inner.step()
        if outer.step():
            synced.append(torch.cat([p.to_local().detach().reshape(-1) if hasattr(p, "to_local")
                                     else p.detach().reshape(-1) for p in model.parameters()]))
    stats = outer.stats()
    outer.close()
    return synced, stats, layout.position(rank)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_replicas_inside_nodes_sync_across_the_rail(kind):
    """After every sync all four ranks hold the same replica (DDP) or shard (FSDP2: the same shard on
    both nodes), and the outer gradient crossed nodes only: its payload is the replica's (or shard's)."""
    out = run_world(_inside_nodes, 4, args=(kind,))
    for synced, stats, (node, local) in out:
        assert len(synced) == 3 and stats["syncs"] == 3
        twin = next(s for s, _, (n, j) in out if n != node and j == local)
        assert all(torch.equal(a, b) for a, b in zip(synced, twin))
        if kind == "ddp":
            assert all(torch.equal(a, b) for a, b in zip(synced, out[0][0]))
    full = 4 * sum(p.numel() for p in small().parameters())
    dense = out[0][1]["total_bytes_dense"] / 3
    assert dense == (full if kind == "ddp" else pytest.approx(full / 2, rel=0.2))


# ---------------------------------------------------------------------- torch.distributed.checkpoint
def _dcp(rank, world, path, phase, direct=False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from commlib.checkpoint import HookStateful

    options = {"sync_every": 4, "fragments": 2, "delay": 1, "compressor": compress.QSGD(bits=4, bucket_size=16)}
    model = small()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)  # stateless: the replicas' models are all there is
    outer = DiLoCo(model, inner, **options)
    start, stop = 0, 14
    if phase == "resume":
        holder = {f"model{rank}": model.state_dict(), "outer": outer if direct else HookStateful(outer)}
        try:
            dcp.load(holder, checkpoint_id=path)
        except (ValueError, CheckpointException) as exc:  # the refusal is the result
            outer.close()
            return str(exc)
        model.load_state_dict(holder[f"model{rank}"])
        start = 6
    elif phase == "save":
        stop = 6  # after inner step 6: fragment 0's sync is in flight
    for step in range(start, stop):
        x, y = data(rank, step)
        inner.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        inner.step()
        outer.step()
    if phase == "save":  # the replicas differ between syncs: each saves its model under its own key
        dcp.save({f"model{rank}": model.state_dict(), "outer": outer if direct else HookStateful(outer)},
                 checkpoint_id=path)
    outer.close()
    return flat(model)


def test_dcp_save_and_resume_in_fresh_processes_is_bit_identical(tmp_path):
    """Through commlib.checkpoint.HookStateful each rank's DiLoCo state (residuals, a sync in flight,
    the outer momentum) comes back whole; handed to DCP directly, a fresh state would get nothing
    back for the tensors it does not hold yet, and the load says so instead of losing them."""
    full = run_world(_dcp, 2, args=(None, "full"))
    path = str(tmp_path / "dcp")
    run_world(_dcp, 2, args=(path, "save"))
    resumed = run_world(_dcp, 2, args=(path, "resume"))
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    grown = run_world(_dcp, 3, args=(path, "resume"))
    assert all(isinstance(m, str) and ("rank2" in m or "model2" in m or "world size" in m) for m in grown)
    direct = str(tmp_path / "direct")
    run_world(_dcp, 2, args=(direct, "save", True))
    refused = run_world(_dcp, 2, args=(direct, "resume", True))
    assert all(isinstance(m, str) and "lacks" in m and "HookStateful" in m for m in refused)
