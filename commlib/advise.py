"""When does gradient compression pay off? A cost model of one data-parallel step, per method.

    python -m commlib.advise --params 1.3e9 --nodes 16 --gpus-per-node 8 --gbit 25
    python -m commlib.advise --params 1.3e9 --nodes 16 --gpus-per-node 8 --gbit 25 --calibrate

The model (alpha-beta network cost, Hockney 1994, with overlap of communication and backward)::

    T(method) = T_compute + T_hook + max(0, T_comm - overlap * T_compute)
    T_comm    = messages * alpha + egress_bytes / bandwidth

* ``T_compute``: forward + backward + optimizer of one step without communication (``--step-ms``,
  or ``6 * params * tokens / (tflops * 1e12)``);
* ``T_hook``: the method's own work on the gradient, ``seconds_per_element * params``. Either the
  memory traffic of its fused path (:attr:`Method.bytes_per_element`) over ``--mem-gbps``, or, with
  ``--calibrate``, the real hook code timed on this machine's device (:func:`calibrate`);
* ``egress_bytes``: what one node's NIC sends per step for the method's collective pattern
  (:func:`node_egress_bytes`). The hierarchical forms (``hierarchical=True`` hooks) send each local
  rank's 1/L piece across its rail, so the node's NIC carries what one rank per node would; their
  two dense intra-node hops cost ``2 (L - 1) / L`` of the gradient over ``Cluster.intra_gbps`` and
  about 24 bytes per element of extra memory traffic, and each rank compresses 1/L of the gradient;
* ``overlap``: the fraction of ``T_compute`` that communication can hide behind (DDP overlaps its
  buckets with backward, roughly two thirds of compute, less the first bucket's wait).

Speedups are ``T(dense) / T(method)``. ``benchmarks/advise_check.py`` fits the network efficiency and
the overlap on the dense rows of the emulated-cluster study and checks the predictions for every
compressed method against the measured speedups (``benchmarks/results/advise_check.md``).

The warning of Agarwal et al. (MLSys 2022, "On the utility of gradient compression in distributed
training systems") is printed where it applies: when dense all-reduce already hides behind
compute, compression only adds work.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch

from commlib.comm.patterns import ring_bytes
from commlib.compress import QSGD, Cast, Compressor, Identity, PowerSGD, Sign, TopK

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
AGARWAL = ("Agarwal et al., MLSys 2022: on fast networks dense all-reduce largely hides behind backward, "
           "and compression only adds its own compute")


@dataclass
class Cluster:
    """Nodes of ``gpus_per_node`` ranks joined by ``gbit`` Gbit/s per node; ``latency_us`` per message.

    ``efficiency``: the share of the nominal bandwidth a collective achieves. ``transfer_gbps``: a
    host-side cap on transfers in GB/s (CPU copies of a TCP backend; inf for GPUs with RDMA).
    ``hook_slowdown``: how much slower the hook runs than when calibrated (ranks sharing cores).
    """

    nodes: int
    gpus_per_node: int = 1
    gbit: float = 25.0
    latency_us: float = 10.0
    efficiency: float = 0.9
    transfer_gbps: float = math.inf
    hook_slowdown: float = 1.0
    intra_gbps: float = 200.0  # the node's fabric per GPU, GB/s (NVLink-class), for the two-level hops

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def seconds_for(self, egress_bytes: float, messages: int) -> float:
        beta = 1.0 / (self.gbit * 1e9 / 8 * self.efficiency) + 1.0 / (self.transfer_gbps * 1e9)
        return messages * self.latency_us * 1e-6 + egress_bytes * beta


@dataclass
class Method:
    """One way to reduce the gradients: its payload, collective pattern and own work.

    ``payload(params, grad_bytes, hidden)`` -> bytes one rank contributes per step. ``pattern``:
    ``"allreduce"`` (summable), ``"two_phase"`` (all-to-all of compressed chunks, all-gather of the
    recompressed means, as 1-bit Adam) or ``"allgather"``. ``rounds``: collectives per bucket (per
    step when ``per_step``).
    ``bytes_per_element``: memory traffic of the hook per gradient element, counted from its fused
    kernels (the default hook cost when not calibrated).
    """

    name: str
    pattern: str
    payload: object
    rounds: int
    bytes_per_element: float
    hook: str = ""  # the hooks.make(...) call it stands for, shown to the user
    options: dict = field(default_factory=dict)
    per_step: bool = False  # rounds per step rather than per bucket (PowerSGD's one_round_per_step)
    hierarchical: bool = False  # the two-level form: dense in the node, the 1/L piece across it
    local_steps: int = 0  # H > 0: a DiLoCo-style sync every H inner steps (commlib.localsgd), not a hook


GRAD_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def payload_of(compressor: Compressor, dtype: torch.dtype | None = None):
    """``payload(params, grad_bytes, hidden)``: the bytes ``compressor`` sends per step for a model
    of ``params`` parameters held as matrices of (hidden, 4 hidden) (a transformer's MLP blocks),
    from :meth:`Compressor.nbytes` of one such matrix times their count. ``dtype`` fixes the
    element type (DiLoCo's fp32 outer gradients); otherwise the gradients' (``grad_bytes``)."""
    def payload(params, grad_bytes, hidden):
        shape = (hidden, 4 * hidden)
        return compressor.nbytes(shape, dtype or GRAD_DTYPES[grad_bytes]) * params / (4 * hidden * hidden)
    return payload


METHODS = [
    Method("dense all-reduce", "allreduce", payload_of(Identity()), 1, 0.0, "DDP's default"),
    Method("fp16 cast", "allreduce", payload_of(Cast(torch.float16)), 1, 12.0, 'hooks.make("fp16")'),
    Method("PowerSGD rank 1", "allreduce", payload_of(PowerSGD(rank=1)), 2, 28.0, 'hooks.make("powersgd", rank=1)',
           {"rank": 1}, per_step=True),
    Method("PowerSGD rank 4", "allreduce", payload_of(PowerSGD(rank=4)), 2, 28.0, 'hooks.make("powersgd", rank=4)',
           {"rank": 4}, per_step=True),
    Method("EF sign, two-phase", "two_phase", payload_of(Sign()), 2, 48.0,
           'hooks.make("ef", compressor=Sign(), collective="two_phase")'),
    Method("EF QSGD 4-bit, two-phase", "two_phase", payload_of(QSGD(bits=4)), 2, 48.0,
           'hooks.make("ef", compressor=QSGD(bits=4), collective="two_phase")'),
    Method("EF top-k 1%", "allgather", payload_of(TopK(0.01)), 1, 56.0,
           'hooks.make("ef", compressor=TopK(0.01))'),
]
# the two-level forms (hierarchical=True): the same payload per node, one piece per local rank
HIERARCHICAL_METHODS = [
    Method(f"{m.name}, hierarchical", m.pattern, m.payload, m.rounds, m.bytes_per_element,
           m.hook.replace(")", ", hierarchical=True)") if m.hook.startswith("hooks")
           else 'hooks.make("allreduce", hierarchical=True)', dict(m.options), m.per_step, hierarchical=True)
    for m in METHODS if m.name in ("dense all-reduce", "fp16 cast", "PowerSGD rank 4", "EF sign, two-phase",
                                   "EF QSGD 4-bit, two-phase", "EF top-k 1%")]


def local_step_methods(sync_every: int) -> list[Method]:
    """DiLoCo every H inner steps (:class:`commlib.localsgd.DiLoCo`), one replica per node: the
    outer gradient of every parameter once per sync across nodes, fp32 (all-reduce) or QSGD 4-bit
    + EF (all-gather), plus the outer step's memory traffic (delta, residual, Nesterov buffer,
    synced copy: ~10 passes of 4 bytes)."""
    h = sync_every
    return [
        Method(f"DiLoCo fp32, H={h}", "allreduce", payload_of(Identity(), torch.float32), 1, 40.0,
               f"localsgd.DiLoCo(model, inner, sync_every={h})", local_steps=h),
        Method(f"DiLoCo QSGD 4-bit + EF, H={h}", "allgather", payload_of(QSGD(bits=4), torch.float32), 1, 88.0,
               f"localsgd.DiLoCo(model, inner, sync_every={h}, compressor=QSGD(bits=4))", local_steps=h),
    ]


TWO_LEVEL_BYTES_PER_ELEMENT = 24.0  # the node's pieces gathered and scattered back: ~3 passes of 8 bytes


def node_egress_bytes(pattern: str, payload: float, nodes: int, gpus_per_node: int) -> float:
    """Bytes one node's NIC sends per step when each of its ranks contributes ``payload`` bytes.

    * allreduce: a ring over all W ranks (NCCL's and gloo's flat ring: each ring crosses each node
      boundary once): ``2 (W - 1) / W * payload`` (measured 1.50x the one-rank-per-node bytes at
      2 x 2 on the emulated cluster, as this gives);
    * two_phase: every rank sends the chunks meant for the other nodes' ranks (``G payload (W - G) / W``
      leave the node), then the 1/W recompressed chunks go round a ring all-gather (``(W - 1) / W *
      payload``); with one rank per node this is ``2 (N - 1) / N * payload``;
    * allgather: a ring over all W ranks carries every other rank's payload across each link:
      ``(W - 1) * payload``.
    """
    world = nodes * gpus_per_node
    if nodes <= 1:
        return 0.0
    if pattern == "allreduce":
        return ring_bytes("all_reduce", float(payload), world)
    if pattern == "two_phase":
        return gpus_per_node * payload * (world - gpus_per_node) / world + ring_bytes("all_gather", float(payload),
                                                                                      world)
    if pattern == "allgather":
        return (world - 1) * payload
    raise ValueError(f"pattern must be allreduce, two_phase or allgather, got {pattern!r}")


def messages_per_step(pattern: str, rounds: int, buckets: int, nodes: int, world: int) -> int:
    """Latency-bound hops per step: a ring all-reduce over nodes takes 2 (N - 1) of them per call."""
    if nodes <= 1:
        return 0
    hops = {"allreduce": 2 * (nodes - 1), "two_phase": 2 * (world - 1), "allgather": world - 1}[pattern]
    return rounds * buckets * hops


@dataclass
class Prediction:
    method: str
    step_seconds: float
    compute_seconds: float
    hook_seconds: float
    comm_seconds: float
    exposed_comm_seconds: float
    payload_bytes: float
    speedup: float = 1.0


def predict(method: Method, cluster: Cluster, params: float, compute_seconds: float, *, grad_bytes: int = 4,
            hidden: int = 2048, overlap: float = 0.5, seconds_per_element: float | None = None,
            mem_gbps: float = 2000.0, payload_bytes: float | None = None) -> Prediction:
    """One method's step time on ``cluster`` (see the module docstring). ``payload_bytes``
    overrides the formula (e.g. a measured per-step count)."""
    payload = method.payload(params, grad_bytes, hidden) if payload_bytes is None else payload_bytes
    buckets = max(1, math.ceil(params * grad_bytes / BUCKET_BYTES))
    per_element = (method.bytes_per_element / (mem_gbps * 1e9) if seconds_per_element is None
                   else seconds_per_element)
    local = cluster.gpus_per_node
    if method.local_steps:
        # one replica per node (DDP inside it, on the node's fabric, every step) and one sync of every
        # parameter per H inner steps on the inter-node group, not overlapped with compute (a delayed,
        # streaming sync would hide it): its time and the outer step are amortised over H
        h = method.local_steps
        egress = node_egress_bytes(method.pattern, payload, cluster.nodes, 1)
        sync = cluster.seconds_for(egress, messages_per_step(method.pattern, 1, 1, cluster.nodes, cluster.nodes)) / h
        intra = 2 * (local - 1) / local * params * grad_bytes / (cluster.intra_gbps * 1e9) if local > 1 else 0.0
        exposed = sync + max(0.0, intra - overlap * compute_seconds)
        hook = per_element * params * cluster.hook_slowdown / h
        return Prediction(method.name, compute_seconds + hook + exposed, compute_seconds, hook, sync + intra, exposed,
                          payload / h)
    if method.hierarchical and local > 1 and cluster.nodes > 1:
        # each local rank exchanges its 1/L piece across its rail (one rank per node): the node's NIC
        # carries what one rank per node would send; the dense hops inside the node (reduce-scatter,
        # all-gather: 2 (L - 1) / L of the gradient) run on the node's fabric
        egress = node_egress_bytes(method.pattern, payload, cluster.nodes, 1)
        messages = messages_per_step(method.pattern, method.rounds, 1 if method.per_step else buckets,
                                     cluster.nodes, cluster.nodes) + 2 * buckets * (local - 1)
        intra = 2 * (local - 1) / local * params * grad_bytes / (cluster.intra_gbps * 1e9)
        comm = cluster.seconds_for(egress, messages) + intra
        hook = (per_element / local + TWO_LEVEL_BYTES_PER_ELEMENT / (mem_gbps * 1e9)) * params * cluster.hook_slowdown
    else:
        egress = node_egress_bytes(method.pattern, payload, cluster.nodes, cluster.gpus_per_node)
        comm = cluster.seconds_for(egress, messages_per_step(method.pattern, method.rounds,
                                                             1 if method.per_step else buckets, cluster.nodes,
                                                             cluster.world))
        hook = per_element * params * cluster.hook_slowdown
    exposed = max(0.0, comm - overlap * compute_seconds)
    return Prediction(method.name, compute_seconds + hook + exposed, compute_seconds, hook, comm, exposed, payload)


def advise(cluster: Cluster, params: float, compute_seconds: float, *, methods=None, costs: dict | None = None,
           sync_every: int = 0, **kwargs) -> list[Prediction]:
    """Predictions for ``methods`` (default :data:`METHODS`, plus :data:`HIERARCHICAL_METHODS` on
    nodes of several GPUs, plus :func:`local_step_methods` with ``sync_every=H``), speedups against
    dense all-reduce. A hierarchical method's calibrated cost is its flat form's."""
    if methods is None:
        methods = METHODS + (HIERARCHICAL_METHODS if cluster.gpus_per_node > 1 and cluster.nodes > 1 else [])
        methods = methods + (local_step_methods(sync_every) if sync_every > 0 else [])
    costs = dict(costs or {})
    for m in methods:
        if m.hierarchical and m.name not in costs:
            flat = m.name.removesuffix(", hierarchical")
            if flat in costs:
                costs[m.name] = costs[flat]
    out = [predict(m, cluster, params, compute_seconds, seconds_per_element=costs.get(m.name), **kwargs)
           for m in methods]
    dense = next(p for p in out if p.method == METHODS[0].name) if any(
        p.method == METHODS[0].name for p in out) else predict(METHODS[0], cluster, params, compute_seconds, **kwargs)
    for p in out:
        p.speedup = dense.step_seconds / p.step_seconds
    return out


# ------------------------------------------------------------------ calibration on this machine
class LoopbackComm:
    """A stand-in for :class:`commlib.comm.queue.Comm` in which all ``world_size`` ranks hold this
    rank's data: every collective returns what it would with identical ranks, so a hook does all
    of its per-rank compute (decompressing every rank's payload) without a network."""

    def __init__(self, world_size: int):
        self.world_size, self.rank, self.bytes_sent = world_size, 0, 0

    def all_reduce(self, tensor):
        return tensor.mul_(self.world_size)

    def all_gather(self, tensor):
        return [tensor.clone() for _ in range(self.world_size)]

    def all_to_all(self, flat):
        per_rank = flat.numel() // self.world_size
        return flat[:per_rank].repeat(self.world_size)


def _hook_job(method: Method, numel: int, world: int, device):
    """A callable running ``method``'s hook code once on a gradient of ``numel`` elements."""
    from commlib import compress
    from commlib.hooks.allreduce import CastState
    from commlib.hooks.ef import ErrorFeedbackState
    from commlib.hooks.powersgd import PowerSGDState
    from commlib.hooks.state import ParamView

    cols = max(1, int(math.sqrt(numel / 4)))
    grad_shape = (numel // (4 * cols), 4 * cols) if numel >= 4 else (numel, 1)
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(grad_shape, generator=gen).to(device)
    grad = source.clone()
    comm = LoopbackComm(world)
    if method.pattern == "allreduce" and method.name.startswith("PowerSGD"):
        state = PowerSGDState(rank=method.options["rank"], start_iter=2)
        view = ParamView("w", grad, 0)
        step = [2]

        def run():
            grad.copy_(source)
            step[0] += 1
            state.reduce(comm, [view], [view], [], step[0])
        return run
    if method.name.startswith("fp16"):
        state = CastState(dtype=torch.float16)
        job = state.compressed_job(grad.view(-1), [], 2, 0)
        return lambda: (grad.copy_(source), job(comm))
    compressor = {"two_phase": compress.Sign() if "sign" in method.name else compress.QSGD(bits=4),
                  "allgather": compress.TopK(0.01)}[method.pattern]
    collective = "two_phase" if method.pattern == "two_phase" else "allgather"
    state = ErrorFeedbackState(compressor=compressor, collective=collective)
    view = ParamView("w", grad, 0)
    step = [2]

    def run():
        grad.copy_(source)
        step[0] += 1
        state.reduce_compressed(comm, [view], step[0])
    return run


def calibrate(methods=None, *, numel: int = 1 << 22, world: int = 2, repeats: int = 5, device=None,
              threads: int | None = None) -> dict[str, float]:
    """Seconds per gradient element of each method's hook, timed on this machine: the real hook
    code (fused kernels included) on one ``numel``-element matrix, in a world of ``world``
    identical ranks (:class:`LoopbackComm`), median of ``repeats`` after one warm-up. The copy
    that restores the gradient each repeat is timed alone and subtracted."""
    methods = [m for m in (METHODS if methods is None else methods) if m.bytes_per_element > 0]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        def median_seconds(fn) -> float:
            fn()
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            return sorted(times)[len(times) // 2]

        a = torch.empty(numel, device=device)
        b = torch.empty(numel, device=device)
        restore = median_seconds(lambda: a.copy_(b))
        costs = {}
        for m in methods:
            job = _hook_job(m, numel, world, device)
            costs[m.name] = max(0.0, median_seconds(job) - restore) / numel
        return costs
    finally:
        torch.set_num_threads(previous)


def compute_seconds_for(params: float, tokens: float, tflops: float) -> float:
    """Forward + backward of a transformer step: ``6 * params * tokens`` FLOPs at ``tflops``."""
    return 6 * params * tokens / (tflops * 1e12)


def hidden_for(params: float) -> int:
    """A GPT-like width for ``params`` (12 L d^2 parameters with depth L ~ d / 85: 2048 at 1.3B)."""
    return int(round((params / 12 * 85) ** (1 / 3) / 64) * 64) or 64


def report(predictions: list[Prediction], cluster: Cluster, params: float, assumptions: list[str]) -> str:
    lines = [f"{params / 1e9:.2f}B parameters on {cluster.nodes} nodes x {cluster.gpus_per_node} GPUs, "
             f"{cluster.gbit:g} Gbit/s per node", ""]
    width = max(26, *(len(p.method) for p in predictions))
    lines.append(f"{'method':<{width}} {'speedup':>8} {'step ms':>9} {'hook ms':>8} {'comm ms':>9} {'exposed':>8} "
                 f"{'MB sent/rank':>12}")
    for p in predictions:
        lines.append(f"{p.method:<{width}} {p.speedup:>7.2f}x {1e3 * p.step_seconds:>9.1f} {1e3 * p.hook_seconds:>8.1f} "
                     f"{1e3 * p.comm_seconds:>9.1f} {1e3 * p.exposed_comm_seconds:>8.1f} {p.payload_bytes / 1e6:>12.2f}")
    dense = predictions[0]
    best = max(predictions, key=lambda p: p.speedup)
    per_step = max((p for p in predictions if not p.method.startswith("DiLoCo")), key=lambda p: p.speedup)
    lines.append("")
    local = [p for p in predictions if p.method.startswith("DiLoCo")]
    if local:
        top = max(local, key=lambda p: p.speedup)
        exposed = per_step.exposed_comm_seconds / per_step.step_seconds
        if top.speedup > 1.1 * per_step.speedup:
            lines.append(f"Local steps: {top.method} at {top.speedup:.2f}x beats the best per-step method "
                         f"({per_step.method}, {per_step.speedup:.2f}x, which still exposes {100 * exposed:.0f}% of "
                         "its step): prefer it if its loss holds at equal samples (it changes the optimisation; "
                         "README 'Slow links').")
        else:
            lines.append(f"Local steps gain little here ({top.method} {top.speedup:.2f}x against "
                         f"{per_step.method} {per_step.speedup:.2f}x): stay with per-step methods, which keep "
                         "the data-parallel optimisation.")
    if best.speedup < 1.1:
        lines.append(f"Compression does not pay here (best: {best.method}, {best.speedup:.2f}x). "
                     f"Dense all-reduce exposes {1e3 * dense.exposed_comm_seconds:.1f} ms of "
                     f"{1e3 * dense.step_seconds:.1f} ms. {AGARWAL}.")
    else:
        lines.append(f"Best: {best.method} at {best.speedup:.2f}x; dense all-reduce exposes "
                     f"{1e3 * dense.exposed_comm_seconds:.1f} ms of communication per step.")
        if dense.exposed_comm_seconds < 0.1 * dense.step_seconds:
            lines.append(f"Warning: the gain is small next to the step. {AGARWAL}.")
    lines.append("")
    lines.append("Assumptions:")
    lines.extend(f"  - {a}" for a in assumptions)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m commlib.advise", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, required=True, help="model parameters, e.g. 1.3e9")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gbit", type=float, required=True, help="inter-node bandwidth per node, Gbit/s")
    parser.add_argument("--latency-us", type=float, default=10.0)
    parser.add_argument("--efficiency", type=float, default=0.9, help="share of the link a collective achieves")
    parser.add_argument("--step-ms", type=float, help="compute time of one step without communication")
    parser.add_argument("--tokens", type=float, default=8192, help="tokens per GPU per step (if no --step-ms)")
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved TFLOP/s per GPU (if no --step-ms)")
    parser.add_argument("--grad-bytes", type=int, default=4, choices=[2, 4], help="bytes per gradient element")
    parser.add_argument("--hidden", type=int, help="model width (default: a GPT-like width for --params)")
    parser.add_argument("--overlap", type=float, default=0.5, help="share of compute that hides communication")
    parser.add_argument("--mem-gbps", type=float, default=2000.0, help="device memory bandwidth, GB/s")
    parser.add_argument("--calibrate", action="store_true", help="time each hook on this machine (a few seconds)")
    parser.add_argument("--sync-every", type=int, default=0,
                        help="also model DiLoCo-style local steps with a sync every H inner steps")
    args = parser.parse_args(argv)
    for name in ("params", "nodes", "gpus_per_node", "gbit", "tokens", "tflops", "mem_gbps"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0.0 <= args.overlap <= 1.0:
        parser.error("--overlap must be in [0, 1]")
    if not 0.0 < args.efficiency <= 1.0:
        parser.error("--efficiency must be in (0, 1]")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gbit, args.latency_us, args.efficiency)
    hidden = args.hidden or hidden_for(args.params)
    compute = (args.step_ms / 1e3 if args.step_ms is not None
               else compute_seconds_for(args.params, args.tokens, args.tflops))
    assumptions = [
        f"compute per step {1e3 * compute:.1f} ms "
        + ("(--step-ms)" if args.step_ms is not None else
           f"(6 x params x {args.tokens:g} tokens at {args.tflops:g} TFLOP/s)"),
        f"gradients of {args.grad_bytes} bytes, DDP buckets of 25 MB; matrices of ({hidden}, {4 * hidden})",
        f"links at {100 * args.efficiency:.0f}% of {args.gbit:g} Gbit/s, {args.latency_us:g} us per message; "
        "all-reduce a ring over all ranks; the two-level hooks' intra-node hops at 200 GB/s per GPU",
        f"communication hides behind {100 * args.overlap:.0f}% of compute",
    ]
    costs = None
    if args.calibrate:
        started = time.perf_counter()
        costs = calibrate()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        assumptions.append(f"hook costs timed on this machine's {device} in {time.perf_counter() - started:.1f} s: "
                           + ", ".join(f"{k} {1e9 * v:.2f} ns/element" for k, v in costs.items()))
    else:
        assumptions.append(f"hook costs = memory traffic of the fused path / {args.mem_gbps:g} GB/s "
                           "(pass --calibrate to time them on this machine)")
    if args.sync_every < 0:
        raise SystemExit("--sync-every must be >= 0")
    predictions = advise(cluster, args.params, compute, costs=costs, grad_bytes=args.grad_bytes, hidden=hidden,
                         overlap=args.overlap, mem_gbps=args.mem_gbps, sync_every=args.sync_every)
    print(report(predictions, cluster, args.params, assumptions))


if __name__ == "__main__":
    main()
