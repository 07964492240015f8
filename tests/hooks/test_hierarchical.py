"""Hierarchical hooks on 2 nodes x 2 ranks (gloo, fork): dense inside the node, compressed across."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import compress, hooks
from commlib.comm import Topology
from commlib.comm.rank_state import stable_hash
from commlib.compress.base import derive_seed
from tests.conftest import run_world

from .ddp_harness import Net, batch

TOPO = Topology(ranks_per_node=2)
ROWS, COLS = 24, 20


class Fixed(nn.Module):
    """Gradients chosen by the test: loss = <W, T> + <b, t>, so dW = T and db = t exactly."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(ROWS, COLS))
        self.bias = nn.Parameter(torch.zeros(ROWS))

    def forward(self, targets):
        t_w, t_b = targets
        return (self.weight * t_w).sum() + (self.bias * t_b).sum()


def fixed_grads(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(ROWS, COLS, generator=gen), torch.randn(ROWS, generator=gen)


def _hook_outputs(rank, world, name, options, steps):
    model = Fixed()
    ddp = DDP(model)
    state, hook = hooks.make(name, model=model, hierarchical=True, topology=TOPO, **options)
    ddp.register_comm_hook(state, hook)
    outs = []
    for step in range(steps):
        model.zero_grad()
        ddp(fixed_grads(rank, step)).backward()
        outs.append((model.weight.grad.clone(), model.bias.grad.clone()))
    key = next(iter(state.residuals), None) if hasattr(state, "residuals") else None
    stats = state.stats()
    state.close()
    return outs, key, stats


def simulate(name, compressor, collective, steps, key, start_iter=2, seed=0):
    """One process, four ranks: the two-level recursion of the hook, in the hook's float order."""
    nodes, local = [[0, 1], [2, 3]], 2
    residuals = {}
    outs = []
    for step in range(steps):
        grads = [fixed_grads(r, step) for r in range(4)]
        if step < start_iter:  # dense warm-up over the flat group: x / 4 summed in rank order
            w = sum((g[0] * 0.25 for g in grads), torch.zeros(ROWS, COLS))
            b = sum((g[1] * 0.25 for g in grads), torch.zeros(ROWS))
            outs.append((w, b))
            continue
        results = []
        for part_index, compressed in ((1, False), (0, True)):
            flats = [g[part_index].reshape(-1) for g in grads]
            n = flats[0].numel()
            size = -(-n // local)
            padded = [torch.nn.functional.pad(f, (0, local * size - n)).view(local, size) for f in flats]
            slices = {}  # (node, j) -> node mean of slice j
            for k, node in enumerate(nodes):
                for j in range(local):
                    total = padded[node[0]][j] + padded[node[1]][j]
                    slices[k, j] = total / local + 0.0
            means = []
            for j in range(local):  # rail j: slice j of every node
                if not compressed:
                    means.append(sum((slices[k, j] * 0.5 for k in range(2)), torch.zeros(size)))
                    continue
                skey = f"weight/piece{j}of2"
                layer_seed = derive_seed(seed, step, stable_hash(skey))
                payloads = []
                for k in range(2):
                    v = slices[k, j] + residuals[k, j] if (k, j) in residuals else slices[k, j].clone()
                    p = compressor.compress(v, seed=layer_seed)
                    residuals[k, j] = v - compressor.decompress(p)
                    payloads.append(p)
                out = torch.zeros(size)
                for p in payloads:
                    compressor.decompress_add_(out, p)
                if collective == "allgather" and compressor.touched_indices(payloads[0]) is not None:
                    touched = torch.cat([compressor.touched_indices(p).reshape(-1) for p in payloads]).long()
                    out[touched] = out[touched] / 2
                else:
                    out = out.div_(2)
                means.append(out)
            results.append(torch.cat(means)[:n])
        outs.append((results[1].view(ROWS, COLS), results[0]))
    return outs


CASES = [
    ("topk-allgather", compress.TopK(0.2), "allgather"),
    ("randomk-allreduce", compress.RandomK(0.25, seed=3), "allreduce"),
    ("qsgd-allgather", compress.QSGD(bits=4, bucket_size=64), "allgather"),
    ("sign-allgather", compress.Sign(), "allgather"),
]


@pytest.mark.parametrize("label,compressor,collective", CASES, ids=[c[0] for c in CASES])
def test_ef_equals_a_one_process_simulation_of_the_two_level_recursion(label, compressor, collective):
    """Bit for bit: node sums, the slice's EF recursion on each rail, the mean over nodes."""
    out = run_world(_hook_outputs, 4, args=("ef", {"compressor": compressor, "collective": collective}, 5))
    key = out[0][1]
    assert key == "weight/piece0of2" and out[1][1] == "weight/piece1of2"
    want = simulate("ef", compressor, collective, 5, key)
    for rank_outs, _, _ in out:
        for step, ((w, b), (ww, wb)) in enumerate(zip(rank_outs, want, strict=True)):
            if step < 2:  # the dense warm-up: gloo's flat all-reduce sums in its own order
                torch.testing.assert_close(w, ww, rtol=1e-6, atol=1e-7)
                continue
            assert torch.equal(w, ww), (label, step, float((w - ww).abs().max()))
            assert torch.equal(b, wb), (label, step)


def node_slices(grads, part_index, nodes=((0, 1), (2, 3)), local=2):
    """Each node's mean of each of its L slices of one tensor, as the intra-node reduce-scatter makes it."""
    flats = [g[part_index].reshape(-1) for g in grads]
    n = flats[0].numel()
    size = -(-n // local)
    padded = [torch.nn.functional.pad(f, (0, local * size - n)).view(local, size) for f in flats]
    return {(k, j): sum((padded[r][j] for r in node), torch.zeros(size)) / local + 0.0
            for k, node in enumerate(nodes) for j in range(local)}, n


def simulate_ef21(compressor, steps, smoothness=None, start_iter=2, seed=0):
    """One process, four ranks as 2 nodes x 2: EF21 (EF21-W with per-node weights) on each rail's
    slice, the node as the worker: a dense first round, then c_k = C(x_k / (n w_k) - g_k),
    g_k += c_k, g += sum_k w_k c_k (EF21, Alg. 1; EF21-W, Alg. 1)."""
    if smoothness is None:
        weights = [0.5, 0.5]
    else:
        per_node = torch.stack([torch.tensor(smoothness, dtype=torch.float64)[list(node)].mean()
                                for node in ((0, 1), (2, 3))])
        weights = [float(per_node[k] / per_node.sum()) for k in range(2)]
    estimates, aggregates, outs = {}, {}, []
    for step in range(steps):
        grads = [fixed_grads(r, step) for r in range(4)]
        if step < start_iter:
            outs.append((sum((g[0] * 0.25 for g in grads), torch.zeros(ROWS, COLS)),
                         sum((g[1] * 0.25 for g in grads), torch.zeros(ROWS))))
            continue
        results = []
        for part_index, compressed in ((1, False), (0, True)):
            slices, n = node_slices(grads, part_index)
            means = []
            for j in range(2):
                targets = [slices[k, j] / (2 * weights[k]) for k in range(2)]
                if not compressed or j not in aggregates:  # the dense round (always, for the bias)
                    mean = (slices[0, j] + slices[1, j]) / 2
                    if compressed:
                        estimates.update({(k, j): targets[k].clone() for k in range(2)})
                        aggregates[j] = mean.clone()
                    means.append(mean)
                    continue
                layer_seed = derive_seed(seed, step, stable_hash(f"weight/piece{j}of2"))
                messages = [compressor.decompress(compressor.compress(targets[k] - estimates[k, j], seed=layer_seed))
                            for k in range(2)]
                update = torch.zeros_like(aggregates[j])
                for k in range(2):
                    update.add_(messages[k].float(), alpha=weights[k])
                    estimates[k, j] = estimates[k, j] + messages[k]
                aggregates[j] = aggregates[j] + update
                means.append(aggregates[j])
            results.append(torch.cat(means)[:n])
        outs.append((results[1].view(ROWS, COLS), results[0]))
    return outs, weights


EF21_CASES = [("ef21-topk", "ef21", compress.TopK(0.2), None),
              ("ef21w-topk", "ef21w", compress.TopK(0.2), [1.0, 3.0, 2.0, 6.0]),
              ("ef21w-qsgd", "ef21w", compress.QSGD(bits=4, bucket_size=64), [1.0, 3.0, 2.0, 6.0])]


@pytest.mark.parametrize("label,name,compressor,smoothness", EF21_CASES, ids=[c[0] for c in EF21_CASES])
def test_ef21_and_ef21w_equal_a_one_process_simulation_with_the_node_as_worker(label, name, compressor, smoothness):
    """Bit for bit: the node's mean of each slice, EF21's estimates per node and rail, the weighted
    sum of the messages; EF21-W's weights per node are the mean L of its ranks (1/3, 2/3 here)."""
    options = {"compressor": compressor, "collective": "allgather"}
    if smoothness is not None:
        options["smoothness"] = smoothness
    out = run_world(_hook_outputs, 4, args=(name, options, 6))
    want, weights = simulate_ef21(compressor, 6, smoothness)
    if smoothness is not None:
        assert weights == pytest.approx([1 / 3, 2 / 3])
    for rank_outs, _, stats in out:
        if smoothness is not None:
            assert stats["ef21w"]["weights"] == weights
        for step, ((w, b), (ww, wb)) in enumerate(zip(rank_outs, want, strict=True)):
            if step < 2:
                torch.testing.assert_close(w, ww, rtol=1e-6, atol=1e-7)
                continue
            assert torch.equal(w, ww), (label, step, float((w - ww).abs().max()))
            assert torch.equal(b, wb), (label, step)


def _flat_over_node_means(rank, world, name, options, steps):
    """The flat hook on 2 ranks, rank k fed its node's mean gradient (as the node reduce-scatter makes it)."""
    model = Fixed()
    ddp = DDP(model)
    state, hook = hooks.make(name, model=model, hierarchical=False, **options)
    ddp.register_comm_hook(state, hook)
    outs = []
    for step in range(steps):
        grads = [fixed_grads(r, step) for r in (2 * rank, 2 * rank + 1)]
        means = tuple((grads[0][i] + grads[1][i]) / 2 + 0.0 for i in range(2))
        model.zero_grad()
        ddp(means).backward()
        outs.append((model.weight.grad.clone(), model.bias.grad.clone()))
    state.close()
    return outs


POWERSGD_CASES = [{"rank": 2}, {"rank": 1, "batch_tensors_with_same_shape": True}, {"rank": 3, "warm_start": False}]


@pytest.mark.parametrize("options", POWERSGD_CASES, ids=["rank2", "rank1-batched", "rank3-cold"])
def test_powersgd_on_two_levels_is_flat_powersgd_over_the_node_means(options):
    """Bit for bit: a matrix's owner on each node runs PowerSGD (P, Q, error feedback, warm start)
    on its node's mean across the rail, which is flat PowerSGD with the nodes as its ranks."""
    hier = run_world(_hook_outputs, 4, args=("powersgd", options, 6))
    flat = run_world(_flat_over_node_means, 2, args=("powersgd", options, 6))
    for rank_outs, _, stats in hier:
        assert stats["hierarchical"] == {"nodes": 2, "ranks_per_node": 2}
        for step, ((w, b), (fw, fb)) in enumerate(zip(rank_outs, flat[0], strict=True)):
            if step < 2:  # the dense warm-up runs over the flat group of 4
                torch.testing.assert_close(w, fw, rtol=1e-6, atol=1e-7)
                continue
            assert torch.equal(w, fw), (options, step, float((w - fw).abs().max()))
            # the bias: flat PowerSGD keeps PyTorch's error feedback on uncompressed tensors too
            # (e = M_i - mean M, whose mean over ranks is 0), the two-level path averages it plainly:
            # the same mean up to rounding
            torch.testing.assert_close(b, fb, rtol=1e-6, atol=1e-7)


def _lgreco_pieces(rank, world, family):
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.01)
    options = {"density": 0.1} if family == "topk" else {"bits": 4, "bucket_size": 64}
    state, hook = hooks.make("lgreco", family=family, model=model, hierarchical=True, topology=TOPO,
                             retune_every=3, accumulate_steps=2, alpha=1.5, **options)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(8):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    plan = {k: state.setting_of(k) for k in state.plan}
    pieces = {k: state.compressor_for(k) for k in state.residuals}
    stats = state.stats()
    state.close()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), plan, pieces, stats


@pytest.mark.parametrize("family", ["topk", "qsgd"])
def test_lgreco_on_two_levels_compresses_each_piece_with_its_layers_setting(family):
    """The plan is made from whole layers; each rail compresses its piece of a layer with that
    layer's setting, and the plan (a retune on every rank) and the parameters agree across ranks."""
    out = run_world(_lgreco_pieces, 4, args=(family,))
    params, plan, pieces, stats = out[0]
    assert plan and stats["lgreco"]["retunes"] >= 2 and stats["hierarchical"] == {"nodes": 2, "ranks_per_node": 2}
    default = 0.1 if family == "topk" else 4
    assert any(v != default for v in plan.values())  # the pieces below cannot be the default's by accident
    for other_params, other_plan, other_pieces, _ in out[1:]:
        assert torch.equal(other_params, params) and other_plan == plan
    for _, plan_r, pieces_r, _ in out:
        assert pieces_r and all("/piece" in k for k in pieces_r)
        for key, compressor in pieces_r.items():
            layer = key.split("/piece")[0]
            setting = compressor.density if family == "topk" else compressor.bits
            assert setting == plan_r.get(layer, setting)


def _train(rank, world, name, options, hierarchical, steps=6):
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = None
    if name is not None:
        state, hook = hooks.make(name, model=model, hierarchical=hierarchical, topology=TOPO, **options)
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    stats = state.stats() if state is not None else None
    residual_numel = sum(t.numel() for t in state.residuals.values()) if hasattr(state, "residuals") else 0
    if state is not None:
        state.close()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), stats, residual_numel


