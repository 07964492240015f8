"""Small FSDP2 models and training loops shared by the sharded-training tests (gloo, CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# uneven on purpose: 7 rows on 3 ranks shard 3, 3, 1; 5 rows on 2 ranks 3, 2
SIZES = (12, 10, 7, 5)


def mlp(seed: int = 0, sizes=SIZES) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def shard(model: nn.Module, mp: MixedPrecisionPolicy | None = None, reshard: bool = True) -> nn.Module:
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    return model


def global_batch(step: int, rows: int = 12, dim: int = SIZES[0]):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, dim, generator=gen), torch.randn(rows, SIZES[-1], generator=gen)


def local_batch(step: int, rank: int, world: int, rows_per_rank: int = 4):
    x, y = global_batch(step, rows_per_rank * world)
    return x[rank * rows_per_rank : (rank + 1) * rows_per_rank], y[rank * rows_per_rank : (rank + 1) * rows_per_rank]


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly DTensor) parameter or gradient (a collective for DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_grads(model) -> list[torch.Tensor]:
    return [full(p.grad).detach().clone() for p in model.parameters()]


def full_params(model) -> list[torch.Tensor]:
    return [full(p.data).detach().clone() for p in model.parameters()]


def all_ranks_equal(values: list[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical ``values`` (a collective)."""
    digest = torch.cat([v.double().reshape(-1) for v in values])
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(torch.equal(gathered[0], g) for g in gathered)
