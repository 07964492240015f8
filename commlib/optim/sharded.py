"""Low-rank optimizers on FSDP2's row-sharded (DTensor ``Shard(0)``) parameters: explicit, counted collectives.

FSDP2 shards each parameter matrix ``W`` (m x n) by rows, ``torch.chunk``-style: with
``c = ceil(m / W)``, rank ``i`` holds rows ``[i c, min((i+1) c, m))`` (possibly none). The projected
step then needs (per matrix; ``r`` the rank, all sizes in elements):

============================  ==============================  =====================================
operation                     right side (m >= n; B: r x n)   left side (m < n; A: m x r)
============================  ==============================  =====================================
project ``R``                 ``G_i Bᵀ``: local               ``sum_i A_iᵀ G_i``: reduce-scatter of
                                                              ``r n`` by columns, every step
Adam moments                  ``m_i x r``: sharded like W     ``r x n/W`` columns: sharded
back-project                  ``N_i B``: local                all-gather ``N`` (``r n``), ``A_i N``
refresh ``svd``               all-gather ``G`` (``m n``)      all-gather ``G`` (``m n``), then an
                                                              all-reduce of ``r`` sign-alignment dots
refresh ``dct``               all-reduce of ``n`` scores      all-gather ``G`` (``m n``)
refresh ``random``            none (seeded)                   none (seeded, own rows kept)
============================  ==============================  =====================================

Sides are decided on the *global* shape (a shard's local shape would flip square matrices and
disagree across uneven shards). Fira adds a scalar all-reduce (the residual's norm) and, on the
left side, an all-gather of ``R`` for its residual; FRUGAL the same all-gather on the left side.
Everything else (dense AdamW of 1-D and unprojected parameters, FRUGAL's blocks) is element-wise
and local. Optimizer state is stored as DTensors sharded like the computation above, so
``torch.distributed.checkpoint`` saves it with its sharding; per-rank state is about 1/W of the
unsharded optimizer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from commlib.comm.patterns import ring_bytes


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "_local_tensor") and hasattr(t, "device_mesh")


def local(t):
    """The local tensor of a DTensor (in place: writes reach the DTensor), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