def _dense_vs_ddp(rank, world):
    plain = _train(rank, world, None, {}, False)[0]
    hier, stats, _ = _train(rank, world, "allreduce", {}, True)
    fp16 = _train(rank, world, "fp16", {}, True)[0]
    return plain, hier, fp16, stats


def test_hierarchical_allreduce_equals_ddp_and_fp16_is_close():
    for plain, hier, fp16, stats in run_world(_dense_vs_ddp, 4):
        assert float((hier - plain).abs().max() / plain.abs().max()) <= 1e-6
        assert float((fp16 - plain).abs().max() / plain.abs().max()) <= 1e-2
        assert stats["hierarchical"] == {"nodes": 2, "ranks_per_node": 2}
        assert stats["wire_bytes_inter_total"] > 0 and stats["wire_bytes_intra_total"] > 0


HOOKS = [("ef", {"compressor": compress.TopK(0.1)}), ("ef", {"compressor": compress.Sign(), "collective": "two_phase"}),
         ("ef", {"compressor": compress.QSGD(bits=4, bucket_size=64), "collective": "allgather"}),
         ("ef", {"compressor": compress.RandomK(0.2)}), ("bf16", {}),
         ("ef21", {"compressor": compress.TopK(0.2)}),
         ("ef21", {"compressor": compress.Sign(), "collective": "two_phase"}),
         ("powersgd", {"rank": 2}), ("powersgd", {"rank": 1, "batch_tensors_with_same_shape": True}),
         ("lgreco", {"family": "powersgd", "rank": 2, "retune_every": 3, "accumulate_steps": 1}),
         ("ef21w", {"compressor": compress.TopK(0.2), "smoothness": [1.0, 3.0, 2.0, 6.0]}),
         ("ef21w", {"compressor": compress.QSGD(bits=4, bucket_size=64), "estimate_every": 2}),
         ("lgreco", {"family": "topk", "density": 0.1, "retune_every": 3, "accumulate_steps": 1}),
         ("lgreco", {"family": "qsgd", "bits": 4, "bucket_size": 64, "retune_every": 3, "accumulate_steps": 1})]


