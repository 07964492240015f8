"""Train a small GPT-style language model with DDP and any commlib hook, chosen by name.

    torchrun --nproc-per-node 2 examples/ddp_train.py --hook powersgd --option rank=4
    torchrun --nproc-per-node 2 examples/ddp_train.py --hook ef --compressor "QSGD(bits=4)"
    torchrun --nproc-per-node 2 examples/ddp_train.py --hook lgreco --option family=topk --option density=0.01

The model is a real decoder-only transformer (token + position embeddings, causal self-attention
blocks with pre-LayerNorm and GELU MLPs, tied output head) trained on bytes of the Python
standard library's own source files (shipped with every Python install; nothing is downloaded).
Each rank reads a different shard. ``--save``/``--resume`` checkpoint the model, the optimizer,
the step and every rank's hook state in one file that rank 0 writes atomically (temporary file,
then rename) and every rank loads (``weights_only=True``), refusing a hook state of another step.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import compress, hooks
from commlib.checkpoint import save_atomic
from workloads.data import python_source_bytes
from workloads.models import parse_value


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hook", default="powersgd", choices=hooks.names() + ["none"])
    parser.add_argument("--option", action="append", default=[], help="hook option key=value (repeatable)")
    parser.add_argument("--compressor", help='for --hook ef, e.g. "TopK(density=0.01)"')
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="checkpoint path (written by rank 0, hook state per rank)")
    parser.add_argument("--resume", help="checkpoint path to resume from")
    args = parser.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(args.seed)
    model = TinyGPT(context=args.context).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = None
    if args.hook != "none":
        options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
        if args.compressor:
            options["compressor"] = compress.from_string(args.compressor)
        state, hook = hooks.make(args.hook, model=model, **options)
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if args.resume:  # one file, written by rank 0; every rank loads it and takes its own hook part
        ckpt = torch.load(args.resume, weights_only=True, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        if (ckpt["hook"] is None) != (state is None):
            raise SystemExit(f"{args.resume} was saved {'without' if ckpt['hook'] is None else 'with'} a hook state; "
                             f"resume with the same --hook")
        if state is not None:
            state.load_state_dict(ckpt["hook"])
            if state.stats()["step"] != start:  # the hook counts the steps it reduced
                raise SystemExit(f"{args.resume}: the hook state is at step {state.stats()['step']}, the model at "
                                 f"step {start}: they are not from the same save")

    data = python_source_bytes()
    shard = data[rank::world]  # every rank its own bytes
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    t0 = time.perf_counter()
    losses = []
    for step in range(start, start + args.steps):
        offsets = torch.randint(0, shard.numel() - args.context - 1, (args.batch,), generator=gen)
        window = torch.stack([shard[o : o + args.context + 1] for o in offsets]).to(device)
        logits = ddp(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if rank == 0 and (step % 10 == 0 or step == start + args.steps - 1):
            extra = ""
            if state is not None:
                s = state.stats()
                extra = f"  compression {s['compression_ratio']:.1f}x"
            print(f"step {step:4d}  loss {loss.item():.4f}  ({math.exp(loss.item()):.1f} ppl){extra}", flush=True)
    if rank == 0:
        tail = losses[-20:]
        print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s on {world} ranks ({backend}); "
              f"mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}")
        if state is not None:
            s = state.stats()
            print(f"bytes per step: sent {s['total_bytes_sent'] / args.steps:.0f}, dense "
                  f"{s['total_bytes_dense'] / args.steps:.0f} ({s['total_bytes_dense'] / max(s['total_bytes_sent'], 1):.2f}x)")
            if "lgreco" in s:
                print("L-GreCo plan:", s["lgreco"]["plan"])
    if args.save:  # model, optimizer, step and every rank's hook state in one file, replaced atomically
        hook_state = hooks.gather_state_dict(state) if state is not None else None  # a collective
        if rank == 0:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": start + args.steps,
                         "hook": hook_state}, args.save)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
