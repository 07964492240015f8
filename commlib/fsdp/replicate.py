"""HSDP's inter-node hop, compressed: the all-reduce of each shard across replicas.

HSDP shards a model inside each node and replicates it across nodes: each gradient is
reduce-scattered inside the node, then each rank's shard is all-reduced across the replicas (the
nodes). Only that second hop crosses the NICs, so that is the one to compress.

FSDP2's native HSDP (``fully_shard(m, mesh=<2-D mesh>)``) runs that all-reduce itself, densely,
and public FSDP2 API cannot replace it (``set_requires_all_reduce(False)`` means gradient
accumulation there: the gradients are then not assigned). So commlib's HSDP is FSDP2 on the
node's 1-D ``shard`` sub-mesh, plus the replica all-reduce in FSDP's public all-reduce hook::

    mesh = init_device_mesh("cuda", (nodes, gpus_per_node), mesh_dim_names=("replicate", "shard"))
    fully_shard(layer, mesh=mesh["shard"]) ...           # FSDP inside the node
    compress_gradients(model, QSGD(bits=4), error_feedback=True, replicate=mesh["replicate"])

FSDP then calls ``hook(reduce_output)`` after its reduce-scatter, and the hook averages the shard
over the replicas with any element-wise compressor and classic error feedback on the shard (a
residual of 1/S of the module per rank), through the collective that suits the compressor (the
``ef`` hook's :meth:`~commlib.hooks.ef.ErrorFeedbackState.reduce_compressed`, over a private
replica group). With ``Identity`` it equals native HSDP.

Rule 5 across the two hops: before compressing, the ranks of the shard group agree (one 4-byte
all-reduce inside the node) on whether any of their shards is non-finite; if so every rank poisons
its shard, so every replica group sees the overflow, every rank's gradient is non-finite and every
error-feedback gate keeps its residual.
"""

from __future__ import annotations

import torch

from commlib.comm.groups import private_group
from commlib.comm.queue import Comm
from commlib.comm.rank_state import byte_books
from commlib.compress import Compressor, PowerSGD


def module_mesh(module):
    """The device mesh of an FSDP module's parameters (None if it has none of its own)."""
    for p in module.parameters(recurse=False):
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            return mesh
    return None


def group_of(replicate):
    """A process group from a 1-D DeviceMesh or a process group."""
    if hasattr(replicate, "get_group"):
        if replicate.ndim != 1:
            raise ValueError(f"replicate must be a 1-D mesh (mesh['replicate']), got a {replicate.ndim}-D one")
        return replicate.get_group()
    return replicate


class ReplicaCompression:
    """The compressed replica all-reduce of every FSDP module of an HSDP model (one engine: an
    unbound :class:`~commlib.hooks.ef.ErrorFeedbackState`, whose residuals are keyed by module)."""

    def __init__(self, compressor: Compressor, error_feedback: bool, collective: str, seed: int, replicate_group,
                 shard_group):
        from commlib.hooks.ef import ErrorFeedbackState

        if isinstance(compressor, PowerSGD):
            raise ValueError("the HSDP replica all-reduce compresses flat shards: PowerSGD needs matrices; use an "
                             "element-wise compressor (QSGD, Sign, TopK, RandomK, Cast)")
        self.engine = ErrorFeedbackState(compressor=compressor, collective=collective,
                                         error_feedback=bool(error_feedback), seed=seed, start_iter=2)
        self.replicas = Comm(private_group(replicate_group))
        self.shards = Comm(private_group(shard_group))
        self.mesh_shape = (self.replicas.world_size, self.shards.world_size)
        self.steps: dict[str, int] = {}
        self.last: dict[str, tuple[int, int]] = {}  # module -> (bytes sent, dense) of its last call
        self.total_sent = self.total_dense = 0

    def hook_for(self, name: str):
        key = name or "root"

        def all_reduce_hook(reduce_output: torch.Tensor) -> None:
            from commlib.hooks.state import ParamView

            step = self.steps.get(key, 0)
            self.steps[key] = step + 1
            flat = reduce_output.view(-1)
            if flat.numel() == 0:
                return
            finite = torch.isfinite(flat).all().to(torch.float32).reshape(1)
            self.shards.all_reduce(finite)  # every shard of this node finite?
            if float(finite[0]) != self.shards.world_size:
                flat.add_(float("nan"))  # poison: every replica group sees it, every gate skips alike
            sent, dense = self.engine._step_payload, self.engine._step_dense
            self.engine.reduce_compressed(self.replicas, [ParamView(key, flat, 0)], step)
            sent, dense = self.engine._step_payload - sent, self.engine._step_dense - dense
            self.last[key] = (sent, dense)
            self.total_sent += sent
            self.total_dense += dense

        return all_reduce_hook

    def stats(self) -> dict:
        sent = sum(s for s, _ in self.last.values())
        dense = sum(d for _, d in self.last.values())
        return {**byte_books("hsdp_replica", max(self.steps.values(), default=0), sent, dense, self.total_sent,
                             self.total_dense, self.engine.skipped_steps),
                "replicas": self.replicas.world_size, "shards": self.shards.world_size,
                "wire_bytes_total": self.replicas.bytes_sent,
                "residual_bytes": sum(t.numel() * t.element_size() for t in self.engine.residuals.values())}
