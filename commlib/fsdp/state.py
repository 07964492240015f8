"""``compress_gradients``: install a compressed reduce-scatter on every FSDP2 module of a model."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from commlib.comm.rank_state import (
    FORMAT,
    agree_on_load,
    byte_books,
    check_format,
    check_on_mismatch,
    compression_ratio,
    missing_tensors,
    options_differ,
    pick_rank_state,
    require_initialized,
    settle_load,
    tensor_keys,
)
from commlib.compress import Compressor
from commlib.fsdp import codec
from commlib.fsdp.reduce_scatter import CompressedReduceScatter
from commlib.fsdp.replicate import ReplicaCompression, group_of, module_mesh
from commlib.fsdp.torch_internals import padded_shard_shapes, restore_default_reduce_scatter
from commlib.validation import integer, one_of

RESIDUAL_DTYPES = {False: None, True: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}


def fsdp_modules(module: torch.nn.Module) -> list[tuple[str, FSDPModule]]:
    """Every ``fully_shard``-ed module under (and including) ``module``, with its name, in module order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, FSDPModule)]


class GradientCompression:
    r"""The books of a compressed FSDP2 reduce-scatter; made by :func:`compress_gradients`.

    ``stats()`` reports the last step's and the running bytes (``bytes_sent``, ``bytes_dense``,
    ``compression_ratio``, ``per_module``, ``residual_bytes``); ``state_dict()`` holds this rank's
    residuals and PowerSGD warm starts under ``rank{r}`` (weights_only, refused on another rank,
    world size, model or option set unless ``on_mismatch="reset"``, which drops them). Checkpoint
    it with ``torch.distributed.checkpoint`` through :class:`commlib.checkpoint.HookStateful`, or
    with :func:`commlib.hooks.gather_state_dict` when rank 0 writes one file.
    """

    name = "fsdp_compress"
    per_rank_buffers = ("residuals", "warm_q", "replica_residuals")

    def __init__(self, compressor: Compressor, error_feedback=False, process_group=None, seed: int = 0,
                 hierarchical="auto", topology=None):
        if not isinstance(compressor, Compressor):
            raise ValueError(f"compressor must be a commlib.compress.Compressor, got {type(compressor).__name__}")
        if not (error_feedback is False or error_feedback is True or error_feedback in ("fp32", "bf16")):
            raise ValueError(f"error_feedback must be False, True (float32 residual) or 'bf16', got {error_feedback!r}")
        integer("seed", seed, 0)
        self.compressor = compressor
        self.error_feedback = {False: False, True: "fp32"}.get(error_feedback, error_feedback)
        self.residual_dtype = RESIDUAL_DTYPES[error_feedback]
        self.process_group = process_group
        self.seed = seed
        one_of("hierarchical", hierarchical, ("auto", True, False))
        self.hierarchical, self.topology = hierarchical, topology
        self._two_hop: dict = {}
        self.comms: list[CompressedReduceScatter] = []
        self.replica: ReplicaCompression | None = None  # HSDP: the compressed replica all-reduce
        self.pool = codec.BufferPool()
        # random-k's indices are rebuilt by the receiver from the seed: every sender uses the row's seed
        self.shared_seed = bool(compressor.compress(torch.zeros(8), seed=0).context)

    def two_hop(self, group):
        """``(intra Comm, rail group, L, N)`` when the reduce-scatter over ``group`` takes two hops
        (qgZ: several nodes of L consecutive ranks, ``hierarchical`` not False, no HSDP replicas),
        else None; decided once per group (at the first backward, every rank alike)."""
        key = id(group)
        if key not in self._two_hop:
            self._two_hop[key] = self._resolve_two_hop(group)
        return self._two_hop[key]

    def _resolve_two_hop(self, group):
        from commlib.comm.queue import Comm
        from commlib.comm.topology import Topology, node_groups

        if self.hierarchical is False or self.replica is not None:
            return None
        topology = self.topology or Topology.detect()
        explicit = self.hierarchical is True
        if topology is None:
            if explicit:
                raise ValueError("hierarchical=True needs a topology: pass topology=Topology(ranks_per_node=L)")
            return None
        ranks = dist.get_process_group_ranks(group)
        try:
            layout = topology.layout(ranks)
        except ValueError:
            if explicit:
                raise
            return None
        local = layout.ranks_per_node
        consecutive = all(node == tuple(ranks[k * local : (k + 1) * local]) for k, node in enumerate(layout.nodes))
        if not layout.hierarchical or not consecutive:
            if explicit and not consecutive:
                raise ValueError(f"the two-hop reduce-scatter needs each node's ranks consecutive in FSDP's group, "
                                 f"got nodes {layout.describe()}")
            return None
        intra, rail = node_groups(layout, base=group)
        return Comm(intra), rail, local, layout.node_count

    def all_to_all(self, recv: torch.Tensor, send: torch.Tensor, group) -> None:
        dist.all_to_all_single(recv.view(-1), send.view(-1), group=group)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        sent = sum(c.bytes_sent for c in self.comms)
        dense = sum(c.bytes_dense for c in self.comms)
        inter = self.replica.stats() if self.replica is not None else None
        if inter is not None:
            sent, dense = sent + inter["bytes_sent"], dense + inter["bytes_dense"]
        out = {
            **byte_books(self.name, max((c.step for c in self.comms), default=0), sent, dense,
                         sum(c.total_bytes_sent for c in self.comms), sum(c.total_bytes_dense for c in self.comms),
                         max((c.skipped_steps for c in self.comms), default=0)),
            "compressor": repr(self.compressor),
            "error_feedback": self.error_feedback,
            "residual_bytes": self.residual_bytes(),
            "buffer_bytes": self.pool.nbytes(),
            "hook_seconds": sum(c.seconds for c in self.comms),
            "per_module": {c.name: {"bytes_sent": c.bytes_sent, "bytes_dense": c.bytes_dense,
                                    "compression_ratio": compression_ratio(c.bytes_dense, c.bytes_sent),
                                    "step": c.step}
                           for c in self.comms},
        }
        if inter is not None:
            out["inter_node"] = inter
            out["total_bytes_sent"] += inter["total_bytes_sent"]
            out["total_bytes_dense"] += inter["total_bytes_dense"]
            out["skipped_steps"] = max(out["skipped_steps"], inter["skipped_steps"])
            out["step"] = max(out["step"], max(self.replica.steps.values(), default=0))
        return out

    def residual_bytes(self) -> int:
        """Memory this rank holds for error feedback (and PowerSGD warm starts)."""
        total = sum(c.residual.numel() * c.residual.element_size() for c in self.comms if c.residual is not None)
        if self.replica is not None:  # HSDP: the residuals of the shards' replica all-reduce
            total += sum(t.numel() * t.element_size() for t in self.replica.engine.residuals.values())
        return total + sum(q.numel() * q.element_size() for c in self.comms for q in c.warm_q.values())

    # ------------------------------------------------------------------ checkpoints
    def options(self) -> dict:
        return {"compressor": repr(self.compressor), "error_feedback": str(self.error_feedback), "seed": self.seed,
                "hsdp": list(self.replica.mesh_shape) if self.replica is not None else None,
                "reduce_scatter": "compressed" if self.comms else "dense", "hierarchical": str(self.hierarchical)}

    def _rank_world(self) -> tuple[int, int]:
        require_initialized()
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def buffers_state(self) -> dict:
        return {
            "residuals": {c.name or "root": c.residual for c in self.comms if c.residual is not None},
            "warm_q": {f"{c.name or 'root'}/{j}/{s}": q for c in self.comms for (j, s), q in sorted(c.warm_q.items())},
            "replica_residuals": dict(self.replica.engine.residuals) if self.replica is not None else {},
            "replica_steps": dict(self.replica.steps) if self.replica is not None else {},
        }

    def state_dict(self) -> dict:
        rank, world = self._rank_world()
        buffers = self.buffers_state()
        mine = {
            "rank": rank, "world_size": world, "method": self.name, "options": self.options(),
            "modules": [c.name for c in self.comms],
            "steps": [c.step for c in self.comms],
            "skipped_steps": [c.skipped_steps for c in self.comms],
            "totals": [[c.total_bytes_sent, c.total_bytes_dense] for c in self.comms],
            "tensor_keys": "\n".join(tensor_keys(buffers)),
            "buffers": buffers,
        }
        return {"format": FORMAT, "method": self.name, "world_size": world, f"rank{rank}": mine}

    def load_state_dict(self, state: dict, *, on_mismatch: str = "error") -> None:
        """Load a :meth:`state_dict` (or a gathered one). A state of another rank or world size
        raises ValueError, or with ``on_mismatch="reset"`` restarts with empty residuals; other
        options or another module list always raise. Every rank reaches the same verdict."""
        check_on_mismatch(on_mismatch)
        check_format(state, self.name)
        rank, world = self._rank_world()
        mine, problems = pick_rank_state(state, rank, world, self.name)
        fatal = self._unfit(mine) or (None if problems else self._misshapen(mine, world))
        reset = settle_load(self.name, agree_on_load(fatal, problems, self.process_group), fatal, problems,
                            on_mismatch, "Its error-feedback residuals (a reset starts with empty ones)")
        buffers = mine["buffers"]
        for c, step, skipped, (sent, dense) in zip(self.comms, mine["steps"], mine["skipped_steps"], mine["totals"]):
            c.step, c.skipped_steps = int(step), int(skipped)
            c.total_bytes_sent, c.total_bytes_dense = int(sent), int(dense)
            key = c.name or "root"
            c.residual = None
            c.warm_q = {}
            if reset:
                continue
            if key in buffers["residuals"]:
                c.residual = buffers["residuals"][key].clone()
            for name, q in buffers["warm_q"].items():
                owner, j, s = name.rsplit("/", 2)
                if owner == key:
                    c.warm_q[(int(j), int(s))] = q.clone()
        if self.replica is not None:
            self.replica.engine.residuals = ({} if reset else
                                             {k: v.clone() for k, v in buffers.get("replica_residuals", {}).items()})
            self.replica.steps = {k: int(v) for k, v in buffers.get("replica_steps", {}).items()}

    def _misshapen(self, mine: dict, world: int) -> str | None:
        """A saved residual whose shape is not this module's ``(world, chunk)`` (``chunk``: the sum
        of its padded shard sizes) would be re-zeroed at the first step: refuse it instead."""
        for c in self.comms:
            saved = mine["buffers"]["residuals"].get(c.name or "root")
            if saved is None or not c.param_shapes:
                continue
            chunk = sum(math.prod(shape) for shape in c.param_shapes)
            if tuple(saved.shape) not in ((world, chunk), (world // self.ranks_per_node(), chunk)):
                return (f"fsdp_compress state: the residual saved for module {c.name or 'root'!r} has shape "
                        f"{tuple(saved.shape)}, this model's is {(world, chunk)}: another model or sharding")
        return None

    def ranks_per_node(self) -> int:
        """L of the two-hop reduce-scatter's topology (1 when it is flat)."""
        from commlib.comm.topology import Topology

        topology = self.topology or (Topology.detect() if self.hierarchical is not False else None)
        return topology.ranks_per_node or 1 if topology is not None and self.replica is None else 1

    def _unfit(self, mine: dict) -> str | None:
        differ = options_differ(mine["options"], self.options())
        if differ:
            return f"fsdp_compress state was saved with other options: {differ}"
        if list(mine["modules"]) != [c.name for c in self.comms]:
            return (f"fsdp_compress state was saved for FSDP modules {list(mine['modules'])[:4]}..., this model has "
                    f"{[c.name for c in self.comms][:4]}...")
        missing = missing_tensors(mine)
        if missing:
            return (f"fsdp_compress state lacks {len(missing)} saved tensors (e.g. {missing[0]!r}): checkpoint it "
                    "with commlib.checkpoint.HookStateful(state)")
        return None

    def remove(self) -> None:
        """Put FSDP's default reduce-scatter back on every module."""
        for c in self.comms:
            restore_default_reduce_scatter(c.module)
        self.comms = []


def compress_gradients(module: torch.nn.Module, compressor: Compressor, *, error_feedback=False,
                       process_group=None, seed: int = 0, replicate=None, reduce_scatter: str | None = None,
                       collective: str = "auto", hierarchical="auto", topology=None) -> GradientCompression:
    r"""Compress FSDP2's gradient reduce-scatter on every ``fully_shard``-ed module under ``module``.

    Arguments:
        module: the model after ``fully_shard`` (its submodules and itself).
        compressor: any :mod:`commlib.compress` compressor. Element-wise ones compress each
            destination's row of FSDP's flat buffer; PowerSGD compresses each parameter's shard rows
            as a matrix (biases dense).
        error_feedback: ``False``; ``True`` (a float32 residual of the padded unsharded gradient per
            module: 4 bytes per parameter on every rank); ``"bf16"`` (the same residual in bfloat16:
            half the memory, rounding the residual to 8 mantissa bits).
        process_group: for the state's checks (FSDP passes its own group to each call).
        seed: base of the per-(step, module, row) seeds of the stochastic compressors.
        replicate: for HSDP, the replicas' mesh (``mesh["replicate"]``) or process group, with
            the model ``fully_shard``-ed on ``mesh["shard"]`` (one node): the all-reduce of each shard
            across the replicas, the hop that crosses nodes, is then compressed with error feedback
            (:mod:`commlib.fsdp.replicate`). A model sharded on a 2-D mesh (FSDP2's native HSDP,
            whose dense all-reduce no public API replaces) is refused with this recipe.
        reduce_scatter: ``"compressed"`` or ``"dense"``: whether FSDP's reduce-scatter is compressed.
            Default: compressed without ``replicate``, dense with it (it stays inside the node).
        collective: for the HSDP replica all-reduce, as the ``ef`` hook's (``"auto"``,
            ``"allreduce"``, ``"allgather"``, ``"two_phase"``).
        hierarchical, topology: for plain ``fully_shard`` over several nodes (no ``replicate``): the
            compressed reduce-scatter takes two hops (ZeRO++'s qgZ: dense inside the node, the
            node's sums compressed across it, error feedback on those) when ``"auto"`` finds several
            nodes of several ranks (``topology``, or :meth:`commlib.comm.Topology.detect`).

    Example::

        >>> import torch, torch.distributed as dist                                   # doctest: +SKIP
        >>> from torch.distributed.fsdp import fully_shard    # doctest: +SKIP
        >>> from commlib.compress import QSGD    # doctest: +SKIP
        >>> from commlib.fsdp import compress_gradients    # doctest: +SKIP
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))    # doctest: +SKIP
        >>> for layer in model: fully_shard(layer)    # doctest: +SKIP
        >>> fully_shard(model)    # doctest: +SKIP
        >>> state = compress_gradients(model, QSGD(bits=8))    # doctest: +SKIP
        >>> model(torch.randn(4, 64)).sum().backward()    # doctest: +SKIP
        >>> state.stats()["compression_ratio"]   # about 3.9    # doctest: +SKIP
    """
    if reduce_scatter not in (None, "compressed", "dense"):
        raise ValueError(f"reduce_scatter must be 'compressed', 'dense' or None, got {reduce_scatter!r}")
    state = GradientCompression(compressor, error_feedback, process_group, seed, hierarchical, topology)
    found = fsdp_modules(module)
    if not found:
        raise ValueError("module has no fully_shard-ed (FSDPModule) parts: call fully_shard before compress_gradients")
    mesh = next((mesh for _, m in found if (mesh := module_mesh(m)) is not None), None)
    if mesh is not None and mesh.ndim == 2:
        raise ValueError("this model is sharded on a 2-D (replicate, shard) mesh: FSDP2's native HSDP all-reduces "
                         "across replicas densely and no public API replaces that hop. Shard on mesh['shard'] and "
                         "pass replicate=mesh['replicate']: commlib then runs the replica all-reduce, compressed")
    if replicate is not None:  # HSDP: compress the hop that crosses nodes
        shard_group = mesh.get_group() if mesh is not None else dist.group.WORLD
        state.replica = ReplicaCompression(compressor, error_feedback, collective, seed, group_of(replicate),
                                           shard_group)
        for name, m in found:
            m.set_all_reduce_hook(state.replica.hook_for(name))
    if reduce_scatter == "compressed" or reduce_scatter is None and replicate is None:
        for index, (name, m) in enumerate(found):
            comm = CompressedReduceScatter(state, index, name, padded_shard_shapes(m))
            comm.module = m
            m.set_custom_reduce_scatter(comm)
            state.comms.append(comm)
    return state