def _identical(rank, world, index):
    name, options = HOOKS[index]
    hier, stats, residual = _train(rank, world, name, options, True)
    flat, flat_stats, flat_residual = _train(rank, world, name, options, False)
    return hier, stats, residual, flat_stats, flat_residual


@pytest.mark.parametrize("index", range(len(HOOKS)), ids=[f"{h}-{i}" for i, (h, _) in enumerate(HOOKS)])
def test_ranks_stay_identical_and_the_inter_node_bytes_drop(index):
    out = run_world(_identical, 4, args=(index,))
    for params, stats, residual, flat_stats, flat_residual in out:
        assert torch.equal(params, out[0][0])
        assert torch.isfinite(params).all()
        if flat_residual and HOOKS[index][0] == "ef":
            assert residual * 2 <= flat_residual + 64 * 4  # the residual lives on a 1/L slice
        # what one rank sends across nodes per step: its slice's payload, about 1/L of the flat payload
        assert stats["wire_bytes_inter_total"] < 0.75 * flat_stats["wire_bytes_total"]


def _inf(rank, world):
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state, hook = hooks.make("ef", model=model, hierarchical=True, topology=TOPO, compressor=compress.TopK(0.1))
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    finite, before = [], None
    for step in range(6):
        x, y = batch(rank, step)
        loss = nn.functional.mse_loss(ddp(x), y)
        if step == 4 and rank == 3:
            loss = loss * float("inf")
        opt.zero_grad()
        if step == 4:
            before = {k: v.clone() for k, v in state.residuals.items()}
        loss.backward()
        ok = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        finite.append(ok)
        if ok:
            opt.step()
        if step == 4:
            kept = all(torch.equal(before[k], state.residuals[k]) for k in before)
    state.close()
    return finite, kept


