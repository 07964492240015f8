"""The advisor: its network formulas, its cost model's limits, calibration and the CLI."""

import math
import time

import pytest
import torch

from commlib import advise


def test_egress_with_one_rank_per_node_is_the_ring():
    for nodes in (2, 3, 8, 256):
        ring = 2 * (nodes - 1) / nodes * 1000.0
        assert advise.node_egress_bytes("allreduce", 1000.0, nodes, 1) == pytest.approx(ring)
        assert advise.node_egress_bytes("two_phase", 1000.0, nodes, 1) == pytest.approx(ring)
        assert advise.node_egress_bytes("allgather", 1000.0, nodes, 1) == pytest.approx((nodes - 1) * 1000.0)
    assert advise.node_egress_bytes("allreduce", 1000.0, 1, 8) == 0.0  # one node: nothing crosses a NIC


def test_two_phase_pays_for_the_missing_intra_node_reduction():
    """With G ranks per node a two-phase exchange sends about G times what one rank per node would;
    the flat ring all-reduce crosses each node boundary once per ring step: 2 (W - 1) / W."""
    g, nodes = 8, 16
    ratio = advise.node_egress_bytes("two_phase", 1.0, nodes, g) / advise.node_egress_bytes("two_phase", 1.0, nodes, 1)
    assert 0.5 * g < ratio < g + 1
    assert advise.node_egress_bytes("allreduce", 1.0, nodes, g) == pytest.approx(2 * 127 / 128)
    # 2 nodes x 2 ranks: the ring sends 1.5x one rank per node (measured on the emulated cluster: 1.50x)
    assert advise.node_egress_bytes("allreduce", 1.0, 2, 2) / advise.node_egress_bytes("allreduce", 1.0, 2, 1) == 1.5
    with pytest.raises(ValueError, match="pattern"):
        advise.node_egress_bytes("ring", 1.0, 2, 1)


def test_step_time_parts_add_up():
    cluster = advise.Cluster(4, 1, gbit=1.0, latency_us=0.0, efficiency=1.0)
    dense = advise.METHODS[0]
    p = advise.predict(dense, cluster, params=1e6, compute_seconds=0.01, overlap=0.0)
    # 4 MB of gradients, ring: 2 * 3/4 * 4 MB at 125 MB/s
    assert p.comm_seconds == pytest.approx(2 * 0.75 * 4e6 / 125e6)
    assert p.step_seconds == pytest.approx(0.01 + p.comm_seconds)
    hidden = advise.predict(dense, cluster, params=1e6, compute_seconds=1.0, overlap=1.0)
    assert hidden.exposed_comm_seconds == 0.0 and hidden.step_seconds == pytest.approx(1.0)


def test_compression_stops_paying_as_the_network_gets_fast():
    """Agarwal et al.: the speedup of every compressing method falls towards (or below) 1 with bandwidth."""
    params, compute = 1.3e9, advise.compute_seconds_for(1.3e9, 8192, 400.0)
    speedups = {}
    for gbit in (1, 10, 100, 1000, 100_000):
        preds = advise.advise(advise.Cluster(16, 8, gbit), params, compute, hidden=2048)
        speedups[gbit] = {p.method: p.speedup for p in preds}
    for method in ("PowerSGD rank 4", "EF sign, two-phase", "fp16 cast"):
        series = [speedups[g][method] for g in sorted(speedups)]
        assert all(a >= b - 1e-9 for a, b in zip(series, series[1:])), (method, series)
        assert series[-1] <= 1.0 + 1e-9  # with a free network the hook's own work is all that is left
    assert speedups[1]["PowerSGD rank 4"] > 5


def test_report_warns_where_compression_does_not_pay(capsys):
    advise.main(["--params", "1.3e9", "--nodes", "2", "--gpus-per-node", "8", "--gbit", "400", "--step-ms", "2000"])
    out = capsys.readouterr().out
    assert "does not pay" in out and "Agarwal" in out
    advise.main(["--params", "1.3e9", "--nodes", "16", "--gpus-per-node", "8", "--gbit", "10"])
    out = capsys.readouterr().out
    assert "Best: PowerSGD" in out and "Assumptions" in out


