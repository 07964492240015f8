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

SKIPPED = {"gc": "gradient coding needs 2 or more workers"}
NO_BYTE_BOOKS = {"dp_ef"}  # DiceSGD's hook averages what its optimizer already clipped and noised


def make_hook(name, model):
    """(state, hook, optimizer or None) for hook ``name`` on ``model`` (compressed from step 2)."""
    from commlib import compress
    from commlib.optim import GaLoreAdamW

    if name == "dp_ef":
        state, hook = hooks.make(name, model=model)
        return state, hook, None
    if name == "agvm":
        state, hook = hooks.make(name, model=model, start_iter=2)
        return state, hook, None
    if name == "lowrank":
        matrices = [p for p in model.parameters() if p.dim() == 2]
        others = [p for p in model.parameters() if p.dim() < 2]
        opt = GaLoreAdamW([{"params": others}, {"params": matrices, "rank": 4, "update_proj_gap": 3}], lr=1e-3)
        state, hook = hooks.make(name, optimizer=opt, start_iter=2)
        return state, hook, opt
    options = {"ef": {"compressor": compress.QSGD(bits=4)}, "powersgd": {"rank": 2}}.get(name, {})
    state, hook = hooks.make(name, start_iter=2, **options)
    return state, hook, None


def model_on(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10)).to(device)


def train(name, device, steps=6):
    model = model_on(device)
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            ddp = DDP(model, device_ids=[device.index])
    else:  # --cpu: the same checks on gloo, to try the script without a GPU
        ddp = DDP(model)
    state, opt = None, None
    if name != "none":
        state, hook, opt = make_hook(name, model)
        ddp.register_comm_hook(state, hook)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator(device=device).manual_seed(1)
    grads = []
    for _ in range(steps):
        x = torch.randn(64, 256, device=device, generator=g)
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, state, grads


def main() -> int:
    on_cpu = "--cpu" in sys.argv
    dist.init_process_group("gloo" if on_cpu else "nccl",
                            init_method=f"tcp://127.0.0.1:{os.environ.get('PORT', '29531')}", rank=0, world_size=1)
    device = torch.device("cpu") if on_cpu else torch.device("cuda", 0)
    if not on_cpu:
        torch.cuda.set_device(device)
    failures = 0
    _, _, plain = train("none", device)
    for name in hooks.names():
        if name in SKIPPED:
            print(json.dumps({"hook": name, "skipped": SKIPPED[name]}), flush=True)
            continue
        try:
            model, state, grads = train(name, device)
            finite = all(torch.isfinite(p).all().item() for p in model.parameters())
            stats = state.stats()
            stats = stats.get("inner", stats) if "total_bytes_sent" not in stats else stats  # AGVM wraps a hook
            row = {"hook": name, "finite": finite, "bytes": stats.get("total_bytes_sent", 0)}
            if name == "allreduce":
                row["equals_plain_ddp"] = all(torch.equal(a, b) for s, t in zip(grads, plain, strict=True)
                                              for a, b in zip(s, t, strict=True))
            ok = finite and (row["bytes"] > 0 or name in NO_BYTE_BOOKS) and row.get("equals_plain_ddp", True)
            state.close()
        except Exception as exc:  # report every hook, then fail
            row, ok = {"hook": name, "error": f"{type(exc).__name__}: {exc}"}, False
        row["ok"] = ok
        failures += not ok
        print(json.dumps(row), flush=True)
    failures += not resume_from_a_host_checkpoint(device)
    dist.destroy_process_group()
    return 1 if failures else 0


def resume_from_a_host_checkpoint(device) -> bool:
    """Hook state saved, loaded with ``map_location="cpu"`` into a fresh state, training goes on on
    ``device``: the buffers must follow the gradients (PowerSGD's fused kernels would otherwise get
    host pointers), and the run must continue as the unbroken one does."""
    import io

    from commlib.hooks.state import tensors_of

    def run(steps, load=None):
        model = model_on(device)
        ddp = DDP(model, device_ids=[device.index]) if device.type == "cuda" else DDP(model)
        state, hook = hooks.make("powersgd", rank=2, model=model)
        if load is not None:
            state.load_state_dict(torch.load(io.BytesIO(load[0]), map_location="cpu", weights_only=True))
            model.load_state_dict(torch.load(io.BytesIO(load[1]), map_location="cpu", weights_only=True))
        ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator(device=device).manual_seed(2)
        saved = None
        for step in range(steps[0], steps[1]):
            g.manual_seed(100 + step)
            loss = ddp(torch.randn(64, 256, device=device, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 3 and load is None:
                a, b = io.BytesIO(), io.BytesIO()
                torch.save(state.state_dict(), a)
                torch.save(model.state_dict(), b)
                saved = (a.getvalue(), b.getvalue())
        devices = sorted({t.device.type for t in tensors_of(state.buffers_state())})
        state.close()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), saved, devices

    try:
        full, saved, _ = run((0, 8))
        resumed, _, devices = run((4, 8), load=saved)
        row = {"check": "resume_from_host_checkpoint", "buffer_devices": devices,
               "bit_identical": bool(torch.equal(full, resumed))}
        row["ok"] = row["bit_identical"] and devices == [device.type]
    except Exception as exc:
        row = {"check": "resume_from_host_checkpoint", "error": f"{type(exc).__name__}: {exc}", "ok": False}
    print(json.dumps(row), flush=True)
    return row["ok"]



if __name__ == "__main__":
    sys.exit(main())
