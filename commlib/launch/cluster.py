"""An emulated multi-node cluster on one machine: network namespaces, veth links, ``tc`` shaping.

Layout for ``nodes=N`` (all of it inside namespaces this module creates; nothing is added to the
root namespace)::

    <tag>-sw   a "switch" namespace holding bridge br0 and ports p0..p{N-1}
    <tag>-n0   node 0: eth0 (10.213.<k>.1/24), peer of p0;  runs torchrun --node-rank 0 (rendezvous)
    <tag>-n1   node 1: eth0 (10.213.<k>.2/24), peer of p1;  ...

Each link is shaped in both directions with ``netem rate <bandwidth> delay <latency>``: on the node's
eth0 (what the node sends) and on its switch port (what it receives), so every node has a
full-duplex link of the given bandwidth, like a NIC into a switch.

Cleanup is guaranteed three ways: the context manager's ``finally`` (errors, Ctrl-C, SIGTERM), and a
reaper child process that holds a pipe to the parent and removes everything when the parent dies,
even by SIGKILL. Only namespaces whose name carries this run's tag are ever deleted; processes in
them are killed first. Without root (or without ``ip``/``tc``) :func:`open_cluster` falls back to
unshaped loopback with a clear message.

    commlib-cluster --nodes 2 --bandwidth 1gbit -- -m workloads.train --hook powersgd --option rank=4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from commlib.validation import integer

PREFIX = "commlib"
REGISTRY = Path("/run/commlib-cluster")  # one file per live cluster: its tag and owner pid
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # so `-m commlib...` works in every child


def child_env(env: dict | None = None) -> dict:
    """``env`` (default: ours) with commlib importable."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _tc(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True, capture_output=True, text=True)



def can_emulate() -> tuple[bool, str]:
    """Whether namespaces can be made here, and why not."""
    if os.geteuid() != 0:
        return False, "not root: network namespaces need CAP_NET_ADMIN"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    return True, ""


def namespaces_of(tag: str) -> list[str]:
    """This run's namespaces (and only those): names ``<tag>-...``."""
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(tag + "-")]


def remove(tag: str) -> None:
    """Kill the processes inside this run's namespaces, then delete them (their links go with them)."""
    if not tag.startswith(PREFIX):
        raise ValueError(f"refusing to remove namespaces outside commlib's prefix: {tag!r}")
    for ns in namespaces_of(tag):
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            if not _ip("netns", "pids", ns, check=False).stdout.split():
                break
            time.sleep(0.05)
        _ip("netns", "del", ns, check=False)
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY / tag).unlink()


