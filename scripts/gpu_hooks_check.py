"""One-rank NCCL world through every commlib hook on one GPU (part of scripts/gpu_check.sh).

DDP is built on a side stream (as Lightning 2.6.6 does), so the hook's producer stream is not the
default stream: a hook that ignored the producer stream would race. The dense ``allreduce`` hook
must then give exactly the gradients of DDP without a hook; every hook must train 6 steps with
finite parameters and count bytes. Prints one JSON line per hook and exits non-zero on a failure.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import hooks

OPTIONS = {"ef": {"compressor": "QSGD(bits=4)"}, "ef21": {}, "ef21w": {}, "powersgd": {"rank": 2},
           "lgreco": {}, "agvm": {}, "dp_ef": {}, "gc": {}, "lowrank": {}, "allreduce": {}, "fp16": {}, "bf16": {}}


def model_on(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10)).to(device)


def train(name, device, steps=6):
    from commlib.workloads import parse_compressor

    model = model_on(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        ddp = DDP(model, device_ids=[device.index])
    state = None
    if name != "none":
        options = dict(OPTIONS.get(name, {}), start_iter=2)
        if "compressor" in options:
            options["compressor"] = parse_compressor(options["compressor"])
        state, hook = hooks.make(name, **options)
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator(device=device).manual_seed(1)
    grads = []
    for _ in range(steps):
        x = torch.randn(64, 256, device=device, generator=g)
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    torch.cuda.synchronize()
    return model, state, grads


def main() -> int:
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{os.environ.get('PORT', '29531')}", rank=0,
                            world_size=1)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    failures = 0
    _, _, plain = train("none", device)
    for name in hooks.names():
        try:
            model, state, grads = train(name, device)
            finite = all(torch.isfinite(p).all().item() for p in model.parameters())
            row = {"hook": name, "finite": finite, "bytes": state.stats()["total_bytes_sent"]}
            if name == "allreduce":
                row["equals_plain_ddp"] = all(torch.equal(a, b) for s, t in zip(grads, plain, strict=True)
                                              for a, b in zip(s, t, strict=True))
            ok = finite and row["bytes"] > 0 and row.get("equals_plain_ddp", True)
            state.close()
        except Exception as exc:  # report every hook, then fail
            row, ok = {"hook": name, "error": f"{type(exc).__name__}: {exc}"}, False
        row["ok"] = ok
        failures += not ok
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