@dataclass
class RowShard:
    """Where this rank's rows of an (m x n) matrix lie, and the group to talk to."""

    mesh: object
    group: object
    rank: int
    world: int
    shape: tuple[int, int]  # global matrix shape
    param_shape: tuple[int, ...]

    @property
    def row_chunk(self) -> int:
        return -(-self.shape[0] // self.world)

    @property
    def col_chunk(self) -> int:
        return -(-self.shape[1] // self.world)

    def rows_of(self, rank: int) -> tuple[int, int]:
        c = self.row_chunk
        return min(rank * c, self.shape[0]), min((rank + 1) * c, self.shape[0])

    def cols_of(self, rank: int) -> tuple[int, int]:
        c = self.col_chunk
        return min(rank * c, self.shape[1]), min((rank + 1) * c, self.shape[1])


def row_shard_of(p: torch.Tensor) -> RowShard | None:
    """The row sharding of a DTensor parameter: ``Shard(0)`` on a 1-D mesh (FSDP2), or
    ``(Replicate(), Shard(0))`` on a 2-D ``(replicate, shard)`` mesh (HSDP: every replica holds the
    same shards and, its gradients being averaged across replicas, steps them alike; the
    optimizer's collectives run in the shard group). None for a plain tensor."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    rows = placements and isinstance(placements[-1], Shard) and placements[-1].dim == 0
    replicated = all(isinstance(x, Replicate) for x in placements[:-1])
    if not (rows and replicated and mesh.ndim == len(placements) and mesh.ndim in (1, 2)):
        raise ValueError(f"low-rank optimizers support parameters sharded by rows on a 1-D mesh (FSDP2's Shard(0)) "
                         f"or replicated x row-sharded on a 2-D mesh (HSDP), got placements {p.placements} on a "
                         f"{mesh.ndim}-D mesh")
    shape = tuple(p.shape)
    matrix = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (shape[0] if shape else 1, 1)
    group = mesh.get_group(mesh.ndim - 1)
    return RowShard(mesh, group, dist.get_rank(group), dist.get_world_size(group), matrix, shape)


def wrap(local_tensor: torch.Tensor, shard: RowShard, layout: str, global_shape) -> torch.Tensor:
    """A DTensor around a local piece of optimizer state: ``rows`` (Shard(0)), ``cols`` (Shard(1)) or
    ``replicate``, with the global shape given (uneven ``torch.chunk`` pieces)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placement = {"rows": Shard(0), "cols": Shard(1), "replicate": Replicate()}[layout]
    global_shape = torch.Size(global_shape)
    stride = torch.empty(global_shape, device="meta").stride()
    placements = [Replicate()] * (shard.mesh.ndim - 1) + [placement]  # HSDP: the same on every replica
    return DTensor.from_local(local_tensor, shard.mesh, placements, run_check=False, shape=global_shape,
                              stride=stride)


class CommCounter:
    """The collectives of a sharded optimizer step, with the bytes each rank sends (counted as the
    payload a ring algorithm moves per rank: ``(W-1)/W`` of the buffer, twice for all-reduce)."""

    def __init__(self):
        self.bytes = {"all_gather": 0, "all_reduce": 0, "reduce_scatter": 0}
        self.calls = {"all_gather": 0, "all_reduce": 0, "reduce_scatter": 0}

    def count(self, kind: str, numel: int, element_size: int, world: int) -> None:
        self.bytes[kind] += ring_bytes(kind, numel * element_size, world)
        self.calls[kind] += 1

    # ---------------------------------------------------------------- collectives
    def all_gather_rows(self, part: torch.Tensor, shard: RowShard) -> torch.Tensor:
        """The whole (m x n) matrix from every rank's rows."""
        m, n = shard.shape
        c = shard.row_chunk
        padded = torch.zeros(c, n, dtype=part.dtype, device=part.device)
        padded[: part.shape[0]] = part
        out = torch.empty(shard.world * c, n, dtype=part.dtype, device=part.device)
        dist.all_gather_single(out, padded, group=shard.group)
        self.count("all_gather", out.numel(), out.element_size(), shard.world)
        return out[:m]

    def all_reduce_(self, t: torch.Tensor, shard: RowShard) -> torch.Tensor:
        dist.all_reduce(t, group=shard.group)
        self.count("all_reduce", t.numel(), t.element_size(), shard.world)
        return t

    def reduce_scatter_cols(self, partial: torch.Tensor, shard: RowShard) -> torch.Tensor:
        """This rank's columns of ``sum_ranks partial`` (``partial``: r x n)."""
        r, n = partial.shape
        c = shard.col_chunk
        padded = torch.zeros(r, shard.world * c, dtype=partial.dtype, device=partial.device)
        padded[:, :n] = partial
        blocks = padded.view(r, shard.world, c).transpose(0, 1).contiguous()  # (W, r, c): block j to rank j
        out = torch.empty(r, c, dtype=partial.dtype, device=partial.device)
        dist.reduce_scatter_single(out, blocks.view(shard.world * r, c), group=shard.group)
        self.count("reduce_scatter", blocks.numel(), blocks.element_size(), shard.world)
        lo, hi = shard.cols_of(shard.rank)
        return out[:, : hi - lo].contiguous()

    def all_gather_cols(self, part: torch.Tensor, shard: RowShard) -> torch.Tensor:
        """The whole (r x n) matrix from every rank's columns."""
        r = part.shape[0]
        n, c = shard.shape[1], shard.col_chunk
        padded = torch.zeros(r, c, dtype=part.dtype, device=part.device)
        padded[:, : part.shape[1]] = part
        out = torch.empty(shard.world * r, c, dtype=part.dtype, device=part.device)
        dist.all_gather_single(out, padded, group=shard.group)
        self.count("all_gather", out.numel(), out.element_size(), shard.world)
        return out.view(shard.world, r, c).transpose(0, 1).reshape(r, shard.world * c)[:, :n]

    def stats(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "total_bytes": sum(self.bytes.values())}