def reap_stale() -> list[str]:
    """Remove clusters whose owner process is gone (e.g. a SIGKILL before the reaper could act)."""
    removed = []
    if not REGISTRY.is_dir():
        return removed
    for entry in REGISTRY.iterdir():
        try:
            owner = int(entry.read_text().strip())
            os.kill(owner, 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        remove(entry.name)
        removed.append(entry.name)
    return removed


class EmulatedCluster:
    """``nodes`` network namespaces joined through a bridge by shaped veth links.

    Example (as root)::

        with EmulatedCluster(nodes=2, bandwidth="1gbit", latency="0.5ms") as cluster:
            outputs = cluster.torchrun(["-m", "workloads.train", "--hook", "fp16"])
            print(outputs[0])   # node 0's stdout
    """

    def __init__(self, nodes: int = 2, bandwidth: str = "1gbit", latency: str = "0.5ms", subnet: int | None = None):
        integer("nodes", nodes, 1, 64)
        self.nodes = nodes
        self.bandwidth, self.latency = bandwidth, latency
        self.tag = f"{PREFIX}{os.getpid()}x{int(time.time() * 1000) % 100000}"
        self.subnet = subnet if subnet is not None else 1 + os.getpid() % 250
        self._reaper: subprocess.Popen | None = None
        self.latency_emulated: bool | None = None  # known after start()
        self._up = False

    # ------------------------------------------------------------------ names
    def node(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def address(self, i: int) -> str:
        return f"10.213.{self.subnet}.{i + 1}"

    interface = "eth0"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EmulatedCluster:
        ok, why = can_emulate()
        if not ok:
            raise PermissionError(why)
        reap_stale()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / self.tag).write_text(str(os.getpid()))
        # The reaper outlives us: when our end of its stdin pipe closes (we exited, however), it cleans up.
        self._reaper = subprocess.Popen([sys.executable, "-m", "commlib.launch.cluster", "--reap", self.tag],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                        env=child_env())
        self._up = True
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            _ip("-n", self.switch, "link", "set", "lo", "up")
            for i in range(self.nodes):
                ns = self.node(i)
                _ip("netns", "add", ns)
                _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", self.interface,
                    "netns", ns)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{i}", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.interface)
                _ip("-n", ns, "link", "set", self.interface, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self._shape(ns, self.interface, delay=True)
                self._shape(self.switch, f"p{i}", delay=False)
        except BaseException:
            self.stop()
            raise
        return self

    def _shape(self, ns: str, dev: str, delay: bool) -> None:
        """``netem rate+delay`` where the kernel has sch_netem, else ``tbf`` (rate only, said once)."""
        if self.latency_emulated is not False:
            netem = ["netem", "delay", self.latency] if delay else ["netem"]
            try:
                _tc(ns, "qdisc", "add", "dev", dev, "root", *netem, "rate", self.bandwidth, "limit", "100000")
                self.latency_emulated = True
                return
            except subprocess.CalledProcessError:
                self.latency_emulated = False
                print(f"commlib-cluster: this kernel has no sch_netem; links are shaped with tbf to {self.bandwidth} "
                      f"but the {self.latency} latency is NOT added", file=sys.stderr)
        # burst must hold a whole GSO segment (64 KiB on veth); the queue holds 50 ms of traffic
        _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.bandwidth, "burst", "256kb",
            "latency", "50ms")

    def stop(self) -> None:
        if not self._up:
            return
        remove(self.tag)
        if self._reaper is not None:
            with contextlib.suppress(Exception):
                self._reaper.stdin.close()
                self._reaper.wait(timeout=10)
        self._up = False

    def __enter__(self) -> EmulatedCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ running
    def popen(self, i: int, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``i``'s namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.node(i), *argv], env=env, **kwargs)

    def torchrun(self, script_args: list[str], nproc_per_node: int = 1, port: int = 29500, timeout: float = 900,
                 env: dict | None = None, stream: bool = False) -> list[str]:
        """Run ``torchrun --nnodes N`` on every node against node 0; returns each node's stdout.

        Raises ``RuntimeError`` with the failing node's stderr if any node exits non-zero, and
        ``TimeoutError`` (after killing every node) past ``timeout`` seconds.
        """
        def argv(i: int) -> list[str]:
            return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nodes}",
                    f"--nproc-per-node={nproc_per_node}", f"--node-rank={i}", f"--master-addr={self.address(0)}",
                    f"--master-port={port}", *script_args]

        return self.launch(argv, env=env, timeout=timeout, stream=stream)

    def deepspeed(self, script_args: list[str], nproc_per_node: int = 1, port: int = 29500, timeout: float = 900,
                  env: dict | None = None, stream: bool = False) -> list[str]:
        """Run DeepSpeed's launcher on every node (``--no_ssh``, one hostfile, rendezvous on node 0).

        ``script_args`` starts with ``--module name`` or a script path, as ``deepspeed`` takes them.
        """
        import tempfile

        launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        if not os.path.exists(launcher):
            raise FileNotFoundError("deepspeed is not installed (pip install -e .[deepspeed])")
        with tempfile.NamedTemporaryFile("w", suffix=".hostfile", delete=False) as hostfile:
            hostfile.write("".join(f"node{i} slots={nproc_per_node}\n" for i in range(self.nodes)))

        def argv(i: int) -> list[str]:
            return [launcher, "--no_ssh", f"--node_rank={i}", f"--hostfile={hostfile.name}",
                    f"--master_addr={self.address(0)}", f"--master_port={port}", "--no_local_rank", *script_args]

        try:
            return self.launch(argv, env=env, timeout=timeout, stream=stream)
        finally:
            os.unlink(hostfile.name)

    def launch(self, argv_of_node, env: dict | None = None, timeout: float = 900, stream: bool = False) -> list[str]:
        """Run ``argv_of_node(i)`` in every node with the cluster's environment; each node's stdout."""
        base_env = child_env(env)
        base_env.update(GLOO_SOCKET_IFNAME=self.interface, COMMLIB_WIRE_INTERFACE=self.interface,
                        OMP_NUM_THREADS=base_env.get("OMP_NUM_THREADS", "1"))
        procs = [self.popen(i, argv_of_node(i), env=base_env, stdout=subprocess.PIPE,
                            stderr=None if stream else subprocess.PIPE, text=True) for i in range(self.nodes)]
        return _collect(procs, timeout)


