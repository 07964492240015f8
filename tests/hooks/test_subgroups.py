"""Rule 8: DDP on a subgroup (TP x DP, HSDP replicas, one node) with every hook, no collisions."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import compress, hooks
from commlib.comm.groups import group_number
from tests.conftest import run_world

from .ddp_harness import Net, batch

HOOKS = [
    ("allreduce", {}),
    ("ef", {"compressor": compress.TopK(0.1)}),
    ("powersgd", {"rank": 2}),
    ("ef", {"compressor": compress.Sign(), "collective": "two_phase"}),
    ("fp16", {}),
    ("ef21", {"compressor": compress.TopK(0.2)}),
    ("ef21w", {"compressor": compress.TopK(0.2), "estimate_every": 2}),
    ("bf16", {}),
    ("lgreco", {"family": "topk", "density": 0.1, "retune_every": 2, "accumulate_steps": 1}),
    ("agvm", {"groups": {"a": ["inp.", "mid1."], "b": ["mid2.", "norm.", "out."]}, "tau": 1}),
    ("ef", {"compressor": compress.QSGD(bits=4, bucket_size=64), "collective": "allgather"}),
]


def _two_data_parallel_groups(rank, world, rounds):
    """Ranks {0, 1} and {2, 3} are two data-parallel groups (made by every rank, as users do);
    each trains its own DDP with every hook in turn, ``rounds`` times: each state makes its own
    private groups from the members alone, at the same moments in both groups."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    digests = []
    for _ in range(rounds):
        for name, options in HOOKS:
            model = Net()
            ddp = DDP(model, process_group=mine, bucket_cap_mb=0.01)
            state, hook = hooks.make(name, process_group=mine, model=model, timeout=60, **options)
            ddp.register_comm_hook(state, hook)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for step in range(4):
                x, y = batch(rank, step)
                opt.zero_grad()
                torch.nn.functional.mse_loss(ddp(x), y).backward()
                opt.step()
            state.close()
            digests.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    dist.barrier()
    return digests


def test_ddp_on_two_subgroups_with_every_hook_never_collides():
    """Used to fail most runs ("barrier failed", "Timed out waiting ... for recv") or hang: the
    two groups' private copies got the same name from dist.new_group's per-process counter."""
    out = run_world(_two_data_parallel_groups, 4, args=(3,), timeout=400)
    for a, b in ((0, 1), (2, 3)):
        for i, (x, y) in enumerate(zip(out[a], out[b], strict=True)):
            assert torch.equal(x, y), (a, b, HOOKS[i % len(HOOKS)][0])
    assert not torch.equal(out[0][0], out[2][0])  # the two groups trained on different data


def test_private_group_names_differ_by_rank_set_and_sequence():
    names = {group_number(r, s) for r in ([0, 1], [2, 3], [0, 2], [1, 0]) for s in range(3)}
    assert len(names) == 9  # [1, 0] is [0, 1]
    assert group_number([0, 1], 0) == group_number([1, 0], 0)
