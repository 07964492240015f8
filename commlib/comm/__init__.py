"""Collective patterns, the ordered issue queue, private groups and the node topology."""

from commlib.comm.topology import Layout, Topology

__all__ = ["Layout", "Topology"]