def _collect(procs: list[subprocess.Popen], timeout: float, grace: float = 20.0) -> list[str]:
    """Wait for every node; if one fails, give the others ``grace`` seconds, then kill them (a node whose
    peer died would otherwise wait in torchrun's rendezvous or exit barrier for minutes)."""
    outputs: list = [None] * len(procs)
    errors: list = [None] * len(procs)

    def read(i: int) -> None:
        outputs[i], errors[i] = procs[i].communicate()

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"cluster job did not finish within {timeout:.0f} s")
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > grace:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for t in readers:
            t.join(timeout=10)
    for p in procs:
        p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:  # name the node that failed on its own before the ones killed after it
        i = next((i for i in failed if procs[i].returncode != -signal.SIGKILL), failed[0])
        codes = ", ".join(f"node {j}: {p.returncode}" for j, p in enumerate(procs))
        others = "".join(f"\n--- node {j} stderr ---\n{(errors[j] or '')[-1500:]}" for j in failed if j != i)
        raise RuntimeError(f"node {i} exited with {procs[i].returncode} ({codes}):\n{(errors[i] or '')[-4000:]}{others}")
    return outputs


class LoopbackCluster:
    """The fallback without root: one ``torchrun --standalone`` on loopback, unshaped."""

    interface = None

    def __init__(self, nodes: int = 2, **_):
        self.nodes = nodes

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def torchrun(self, script_args, nproc_per_node: int = 1, port: int = 29500, timeout: float = 900, env=None,
                 stream: bool = False) -> list[str]:
        base_env = child_env(env)
        base_env.setdefault("OMP_NUM_THREADS", "1")
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={self.nodes * nproc_per_node}", *script_args]
        proc = subprocess.Popen(argv, env=base_env, stdout=subprocess.PIPE,
                                stderr=None if stream else subprocess.PIPE, text=True)
        return _collect([proc], timeout)


def open_cluster(nodes: int = 2, bandwidth: str = "1gbit", latency: str = "0.5ms", log=print):
    """An :class:`EmulatedCluster` when possible, else a :class:`LoopbackCluster` (and says why)."""
    ok, why = can_emulate()
    if ok:
        return EmulatedCluster(nodes, bandwidth, latency)
    log(f"commlib-cluster: {why}; falling back to UNSHAPED loopback (one torchrun, {nodes} ranks). "
        "Link-bound figures will not be representative.")
    return LoopbackCluster(nodes)


def _install_signal_handlers() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def _reap(tag: str) -> None:
    """Reaper mode: wait for the parent's pipe to close, then remove the cluster if it is still there."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which cleans up itself
    with contextlib.suppress(Exception):
        sys.stdin.buffer.read()
    remove(tag)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="commlib-cluster", description="Run torchrun on an emulated multi-node cluster (network namespaces "
        "joined by tc-shaped veth links). Everything after -- goes to torchrun as the training script and its "
        "arguments.")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--bandwidth", default="1gbit", help="tc rate per link and direction (default 1gbit)")
    parser.add_argument("--latency", default="0.5ms", help="one-way delay added on each node's link")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"],
                        help="deepspeed: DeepSpeed's launcher with a hostfile (--no_ssh, one per node)")
    parser.add_argument("--reap", help=argparse.SUPPRESS)
    parser.add_argument("--cleanup", action="store_true", help="remove clusters left by dead commlib processes")
    parser.add_argument("script", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.reap:
        _reap(args.reap)
        return 0
    if args.cleanup:
        print("removed:", reap_stale() or "nothing")
        return 0
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the training script after --, e.g. -- -m workloads.train --hook fp16")
    _install_signal_handlers()
    cluster = open_cluster(args.nodes, args.bandwidth, args.latency, log=lambda m: print(m, file=sys.stderr))
    with cluster:
        if args.launcher == "deepspeed":
            if not isinstance(cluster, EmulatedCluster):
                parser.error("--launcher deepspeed needs the emulated cluster (root)")
            outputs = cluster.deepspeed(script, nproc_per_node=args.nproc_per_node, timeout=args.timeout, stream=True)
        else:
            outputs = cluster.torchrun(script, nproc_per_node=args.nproc_per_node, timeout=args.timeout, stream=True)
    for i, out in enumerate(outputs):
        if out:
            print(f"--- node {i} ---\n{out}", end="" if out.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
