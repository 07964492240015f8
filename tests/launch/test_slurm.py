"""``launch/slurm.sbatch`` under a real Slurm (Debian's 22.05: munged, slurmctld, one slurmd per
emulated node namespace): ``sbatch --nodes=2`` trains across both nodes with identical ranks, and
every daemon and namespace is gone afterwards. Root only, like the cluster tests; Slurm and munge
come from ``scripts/install_slurm.sh``, which ``make test`` runs."""

import json
import subprocess

import pytest

from commlib.launch import cluster as cl
from commlib.launch import slurm as sl

ROOT = cl.PACKAGE_ROOT
able, why = sl.can_run_slurm()
pytestmark = [pytest.mark.dist, pytest.mark.skipif(not able, reason=why)]


def test_slurm_conf_puts_each_node_on_its_cluster_address():
    cluster = cl.EmulatedCluster(nodes=2, subnet=77)
    conf = sl.slurm_conf(cluster, sl.Path("/x"))
    assert "NodeName=n0 NodeAddr=10.213.77.1 " in conf and "NodeName=n1 NodeAddr=10.213.77.2 " in conf
    assert "PartitionName=debug Nodes=n[0-1]" in conf and "AuthInfo=socket=/x/munge/munge.socket" in conf


def test_sbatch_two_nodes_trains_with_identical_ranks_then_everything_is_torn_down(tmp_path):
    with cl.EmulatedCluster(nodes=2, bandwidth="1gbit") as cluster, sl.EmulatedSlurm(cluster) as slurm:
        scratch = slurm.root
        groups = [p.pid for p in slurm.procs]  # each daemon leads its own session
        assert len(groups) == 4 and all(map(sl.group_alive, groups))  # munged, slurmctld, 2 x slurmd
        code, output = slurm.sbatch(
            ["--nodes=2", f"{ROOT}/launch/slurm.sbatch", "-m", "workloads.train", "--model", "gpt2", "--dim", "64",
             "--layers", "1", "--steps", "6", "--warmup", "2", "--hook", "powersgd", "--option", "rank=2",
             "--timeout", "60"],
            cwd=tmp_path, timeout=240,
            env={"GLOO_SOCKET_IFNAME": "eth0", "COMMLIB_WIRE_INTERFACE": "eth0", "OMP_NUM_THREADS": "1"})
        assert code == 0, output[-5000:]
        job = slurm.control(["scontrol", "show", "job", "--oneliner", "1"]).stdout
        assert "NumNodes=2 " in job and "NodeList=n[0-1]" in job and "JobState=COMPLETED" in job, job
        failed, failed_output = slurm.sbatch(["--nodes=1", "--wrap", "exit 3"], cwd=tmp_path, timeout=60)
        assert failed == 3 and "ended FAILED" in failed_output  # a failing job is reported, not waited on
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    assert result["world"] == 2 and result["ranks_agree"] and result["hook"] == "powersgd"
    # the gradients crossed node 0's veth: at least the hook's payload went out on the wire
    assert result["wire_tx_bytes_per_step"] >= result["bytes_per_step"] > 0
    assert not any(map(sl.group_alive, groups)) and not scratch.exists()
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if ns.startswith(cluster.tag)]
