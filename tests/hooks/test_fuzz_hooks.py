"""Property-based test of every hook on random models, buckets and worlds: ranks stay bit-identical.

Drawn per example: the hook and its options, world size 2-4, DDP's bucket cap, the layer widths
(odd and tiny ones included), a conv layer (4-D weights), an unused layer (with
``find_unused_parameters``), a frozen layer, gradient-as-bucket-view. Each example is a gloo world,
so the budget is small and fixed (derandomized; ``COMMLIB_FUZZ_HOOK_EXAMPLES`` raises it).
"""

import os

import torch
from conftest import run_world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import hooks

from .ddp_harness import compressor_from
from .test_hooks_dist import HOOKS

EXAMPLES = int(os.environ.get("COMMLIB_FUZZ_HOOK_EXAMPLES", "10"))


class FuzzNet(nn.Module):
    def __init__(self, widths, conv, unused, frozen):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(2, 3, 3) if conv else None
        first = 3 * 2 * 2 if conv else 12
        dims = [first, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.unused = nn.Linear(5, 5) if unused else None
        self.frozen = nn.Linear(dims[-1], dims[-1]) if frozen else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if self.frozen is not None:
            self.frozen.requires_grad_(False)

    def forward(self, x):
        x = torch.tanh(self.conv(x)).flatten(1) if self.conv is not None else x.flatten(1)[:, :12]
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.frozen(x) if self.frozen is not None else x


def _train(rank, world_size, hook, options, spec, steps=6):
    model = FuzzNet(spec["widths"], spec["conv"], spec["unused"], spec["frozen"])
    ddp = DDP(model, bucket_cap_mb=spec["bucket_cap_mb"], find_unused_parameters=spec["unused"],
              gradient_as_bucket_view=spec["view"])
    opts = dict(options)
    if "compressor" in opts:
        opts["compressor"] = compressor_from(opts["compressor"])
    state, fn = hooks.make(hook, model=model if spec["named"] else None, **opts)
    ddp.register_comm_hook(state, fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randn(8, 2, 4, 4, generator=gen)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    stats = state.stats()
    state.close()
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "step": stats["step"]}


specs = st.fixed_dictionaries({
    "widths": st.lists(st.integers(1, 40), min_size=1, max_size=3),
    "conv": st.booleans(),
    "unused": st.booleans(),
    "frozen": st.booleans(),
    "view": st.booleans(),
    "named": st.booleans(),
    "bucket_cap_mb": st.sampled_from([0.0005, 0.004, 0.05, 25.0]),
})


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(HOOKS), world=st.integers(2, 4), spec=specs)
def test_random_models_buckets_and_worlds_keep_ranks_bit_identical(case, world, spec):
    hook, options = case
    out = run_world(_train, world, args=(hook, options, spec), timeout=120)
    for r in out:
        assert torch.equal(r["params"], out[0]["params"]), (hook, options, world, spec)
        assert torch.isfinite(r["params"]).all()
        assert r["step"] == 6
