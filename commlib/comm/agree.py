"""Rule 7's first half: the ranks of a group agree on a state's configuration before they talk.

A state that every rank builds from its own arguments can be built differently on one rank (a
compressor seeded by rank, another option, another model): its collectives would then differ in
size or meaning, and training would diverge silently, crash or hang. At bind, every rank hashes
each field of its configuration and the group all-gathers the digests (8 bytes a field, one
collective); any field that differs raises a ``ValueError`` on every rank, naming the field, the
ranks that differ and this rank's value.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist


def field_digest(value) -> int:
    """A process-independent 63-bit digest of a JSON-like value (``repr`` for anything else)."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def disagreements(digests: torch.Tensor, names: list[str]) -> dict[str, list[int]]:
    """``{field: ranks whose digest differs from rank 0's}`` for a (world, fields) digest table."""
    out = {}
    for j, name in enumerate(names):
        column = digests[:, j]
        differ = [r for r in range(column.numel()) if int(column[r]) != int(column[0])]
        if differ:
            out[name] = differ
    return out


def agree_across_ranks(fields: dict, group=None, what: str = "state") -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless every rank passed equal ``fields``
    (a dict of JSON-like values, with the same keys everywhere). One all-gather of
    ``len(fields)`` int64 digests."""
    names = sorted(fields)
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([len(names)] + [field_digest(fields[n]) for n in names], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    if world > 1:
        sizes = torch.tensor([mine.numel()], dtype=torch.int64, device=device)
        everyone = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(everyone, sizes, group=group)
        if len({int(t) for t in everyone}) > 1:
            raise ValueError(f"{what}: the ranks configure different sets of fields at bind "
                             f"(field counts {[int(t) - 1 for t in everyone]}); build the same state on every rank")
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    digests = torch.stack(table).cpu()[:, 1:]
    differ = disagreements(digests, names)
    if differ:
        rank = dist.get_rank(group)
        lines = [f"{name!r} (rank 0 and ranks {ranks} differ; this rank {rank} has {fields[name]!r})"
                 for name, ranks in differ.items()]
        raise ValueError(f"{what}: the ranks disagree at bind on " + "; ".join(lines) + ". Every rank must build "
                         "the same state (method, options, compressor and its seed, start_iter, layout, topology); "
                         "a seed that depends on the rank makes the ranks' parameters diverge")
