"""Which ranks share a node: the intra-node groups and the inter-node "rails" of a process group.

A node has L GPUs joined by a fast fabric (NVLink), and nodes are joined by NICs. A compressed
exchange that every rank runs with every other rank crosses the NIC once per rank (node egress
~ L C); the two-level pattern (Horovod's hierarchical all-reduce, ZeRO++ qgZ) reduces inside the
node first, so that each local rank exchanges 1/L of the node's sum with the ranks of the same
local index on the other nodes (its *rail*), and gathers the result inside the node again (node
egress ~ C, whatever L).

:class:`Topology` says where each rank is: ``Topology(ranks_per_node=L)`` (consecutive global
ranks share a node, as torchrun, Slurm's block distribution and mpirun ``--map-by node:PE`` lay
them out), ``Topology(node_of=[...])`` (a node id per global rank), or :meth:`Topology.detect`
(torchrun's ``LOCAL_WORLD_SIZE``, Slurm's ``SLURM_NTASKS_PER_NODE``, Open MPI's
``OMPI_COMM_WORLD_LOCAL_SIZE``). :meth:`Topology.layout` restricts it to the ranks of any process
group (a data-parallel subgroup included) and refuses a non-uniform layout (nodes with different
numbers of the group's ranks) with a ``ValueError`` that says which: there a hierarchical hook falls
back to the flat exchange only when asked with ``hierarchical="auto"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from commlib.validation import integer


def _positive_int(name: str, value) -> int:
    return integer(name, value, 1)


@dataclass(frozen=True)
class Layout:
    """A process group's ranks by node: ``nodes[k]`` the global ranks of the k-th node (in group
    order), ``local`` ranks per node, ``rails[j]`` the global ranks of local index j on every node."""

    nodes: tuple[tuple[int, ...], ...]

    @property
    def ranks_per_node(self) -> int:
        return len(self.nodes[0])

    @property
    def node_count(self) -> int:
        return len(self.nodes)

    @property
    def rails(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(node[j] for node in self.nodes) for j in range(self.ranks_per_node))

    def position(self, global_rank: int) -> tuple[int, int]:
        """``(node index, local index)`` of a global rank of the group."""
        for k, node in enumerate(self.nodes):
            if global_rank in node:
                return k, node.index(global_rank)
        raise ValueError(f"rank {global_rank} is not in this layout")

    @property
    def hierarchical(self) -> bool:
        """Whether two levels exist: more than one rank per node and more than one node."""
        return self.ranks_per_node > 1 and self.node_count > 1

    def describe(self) -> list[list[int]]:
        return [list(node) for node in self.nodes]


class Topology:
    r"""Where each rank runs: a node id per global rank.

    Arguments:
        ranks_per_node: L; global rank r is on node ``r // L`` (torchrun's layout).
        node_of: a node id per global rank (any hashable labels), for other layouts.

    Example::

        >>> from commlib.comm import Topology
        >>> topo = Topology(ranks_per_node=2)
        >>> topo.layout(range(8)).describe()
        [[0, 1], [2, 3], [4, 5], [6, 7]]
        >>> topo.layout([0, 2, 4, 6]).describe()     # a data-parallel subgroup: one rank per node
        [[0], [2], [4], [6]]
    """

    def __init__(self, ranks_per_node: int | None = None, node_of=None):
        if (ranks_per_node is None) == (node_of is None):
            raise ValueError("give exactly one of ranks_per_node (an integer >= 1) or node_of (a node id per rank)")
        self.ranks_per_node = None if ranks_per_node is None else _positive_int("ranks_per_node", ranks_per_node)
        self.node_of = None if node_of is None else list(node_of)
        if self.node_of is not None and not self.node_of:
            raise ValueError("node_of must name the node of every global rank, got an empty list")

    def __repr__(self) -> str:
        if self.ranks_per_node is not None:
            return f"Topology(ranks_per_node={self.ranks_per_node})"
        return f"Topology(node_of={self.node_of!r})"

    def describe(self) -> dict:
        """A JSON-like description (what ranks compare at bind, rule 7)."""
        return {"ranks_per_node": self.ranks_per_node, "node_of": None if self.node_of is None
                else [str(n) for n in self.node_of]}

    @classmethod
    def detect(cls, environ=None) -> Topology | None:
        """From the launcher's environment (torchrun, Slurm, Open MPI), or None when it says nothing."""
        env = os.environ if environ is None else environ
        for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
            value = env.get(key, "")
            head = value.split("(")[0].split(",")[0]  # Slurm: "4(x2)" or "4,4"
            if head.isdigit() and int(head) >= 1:
                if key == "SLURM_NTASKS_PER_NODE" and "," in value and len(set(value.split(","))) > 1:
                    raise ValueError(f"SLURM_NTASKS_PER_NODE={value!r}: nodes run different numbers of tasks; "
                                     "give Topology(node_of=[...]) explicitly")
                return cls(ranks_per_node=int(head))
        return None

    def node_id(self, global_rank: int):
        if self.node_of is not None:
            if not 0 <= global_rank < len(self.node_of):
                raise ValueError(f"node_of names {len(self.node_of)} ranks, rank {global_rank} is not among them")
            return self.node_of[global_rank]
        return global_rank // self.ranks_per_node

    def layout(self, ranks) -> Layout:
        """The ranks of a group (global ranks, in group order) by node; ``ValueError`` unless every
        node holds the same number of them."""
        ranks = list(ranks)
        nodes: dict = {}
        for r in ranks:
            nodes.setdefault(self.node_id(r), []).append(r)
        sizes = {len(v) for v in nodes.values()}
        if len(sizes) != 1:
            counts = {str(k): len(v) for k, v in nodes.items()}
            raise ValueError(f"{self!r}: the group's ranks are spread unevenly over nodes ({counts}); the "
                             "hierarchical exchange needs the same number of them on every node")
        return Layout(tuple(tuple(v) for v in nodes.values()))


def check_against_environment(topology: Topology, global_rank: int, environ=None) -> None:
    """Refuse a topology that contradicts what the launcher told this rank (its local rank and
    node), when it told anything."""
    env = os.environ if environ is None else environ
    local, node = env.get("LOCAL_RANK"), env.get("GROUP_RANK", env.get("SLURM_NODEID"))
    if topology.ranks_per_node is not None and local is not None and local.isdigit():
        if global_rank % topology.ranks_per_node != int(local):
            raise ValueError(f"{topology!r} puts global rank {global_rank} at local index "
                             f"{global_rank % topology.ranks_per_node}, but LOCAL_RANK={local}: give the real layout")
        if node is not None and node.isdigit() and global_rank // topology.ranks_per_node != int(node):
            raise ValueError(f"{topology!r} puts global rank {global_rank} on node "
                             f"{global_rank // topology.ranks_per_node}, but the launcher says node {node}")


def node_groups(layout: Layout, base=None, timeout=None):
    """``(intra-node group, rail group)`` of this rank: private groups (rule 8) over its node's
    ranks and over its rail's ranks."""
    from commlib.comm.groups import private_group

    me = dist.get_rank()
    node, local = layout.position(me)
    intra = private_group(base, timeout, ranks=list(layout.nodes[node]))
    rail = private_group(base, timeout, ranks=list(layout.rails[local]))
    return intra, rail
