"""HSDP (2 x 2 mesh, 4 ranks): the inter-node all-reduce across replicas compressed with EF on the shard."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from commlib.comm.rank_state import stable_hash
from commlib.compress import QSGD, Identity, Sign
from commlib.compress.base import derive_seed
from commlib.fsdp import compress_gradients
from tests.conftest import run_world
from tests.fsdp.fsdp_harness import full_grads, full_params, local_batch, loss_of, mlp

STEPS = 4


def hsdp(model, native: bool):
    """FSDP2's native HSDP (2-D mesh), or FSDP on the node's 1-D shard mesh (commlib's replicas)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    target = mesh if native else mesh["shard"]
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=target)
    fully_shard(model, mesh=target)
    return model, mesh


def _train(rank, world, compressor=None, error_feedback=False, record=False, collective="auto", sizes=None):
    model, mesh = hsdp(mlp(sizes=sizes) if sizes else mlp(), native=compressor is None)
    state = None
    records = []
    if compressor is not None:
        state = compress_gradients(model, compressor, error_feedback=error_feedback, collective=collective,
                                   replicate=mesh["replicate"])
        if record:  # what each all-reduce hook got and gave, to replay in one process
            for name, m in [(n, m) for n, m in model.named_modules() if hasattr(m, "set_all_reduce_hook")]:
                inner = state.replica.hook_for(name)

                def recording(out, inner=inner, name=name):
                    before = out.detach().clone()
                    inner(out)
                    records.append((name, before, out.detach().clone()))

                m.set_all_reduce_hook(recording)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(STEPS):
        x, y = local_batch(step, rank, world)
        loss_of(model, x, y).backward()
        grads.append(full_grads(model))
        opt.step()
        opt.zero_grad()
    stats = state.stats() if state is not None else None
    return full_params(model), grads, stats, records


def _identity_vs_plain(rank, world):
    plain = _train(rank, world)
    identity = _train(rank, world, Identity())
    return plain[0], identity[0], identity[2]


def test_identity_equals_plain_hsdp():
    for plain, identity, stats in run_world(_identity_vs_plain, 4):
        for a, b in zip(plain, identity):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert stats["inter_node"]["replicas"] == 2 and stats["inter_node"]["shards"] == 2


@pytest.mark.parametrize("compressor,collective", [(QSGD(bits=8, bucket_size=64), "allgather"),
                                                   (Sign(), "allgather")], ids=["qsgd8", "sign"])
def test_compressed_replica_all_reduce_equals_its_simulation(compressor, collective):
    """Bit for bit: for each shard, the replicas' EF recursion (v = g + e, C(v) on the wire, the mean
    of the decoded payloads, e = v - D(C(v))) replayed in one process on what each hook received."""
    out = run_world(_train, 4, kwargs=dict(compressor=compressor, error_feedback=True, record=True,
                                           collective=collective))
    # rank r = (replica r // 2, shard r % 2): replica groups are {0, 2} and {1, 3}
    for shard in (0, 1):
        pair = [out[shard][3], out[shard + 2][3]]
        assert len(pair[0]) == len(pair[1]) > 0
        residuals = {}
        steps = {}
        for (name, in_a, out_a), (name_b, in_b, out_b) in zip(*pair, strict=True):
            assert name == name_b
            key = name or "root"
            step = steps.get(key, 0)
            steps[key] = step + 1
            seed = derive_seed(0, step, stable_hash(key))
            decoded = []
            for replica, grad in enumerate((in_a, in_b)):
                v = grad + residuals[replica, key] if (replica, key) in residuals else grad.clone()
                payload = compressor.compress(v, seed=seed)
                residuals[replica, key] = v - compressor.decompress(payload)
                decoded.append(payload)
            mean = torch.zeros(in_a.shape, dtype=torch.float32)
            for payload in decoded:
                compressor.decompress_add_(mean, payload)
            mean.div_(2)
            assert torch.equal(out_a, mean) and torch.equal(out_b, mean), (shard, key, step)


def _bytes(rank, world):
    sizes = (12, 512, 256, 5)  # shards of thousands of values: the per-bucket scales stay a small share
    _, _, stats, _ = _train(rank, world, QSGD(bits=4, bucket_size=512), error_feedback=True, sizes=sizes)
    _, _, stats8, _ = _train(rank, world, QSGD(bits=8, bucket_size=512), error_feedback=True, sizes=sizes)
    return stats["inter_node"], stats8["inter_node"]


