"""Elastic restart: a worker is SIGKILLed mid-run, torchrun restarts the job, it resumes from DCP and
ends with the parameters of an uninterrupted run, bit for bit (examples/elastic_train.py)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from commlib.launch import cluster as cl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "elastic_train.py")
able, why = cl.can_emulate()


def _result(outputs: list[str]) -> dict:
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, outputs
    return json.loads(lines[0][7:])


def _torchrun(nnodes: int, nproc: int, endpoint: str, job: str, node: int = 0, address: str = "127.0.0.1") -> list[str]:
    """torchrun with a c10d rendezvous on ``endpoint``. In a network namespace torchrun can tell
    neither that the endpoint's address is its own (node 0 hosts the store: ``is_host``) nor which
    address its peers reach it at (its hostname says localhost: ``--local-addr``)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--max-restarts=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job}",
            "--monitor-interval=0.2", f"--rdzv-conf=is_host={int(node == 0)}", f"--local-addr={address}", SCRIPT]


def _runs_on_cluster(extra: list[str], job: str) -> dict:
    with tempfile.TemporaryDirectory() as ckpt, cl.EmulatedCluster(nodes=2) as cluster:
        endpoint = f"{cluster.address(0)}:29511"
        outputs = cluster.launch(lambda i: [*_torchrun(2, 1, endpoint, job, i, cluster.address(i)),
                                            "--checkpoint-dir", ckpt, *extra],
                                 timeout=300)
    return _result(outputs)


@pytest.mark.skipif(not able, reason=f"emulated cluster unavailable: {why}")
def test_sigkill_of_one_nodes_worker_restarts_and_resumes_bit_identically_across_two_nodes():
    plain = _runs_on_cluster([], "plain")
    killed = _runs_on_cluster(["--kill-at-step", "10", "--kill-rank", "1"], "killed")
    assert plain["attempt"] == 0 and plain["resumed_from"] == 0
    # a restarted round, resumed from the checkpoint before the kill ("attempt" is the restart count
    # of rank 0's agent, which counts only its own node's failures)
    assert killed["resumed_from"] == 8
    assert killed["ranks_agree"] and killed["digest"] == plain["digest"]
    assert killed["losses"] == plain["losses"][8:]
    assert killed["hook_stats"]["step"] == 16 and killed["hook_stats"]["compression_ratio"] > 1


@pytest.mark.skipif(able, reason="the cluster variant runs instead")
def test_sigkill_restart_resumes_bit_identically_on_one_node():
    results = []
    for job, extra in [("plain", []), ("killed", ["--kill-at-step", "10"])]:
        with tempfile.TemporaryDirectory() as ckpt:
            proc = subprocess.run([*_torchrun(1, 2, "127.0.0.1:29512", job), "--checkpoint-dir", ckpt, *extra],
                                  capture_output=True, text=True, timeout=300, env=cl.child_env(None))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(_result([proc.stdout]))
    assert results[1]["attempt"] == 1 and results[1]["resumed_from"] == 8
    assert results[1]["digest"] == results[0]["digest"]


def test_the_round_store_listens_on_the_route_address_only():
    """It used to bind 0.0.0.0 (every interface). Bound to 127.0.0.1, 127.0.0.2 (another address of
    the same loopback) is refused, while 127.0.0.1 serves."""
    import datetime
    import socket

    import torch.distributed as dist

    from commlib.launch.elastic import bound_store

    store = bound_store("127.0.0.1", 2, datetime.timedelta(seconds=10))
    client = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=datetime.timedelta(seconds=10))
    client.set("k", "v")
    assert store.get("k") == b"v"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", store.port), timeout=2).close()


def test_a_malformed_round_key_is_skipped_not_raised():
    from commlib.launch.elastic import parse_round_key

    assert parse_round_key("10.0.0.1:29500:abc") == ("10.0.0.1", 29500, "abc")
    assert parse_round_key("fe80::1:29500:abc") == ("fe80::1", 29500, "abc")
    for bad in ("", "garbage", "host:port:nonce", "host:99999:n", "host:12:", ":12:n"):
        assert parse_round_key(bad) is None, bad