def test_an_overflow_on_one_rank_reaches_every_rank_and_spares_every_residual():
    for finite, kept in run_world(_inf, 4):
        assert finite == [s != 4 for s in range(6)]
        assert kept


def _resume(rank, world, path, phase, topology):
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.01)
    state, hook = hooks.make("ef", model=model, hierarchical="auto", topology=topology,
                             compressor=compress.TopK(0.1))
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    if phase != "full":
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["model"])
        try:
            state.bind()
            state.load_state_dict(blob["hook"])
        except ValueError as exc:
            state.close()
            return str(exc)
        start = 4
    for step in range(start, 7):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        if phase == "full" and step == 3:
            gathered = hooks.gather_state_dict(state)
            if rank == 0:
                torch.save({"model": model.state_dict(), "hook": gathered}, path)
            dist.barrier()
    state.close()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_resume_is_bit_identical_and_a_topology_change_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    full = run_world(_resume, 4, args=(path, "full", TOPO))
    resumed = run_world(_resume, 4, args=(path, "resume", TOPO))
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    other = run_world(_resume, 4, args=(path, "resume", Topology(ranks_per_node=4)))  # one node: flat
    for message in other:
        assert isinstance(message, str) and "node layout" in message


def test_bad_arguments_and_unsupported_hooks():
    with pytest.raises(ValueError, match="hierarchical"):
        hooks.make("ef", hierarchical="yes")
    with pytest.raises(ValueError, match="topology"):
        hooks.make("ef", topology=2)
    with pytest.raises(ValueError, match="ranks_per_node"):
        Topology(ranks_per_node=0)
    with pytest.raises(ValueError, match="exactly one"):
        Topology()


