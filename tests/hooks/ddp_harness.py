"""A small DDP training loop shared by the hook tests (runs inside run_world workers)."""

from __future__ import annotations

import io

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import compress, hooks


class Net(nn.Module):
    """Linear layers of several shapes (two equal, for batching), biases and a LayerNorm (1-D params)."""

    def __init__(self, width: int = 48, dtype=torch.float32, dead_branch: bool = False):
        super().__init__()
        # a gated-off branch (an expert that gets no tokens, a zero-initialised gate): its
        # parameters get exactly zero gradients at every step
        self.dead = nn.Linear(width, width) if dead_branch else None
        gen = torch.Generator().manual_seed(1234)
        self.inp = nn.Linear(20, width)
        self.mid1 = nn.Linear(width, width)
        self.mid2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        self.to(dtype)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        x = torch.tanh(self.mid1(x))
        x = self.norm(torch.tanh(self.mid2(x)))
        if self.dead is not None:
            x = x + 0.0 * self.dead(x)
        return self.out(x)


def batch(rank: int, step: int, dtype=torch.float32, size: int = 16):
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(size, 20, generator=gen)
    y = torch.randn(size, 6, generator=gen)
    return x.to(dtype), y.to(dtype)


def sgd_steps(ddp, model, rank: int, steps: int, lr: float = 0.05, after_step=None):
    """Plain SGD on this rank's batches; ``after_step(step)`` runs after each update."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step(step)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def compressor_from(spec):
    """Test specs are picklable tuples: ('TopK', {...}) -> compress.TopK(...)."""
    if spec is None or isinstance(spec, compress.Compressor):
        return spec
    name, kwargs = spec
    return getattr(compress, name)(**kwargs)


def build(hook, options, ddp_kwargs, dtype=torch.float32, state_dict=None, with_model=True, on_mismatch="error",
          dead_branch=False):
    model = Net(dtype=dtype, dead_branch=dead_branch)
    ddp = DDP(model, **ddp_kwargs)
    state = None
    if hook is not None:
        opts = dict(options)
        if "compressor" in opts:
            opts["compressor"] = compressor_from(opts["compressor"])
        state, fn = hooks.make(hook, model=model if with_model else None, **opts)
        if state_dict is not None:
            state.load_state_dict(torch.load(io.BytesIO(state_dict), weights_only=True), on_mismatch=on_mismatch)
        ddp.register_comm_hook(state, fn)
    return model, ddp, state


def train(rank, world_size, hook=None, options=None, steps=10, ddp_kwargs=None, dtype=torch.float32,
          start_step=0, checkpoint=None, save_at=None, lr=0.05, inf_at=None, snapshots=(), with_model=True,
          gather=False, on_mismatch="error", dead_branch=False):
    """Train ``steps`` SGD steps; returns flat parameters (+ a checkpoint at ``save_at``, + stats).

    ``checkpoint``: one saved checkpoint for every rank, or a list (rank i loads entry i);
    ``gather``: save every rank's hook state in one dict (``hooks.gather_state_dict``)."""
    ddp_kwargs = dict(ddp_kwargs or {})
    if isinstance(checkpoint, list):
        checkpoint = checkpoint[rank]
    model, ddp, state = build(hook, options or {}, ddp_kwargs, dtype,
                              state_dict=checkpoint["hook"] if checkpoint else None, with_model=with_model,
                              on_mismatch=on_mismatch, dead_branch=dead_branch)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if checkpoint:
        model.load_state_dict(torch.load(io.BytesIO(checkpoint["model"]), weights_only=True))
    saved = None
    grads_seen = []
    buffers = {}
    for step in range(start_step, start_step + steps):
        x, y = batch(rank, step, dtype)
        loss = nn.functional.mse_loss(ddp(x), y)
        if inf_at is not None and step == inf_at and rank == world_size - 1:
            loss = loss * float("inf")
        opt.zero_grad(set_to_none=False)
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        grads_seen.append(finite)
        if finite:
            opt.step()
        if step in snapshots:
            # error-feedback buffers; L-GreCo's local statistics sum every finite local gradient
            # (as before the per-rank split of its buffers), so they are not among the spared ones
            buffers[step] = {k: {n: t.clone() for n, t in d.items() if torch.is_tensor(t)}
                             for k, d in state.buffers_state().items()
                             if isinstance(d, dict) and k != "lgreco_accumulated"}
        if save_at is not None and step + 1 == save_at:
            buf_model, buf_hook = io.BytesIO(), io.BytesIO()
            torch.save(model.state_dict(), buf_model)
            torch.save((hooks.gather_state_dict(state) if gather else state.state_dict()) if state else {},
                       buf_hook)
            saved = {"model": buf_model.getvalue(), "hook": buf_hook.getvalue()}
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    return {"params": flat, "checkpoint": saved, "stats": state.stats() if state else None,
            "finite": grads_seen, "buffers": buffers}


def flat_grads_after_one_step(rank, world_size, hook=None, options=None, ddp_kwargs=None):
    model, ddp, state = build(hook, options or {}, dict(ddp_kwargs or {}))
    x, y = batch(rank, 0)
    nn.functional.mse_loss(ddp(x), y).backward()
    dist.barrier()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def gathered_checkpoint(process_rank: int, name: str, steps: int, **options) -> tuple[nn.Module, bytes]:
    """Train ``steps`` backward passes of a fresh Net under hook ``name`` and return the model and
    every rank's hook state gathered into one saved blob (what rank 0 would write)."""
    model = Net()
    ddp = DDP(model)
    state, hook = hooks.make(name, model=model, **options)
    ddp.register_comm_hook(state, hook)
    for step in range(steps):
        x, y = batch(process_rank, step)
        nn.functional.mse_loss(ddp(x), y).backward()
    buf = io.BytesIO()
    torch.save(hooks.gather_state_dict(state), buf)
    state.close()
    return model, buf.getvalue()