def test_inter_node_bytes_drop_with_qsgd():
    """What crosses the nodes per step (an all-gather of the payload between 2 replicas) against a
    dense all-reduce of the shard (2 (R-1)/R of it): QSGD 4 and 8 bit with EF."""
    for q4, q8 in run_world(_bytes, 4):
        assert q4["bytes_sent"] <= 0.15 * q4["bytes_dense"] and q8["bytes_sent"] <= 0.3 * q8["bytes_dense"]
        assert q4["residual_bytes"] > 0


def _overflow(rank, world):
    model, mesh = hsdp(mlp(), native=False)
    state = compress_gradients(model, QSGD(bits=8, bucket_size=64), error_feedback=True, replicate=mesh["replicate"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        loss_of(model, *local_batch(step, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    before = {k: v.clone() for k, v in state.replica.engine.residuals.items()}
    x, y = local_batch(2, rank, world)
    if rank == 3:  # one rank of one node overflows
        x = x.clone()
        x[0, 0] = float("inf")
    loss_of(model, x, y).backward()
    first = model[0].weight  # the inf enters through the input: the first layer's gradient overflows
    finite = bool(torch.isfinite(first.grad.to_local()).all())
    kept = torch.equal(before["0"], state.replica.engine.residuals["0"])
    return finite, kept


def test_an_overflow_on_one_rank_reaches_every_shard_and_spares_the_residual():
    """An inf on one rank of one node: the overflowed module's shard is non-finite on every rank
    (the node's flag poisons every shard of it, so both replica groups see it) and every rank keeps
    that module's residual, as on one level."""
    for finite, kept in run_world(_overflow, 4):
        assert not finite
        assert kept


def _native(rank, world):
    model, _ = hsdp(mlp(), native=True)
    try:
        compress_gradients(model, QSGD(bits=8))
    except ValueError as exc:
        return str(exc)
    return None


def test_native_hsdp_is_refused_with_the_recipe():
    for message in run_world(_native, 4):
        assert message is not None and "mesh['shard']" in message and "replicate=mesh['replicate']" in message


# ---------------------------------------------------------------------------------------- two-hop (qgZ)
def _two_hop(rank, world, compressor, error_feedback):
    from commlib.comm import Topology
    from tests.fsdp.fsdp_harness import all_ranks_equal, shard

    plain = shard(mlp())
    model = shard(mlp())
    state = compress_gradients(model, compressor, error_feedback=error_feedback, topology=Topology(ranks_per_node=2))
    flat = shard(mlp())
    flat_state = compress_gradients(flat, compressor, error_feedback=error_feedback, hierarchical=False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (plain, model, flat)]
    for step in range(STEPS):
        for m, opt in zip((plain, model, flat), opts):
            loss_of(m, *local_batch(step, rank, world)).backward()
            opt.step()
            opt.zero_grad()
    two = next(iter(state._two_hop.values()), None)  # the group FSDP passed, resolved at its first call
    return (full_params(plain), full_params(model), all_ranks_equal(full_params(model)), two is not None,
            state.stats()["total_bytes_sent"], flat_state.stats()["total_bytes_sent"])


def test_two_hop_reduce_scatter_identity_equals_fsdp():
    """Plain fully_shard over 2 nodes x 2 ranks: dense in the node, the node sums across it."""
    for plain, two, equal, on, _, _ in run_world(_two_hop, 4, args=(Identity(), False)):
        assert on and equal
        for a, b in zip(plain, two):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_two_hop_reduce_scatter_qsgd_ef_trains_alike_and_sends_less():
    """QSGD 4-bit with EF on the node sums: ranks identical, close to plain FSDP, and each rank
    sends N - 1 = 1 compressed row across nodes instead of W - 1 = 3 (a third of the flat bytes)."""
    for plain, two, equal, on, sent, flat_sent in run_world(_two_hop, 4, args=(QSGD(bits=4, bucket_size=64), True)):
        assert on and equal
        assert max(float((a - b).abs().max()) for a, b in zip(plain, two)) < 0.05
        assert sent * 2.5 < flat_sent