@pytest.mark.parametrize("argv,flag", [
    (["--params", "0", "--nodes", "2", "--gbit", "1"], "--params"),
    (["--params", "1e9", "--nodes", "2", "--gbit", "1", "--overlap", "2"], "--overlap"),
    (["--params", "1e9", "--nodes", "0", "--gbit", "1"], "--nodes"),
])
def test_bad_arguments_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit):
        advise.main(argv)
    assert flag in capsys.readouterr().err


def test_scales_to_256_nodes_quickly():
    started = time.perf_counter()
    preds = advise.advise(advise.Cluster(256, 8, 100), 7e9, 0.5, hidden=4096)
    assert time.perf_counter() - started < 1.0
    assert all(math.isfinite(p.step_seconds) and p.step_seconds > 0 for p in preds)


def test_calibration_times_the_real_hooks():
    costs = advise.calibrate(numel=1 << 16, repeats=2, threads=1)
    assert set(costs) == {m.name for m in advise.METHODS if m.bytes_per_element > 0}
    assert all(0 < v < 1e-6 for v in costs.values())  # positive, and far below a microsecond per element
    assert torch.get_num_threads() >= 1


def test_loopback_comm_matches_identical_ranks():
    comm = advise.LoopbackComm(3)
    t = torch.arange(6.0)
    assert torch.equal(comm.all_reduce(t.clone()), 3 * t)
    assert all(torch.equal(x, t) for x in comm.all_gather(t))
    assert torch.equal(comm.all_to_all(t), torch.tensor([0.0, 1.0] * 3))


def test_hierarchical_forms_send_what_one_rank_per_node_would():
    """The two-level hooks: the node's NIC carries the 1-rank-per-node figure whatever L, and on 16
    nodes x 8 GPUs at 200 Gbit/s (7B) EF sign pays (flat: 0.51x dense)."""
    cluster = advise.Cluster(16, 8, 200.0)
    compute = advise.compute_seconds_for(7e9, 8192, 400.0)
    out = {p.method: p for p in advise.advise(cluster, 7e9, compute)}
    flat, hier = out["EF sign, two-phase"], out["EF sign, two-phase, hierarchical"]
    assert flat.speedup < 0.6 and hier.speedup >= 1.0
    one_per_node = advise.predict(advise.METHODS[4], advise.Cluster(16, 1, 200.0), 7e9, compute)
    assert hier.comm_seconds >= one_per_node.comm_seconds  # plus the intra-node hops
    sign = next(m for m in advise.HIERARCHICAL_METHODS if m.name.startswith("EF sign"))
    assert "hierarchical=True" in sign.hook
    # one node, or one rank per node: no hierarchical rows
    assert not any(p.method.endswith("hierarchical") for p in advise.advise(advise.Cluster(1, 8, 200.0), 7e9, compute))
    assert not any(p.method.endswith("hierarchical") for p in advise.advise(advise.Cluster(16, 1, 200.0), 7e9,
                                                                            compute))


def test_local_steps_amortise_the_sync_over_h():
    """DiLoCo every H steps: bytes per inner step are the outer gradient / H, and on a slow link its
    step time falls towards compute as H grows; the report says when to prefer it."""
    cluster = advise.Cluster(8, 8, gbit=0.1, latency_us=0.0, efficiency=1.0)
    compute = 0.5
    preds = {h: {p.method: p for p in advise.advise(cluster, 1e8, compute, sync_every=h)} for h in (10, 100, 1000)}
    for h, by in preds.items():
        fp32 = by[f"DiLoCo fp32, H={h}"]
        assert fp32.payload_bytes == pytest.approx(4e8 / h)
        # one replica per node: the sync is a ring all-reduce over 8 nodes, 2 * 7/8 * 400 MB at 12.5 MB/s, / H
        sync = 2 * 7 / 8 * 4e8 / 12.5e6 / h
        intra = 2 * 7 / 8 * 4e8 / 200e9  # DDP inside the node, every inner step
        assert fp32.comm_seconds == pytest.approx(sync + intra)
    steps = [preds[h][f"DiLoCo QSGD 4-bit + EF, H={h}"].step_seconds for h in (10, 100, 1000)]
    assert steps[0] > steps[1] > steps[2] > compute
    out = advise.report(list(preds[1000].values()), cluster, 1e8, [])
    assert "Local steps" in out
    assert not any(p.method.startswith("DiLoCo") for p in advise.advise(cluster, 1e8, compute))
