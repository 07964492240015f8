"""A real Slurm on the emulated cluster: munged, slurmctld and one slurmd per node namespace.

Everything lives in a scratch directory (its own ``slurm.conf``, passed by ``SLURM_CONF``; its own
munge key and socket): the machine's ``/etc/slurm`` and ``/etc/munge`` are never touched.
Layout, for an :class:`~commlib.launch.cluster.EmulatedCluster` of N nodes::

    munged            root namespace, run as the ``munge`` user; a socket file every namespace sees
    slurmctld         node 0's namespace (the head node), port 6817 on node 0's address
    slurmd -N n<i>    node i's namespace, port 6818 on its address (NodeAddr on the cluster's bridge)

``sbatch`` runs inside node 0, as a user logged into the head node would. Needs root and
Debian's ``slurmctld slurmd slurm-client munge`` (``scripts/install_slurm.sh``).

Example (as root)::

    with EmulatedCluster(nodes=2) as cluster, EmulatedSlurm(cluster) as slurm:
        out = slurm.sbatch(["--nodes=2", "launch/slurm.sbatch", "-m", "workloads.train"])
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from commlib.launch.cluster import EmulatedCluster, child_env

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def can_run_slurm() -> tuple[bool, str]:
    """Whether the daemons can run here, and why not."""
    if os.geteuid() != 0:
        return False, "not root: slurmd and the node namespaces need root"
    missing = [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return False, f"Slurm/munge not installed (missing {', '.join(missing)}); run scripts/install_slurm.sh"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return False, "no munge user (install Debian's munge package)"
    return True, ""


def group_alive(group: int) -> bool:
    """Whether any process of process group ``group`` still exists."""
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def slurm_conf(cluster: EmulatedCluster, root: Path, cpus: int = 8) -> str:
    """A minimal slurm.conf (22.05 keys) for ``cluster``: no cgroups, no systemd, root as SlurmUser."""
    controller = socket.gethostname().split(".")[0]  # slurmctld accepts only its own host name here
    nodes = "\n".join(f"NodeName=n{i} NodeAddr={cluster.address(i)} NodeHostname=n{i} CPUs={cpus} RealMemory=1000 "
                      f"State=UNKNOWN" for i in range(cluster.nodes))
    return f"""\