def test_a_hook_without_a_two_level_form_refuses_hierarchical_true():
    """Every hook takes the option; the three with no two-level form run flat under "auto" and
    refuse True at construction."""
    from commlib import coding

    options = {"dp_ef": {}, "agvm": {"model": Net()}, "gc": {"code": coding.CyclicRepetition(3, 1)}}
    for name, extra in options.items():
        with pytest.raises(ValueError, match="no two-level"):
            hooks.make(name, hierarchical=True, topology=TOPO, **extra)
        with pytest.raises(ValueError, match="hierarchical must be"):
            hooks.make(name, hierarchical="yes", **extra)
        state, _ = hooks.make(name, hierarchical="auto", topology=TOPO, **extra)
        state.close()


def test_topology_layouts_and_detection():
    assert TOPO.layout(range(8)).describe() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert TOPO.layout(range(8)).rails == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert TOPO.layout([0, 2, 4, 6]).hierarchical is False  # one rank per node: flat
    with pytest.raises(ValueError, match="unevenly"):
        TOPO.layout([0, 1, 2])
    assert Topology(node_of=["a", "a", "b", "b"]).layout(range(4)).describe() == [[0, 1], [2, 3]]
    assert Topology.detect({"LOCAL_WORLD_SIZE": "8"}).ranks_per_node == 8
    assert Topology.detect({"SLURM_NTASKS_PER_NODE": "4(x2)"}).ranks_per_node == 4
    assert Topology.detect({}) is None
    with pytest.raises(ValueError, match="different numbers"):
        Topology.detect({"SLURM_NTASKS_PER_NODE": "4,2"})
    from commlib.comm.topology import check_against_environment

    with pytest.raises(ValueError, match="LOCAL_RANK"):
        check_against_environment(TOPO, 3, {"LOCAL_RANK": "0"})
    check_against_environment(TOPO, 3, {"LOCAL_RANK": "1", "GROUP_RANK": "1"})


