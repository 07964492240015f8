"""The emulated cluster: a real 2-node DDP run across a tc-shaped link, and cleanup in every exit path."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from commlib.launch import cluster as cl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
able, why = cl.can_emulate()
needs_root = pytest.mark.skipif(not able, reason=f"emulated cluster unavailable: {why}")


def commlib_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(cl.PREFIX)]


def test_bad_node_count_is_a_value_error():
    with pytest.raises(ValueError, match="nodes"):
        cl.EmulatedCluster(nodes=0)


def test_remove_refuses_foreign_namespaces():
    with pytest.raises(ValueError, match="refusing"):
        cl.remove("somebody-elses")


@needs_root
def test_two_node_ddp_with_a_hook_across_the_shaped_link():
    before = set(commlib_namespaces())
    with cl.EmulatedCluster(nodes=2, bandwidth="200mbit") as cluster:
        assert set(commlib_namespaces()) - before == {cluster.switch, cluster.node(0), cluster.node(1)}
        # the link is really shaped: a qdisc with our rate sits on both ends of node 0's link
        qdisc = subprocess.run(["ip", "netns", "exec", cluster.node(0), "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "200Mbit" in qdisc
        outputs = cluster.torchrun(["-m", "workloads.train", "--model", "gpt2", "--dim", "64", "--layers", "1",
                                    "--steps", "6", "--warmup", "2", "--hook", "powersgd", "--option", "rank=2"],
                                   timeout=240)
    result = json.loads(next(line for line in outputs[0].splitlines() if line.startswith("RESULT "))[7:])
    assert result["world"] == 2 and result["ranks_agree"]
    assert all(map(lambda x: x == x and x < 10, result["losses"]))  # finite, trained
    # the NIC counter saw at least the hook's payload (plus headers and rendezvous), not orders more
    assert result["bytes_per_step"] <= result["wire_tx_bytes_per_step"] < 20 * result["bytes_per_step"] + 200_000
    assert set(commlib_namespaces()) == before


@needs_root
def test_failure_inside_the_cluster_cleans_up():
    before = set(commlib_namespaces())
    with pytest.raises(RuntimeError, match="node"):
        with cl.EmulatedCluster(nodes=2) as cluster:
            cluster.torchrun(["-c", "raise SystemExit(3)"], timeout=60)
    assert set(commlib_namespaces()) == before


@needs_root
def test_sigkill_of_the_owner_is_cleaned_up_by_the_reaper():
    before = set(commlib_namespaces())
    code = ("import time, sys; from commlib.launch.cluster import EmulatedCluster\n"
            "c = EmulatedCluster(nodes=2).start(); print(c.tag, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    tag = proc.stdout.readline().strip()
    assert tag.startswith(cl.PREFIX) and len(set(commlib_namespaces()) - before) == 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and set(commlib_namespaces()) != before:
        time.sleep(0.2)
    assert set(commlib_namespaces()) == before


@needs_root
def test_sigterm_of_the_cli_cleans_up():
    before = set(commlib_namespaces())
    proc = subprocess.Popen([sys.executable, "-m", "commlib.launch.cluster", "--nodes", "2", "--",
                             "-c", "import time; time.sleep(120)"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set(commlib_namespaces()) - before) < 3:
        time.sleep(0.2)
    assert len(set(commlib_namespaces()) - before) == 3
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert set(commlib_namespaces()) == before


@needs_root
@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "deepspeed")),
                    reason="deepspeed not installed (pip install -e .[deepspeed])")
def test_deepspeed_launcher_across_the_cluster():
    with cl.EmulatedCluster(nodes=2) as cluster:
        outputs = cluster.deepspeed(["--module", "workloads.train", "--dim", "64", "--layers", "1", "--steps", "4",
                                     "--warmup", "1", "--hook", "fp16"], timeout=240)
    result = json.loads(next(line for line in outputs[0].splitlines() if line.startswith("RESULT "))[7:])
    assert result["world"] == 2 and result["ranks_agree"]