ClusterName=commlib
SlurmctldHost={controller}({cluster.address(0)})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdSpoolDir={root}/spool/%n
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{nodes}
PartitionName=debug Nodes=n[0-{cluster.nodes - 1}] Default=YES MaxTime=INFINITE State=UP
"""


class EmulatedSlurm:
    """munged + slurmctld + one slurmd per node of a started :class:`EmulatedCluster`."""

    def __init__(self, cluster: EmulatedCluster, cpus_per_node: int = 8, startup_timeout: float = 60.0):
        self.cluster = cluster
        self.cpus_per_node = cpus_per_node
        self.startup_timeout = startup_timeout
        self.root: Path | None = None
        self.procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ environment
    def env(self, extra: dict | None = None) -> dict:
        """Our environment plus ``extra``, with commlib importable and ``SLURM_CONF`` set."""
        env = child_env({**os.environ, **(extra or {})})
        env["SLURM_CONF"] = str(self.root / "slurm.conf")
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", ""), "/usr/sbin"])
        return env

    def _daemon(self, argv: list[str], node: int | None = None, user: str | None = None) -> subprocess.Popen:
        name = argv[0] if node is None else f"{argv[0]}-n{node}"  # its console output: <name>.out
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        if node is not None:
            argv = ["ip", "netns", "exec", self.cluster.node(node), *argv]
        log = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def control(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a Slurm client command on the head node (node 0)."""
        return subprocess.run(["ip", "netns", "exec", self.cluster.node(0), *argv], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EmulatedSlurm:
        ok, why = can_run_slurm()
        if not ok:
            raise PermissionError(why)
        self.root = Path(tempfile.mkdtemp(prefix="commlib-slurm-"))
        self.root.chmod(0o755)
        try:
            self._start_munge()
            for d in ["state", "spool", *(f"spool/n{i}" for i in range(self.cluster.nodes))]:
                (self.root / d).mkdir()
            (self.root / "slurm.conf").write_text(slurm_conf(self.cluster, self.root, self.cpus_per_node))
            # slurmd loads a cgroup plugin even with proctrack/linuxproc; autodetection fails on a
            # hybrid hierarchy (tmpfs at /sys/fs/cgroup), so name the v1 plugin (nothing is constrained)
            (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
            self._daemon(["slurmctld", "-D", "-c", "-i"], node=0)
            for i in range(self.cluster.nodes):
                self._daemon(["slurmd", "-D", "-N", f"n{i}"], node=i)
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        entry = pwd.getpwnam("munge")
        os.chown(munge, entry.pw_uid, entry.pw_gid)
        key = munge / "munge.key"
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create", f"--keyfile={key}"], check=True,
                       capture_output=True, text=True)
        munge.chmod(0o755)  # clients (slurm runs as root) reach the socket through it
        self._daemon(["munged", "--foreground", f"--key-file={key}", f"--socket={munge}/munge.socket",
                      f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                      f"--seed-file={munge}/munged.seed", "--num-threads=10", "--force"], user="munge")
        deadline = time.monotonic() + 15
        while not (munge / "munge.socket").exists():
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self._tail(munge / 'munged.log')}")
            time.sleep(0.1)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        states = ""
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({proc.args}):\n{self.logs()}")
            out = self.control(["sinfo", "--noheader", "--Node", "--format=%N %T"])
            states = out.stdout.strip()
            lines = [line.split() for line in states.splitlines()]
            if len(lines) == self.cluster.nodes and all(s[1].rstrip("*") == "idle" for s in lines):
                return
            time.sleep(0.5)
        raise TimeoutError(f"Slurm nodes not idle after {self.startup_timeout:.0f} s: {states!r}\n{self.logs()}")

    @staticmethod
    def _tail(path: Path, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{self._tail(p)}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Stop every daemon (and what they started), then delete the scratch directory."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
        # children of the daemons (runuser's munged, a slurmstepd) leave their group last
        deadline = time.monotonic() + 15
        for proc in self.procs:
            while group_alive(proc.pid) and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                time.sleep(0.1)
        self.procs = []
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> EmulatedSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], cwd: str | os.PathLike, timeout: float = 300.0,
               env: dict | None = None) -> tuple[int, str]:
        """``sbatch --parsable <args>`` on the head node from ``cwd``, then wait for the job;
        returns (the job's exit code, its output). The output file is ``*<job id>*.out`` in ``cwd``
        (the script's ``--output``, or Slurm's ``slurm-<id>.out``). The job state is polled twice a
        second (``sbatch --wait`` polls at growing intervals: it added about 25 s per job here); past
        ``timeout`` the job is cancelled and ``TimeoutError`` raised."""
        proc = subprocess.run(["ip", "netns", "exec", self.cluster.node(0), "sbatch", "--parsable", *args], cwd=cwd,
                              env=self.env(env), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            return proc.returncode, f"--- sbatch refused the job\n{proc.stderr}\n{self.logs()}"
        job = proc.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while True:
            fields = dict(item.split("=", 1) for item in self.control(
                ["scontrol", "show", "job", "--oneliner", job]).stdout.split() if "=" in item)
            state = fields.get("JobState", "")
            if state in FINISHED_STATES:
                break
            if time.monotonic() > deadline:
                self.control(["scancel", job])
                raise TimeoutError(f"Slurm job {job} still {state or 'unknown'} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.5)
        code = int(fields.get("ExitCode", "1:0").split(":")[0]) or (0 if state == "COMPLETED" else 1)
        outputs = sorted(Path(cwd).glob(f"*{job}*.out"))
        text = "\n".join(p.read_text(errors="replace") for p in outputs)
        if code != 0:
            text += f"\n--- job {job} ended {state}\n{self.logs()}"
        return code, text