def test_topology_at_scale():
    """A planner call for 256 nodes x 8 ranks is immediate."""
    import time

    start = time.perf_counter()
    layout = Topology(ranks_per_node=8).layout(range(2048))
    assert layout.node_count == 256 and len(layout.rails) == 8 and len(layout.rails[0]) == 256
    assert time.perf_counter() - start < 2.0


def _lowrank(rank, world, hierarchical):
    from commlib.optim import GaLoreAdamW

    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=0.01)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = GaLoreAdamW([{"params": others}, {"params": matrices, "rank": 4, "update_proj_gap": 3,
                                            "projector": "dct"}], lr=1e-2)
    state, hook = hooks.make("lowrank", optimizer=opt, model=model, hierarchical=hierarchical, topology=TOPO)
    ddp.register_comm_hook(state, hook)
    for step in range(7):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    stats = state.stats()
    state.close()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), stats


def _lowrank_both(rank, world):
    return _lowrank(rank, world, True), _lowrank(rank, world, False)


def test_lowrank_hook_on_two_levels_equals_the_flat_one():
    """R is linear in G: the node's sum of R is R of the node's sum, so GaLore through the two-level
    hook follows the flat hook (relative 1e-5; sums in another order), with clipping every step."""
    out = run_world(_lowrank_both, 4)
    for (hier, stats), (flat, _) in out:
        assert torch.equal(hier, out[0][0][0])
        assert float((hier - flat).abs().max() / flat.abs().max()) <= 1e-5
        assert stats["hierarchical"] == {"nodes": 2, "ranks_per_node": 2}
