"""Train a GPT-2-style model with FSDP2 (or DDP, the reference) and report throughput, bytes and memory.

Run under ``torchrun`` as a module; ``benchmarks/bench_fsdp.py`` sweeps it on the emulated cluster::

    torchrun --nproc-per-node 2 -m commlib.fsdp.workload --compressor "QSGD(bits=8)" --quantize-weights

Rank 0 prints ``RESULT {json}``: median step time and samples/s after warm-up, the bytes this
rank's NIC sent per step (``--interface``), the bytes commlib's comms counted, the held-out loss
(evaluated with the full-precision parameters), and per-rank memory: parameters, gradients,
optimizer state and error-feedback residuals as held (local shards), plus the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from commlib.workloads import ByteBatches, build_optimizer, gpt2_model, interface_tx_bytes, lm_loss, parse_compressor


class SilentReduceScatter:
    """The throughput ceiling of a compressed reduce-scatter: it sends nothing (each rank keeps its
    own row, so the ranks' gradients differ: timing only)."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        output_tensor.copy_(input_tensor.view(dist.get_world_size(group), -1)[dist.get_rank(group)])


def local_bytes(tensors) -> int:
    from commlib.optim.sharded import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def optimizer_state_bytes(opt) -> int:
    return local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="fsdp", choices=["fsdp", "ddp"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compressor", default=None, help='e.g. "QSGD(bits=8)"; "silent" sends nothing (ceiling)')
    parser.add_argument("--error-feedback", default="none", choices=["none", "fp32", "bf16"])
    parser.add_argument("--quantize-weights", action="store_true", help="int8 block-quantized all-gather (qwZ)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=False (ZeRO-2-like)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "galore", "fira", "frugal"])
    parser.add_argument("--projector", default="dct", choices=["dct", "svd", "random"])
    parser.add_argument("--rank-fraction", type=float, default=0.25)
    parser.add_argument("--update-proj-gap", type=int, default=50)
    parser.add_argument("--hsdp", action="store_true",
                        help="HSDP: shard inside each node (LOCAL_WORLD_SIZE ranks), replicate across nodes; with "
                             "--compressor the replica all-reduce is commlib's, compressed; without, FSDP2's native one")
    parser.add_argument("--flat", action="store_true",
                        help="keep the compressed reduce-scatter one hop on several nodes (no two-hop qgZ)")
    parser.add_argument("--interface", default=os.environ.get("COMMLIB_WIRE_INTERFACE"))
    parser.add_argument("--timeout", type=float, default=120.0)
    return parser.parse_args(argv)


def train(args) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commlib.fsdp import compress_gradients, fsdp_modules, quantize_all_gather

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    model = gpt2_model(args.dim, args.layers, args.heads, args.context)
    data = ByteBatches(rank, world, args.batch, args.context, args.seed)
    state = gathers = None
    if args.mode == "ddp":
        runner = DDP(model)
    else:
        mesh = None
        kwargs = {}
        if args.hsdp:
            from torch.distributed.device_mesh import init_device_mesh

            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            mesh = init_device_mesh("cpu", (world // local, local), mesh_dim_names=("replicate", "shard"))
            kwargs["mesh"] = mesh["shard"] if args.compressor else mesh  # native HSDP for the dense baseline
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=not args.no_reshard, **kwargs)
        fully_shard(model, reshard_after_forward=not args.no_reshard, **kwargs)
        runner = model
        if args.compressor == "silent":
            for _, m in fsdp_modules(model):
                m.set_custom_reduce_scatter(SilentReduceScatter())
        elif args.compressor:
            ef = {"none": False, "fp32": True, "bf16": "bf16"}[args.error_feedback]
            state = compress_gradients(model, parse_compressor(args.compressor), error_feedback=ef,
                                       replicate=mesh["replicate"] if mesh is not None else None,
                                       hierarchical=False if args.flat else "auto")
        if args.quantize_weights:
            gathers = quantize_all_gather(model, args.block_size)
    opt = build_optimizer(args.optimizer, model, args.lr, args.projector, args.rank_fraction, args.update_proj_gap,
                          {"foreach": True})
    times, losses = [], []
    wire_start = 0
    memory = {}
    for step in range(args.steps):
        if step == args.warmup:
            dist.barrier()
            wire_start = interface_tx_bytes(args.interface)
            counted_start = _counted(state, gathers)
        batch = data.next()
        t0 = time.perf_counter()
        loss = lm_loss(runner, batch)
        loss.backward()
        if step == 0:
            memory["gradients"] = local_bytes(p.grad for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = max(1, args.steps - args.warmup)
    wire = (interface_tx_bytes(args.interface) - wire_start) / timed if args.interface else None
    counted = (_counted(state, gathers) - counted_start) / timed
    memory.update(parameters=local_bytes(model.parameters()), optimizer_state=optimizer_state_bytes(opt),
                  residuals=state.residual_bytes() if state is not None else 0)
    memory["total"] = sum(memory.values())
    # commlib's reused message buffers (one set per model, sized for the largest module); plain FSDP's
    # own transient collective buffers are not counted either
    memory["comm_buffers"] = ((state.pool.nbytes() if state is not None else 0)
                              + (gathers.buffer_bytes() if gathers is not None else 0))
    memory["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if gathers is not None:  # evaluate the trained full-precision (master) parameters
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

        for _, m in fsdp_modules(model):
            m.set_custom_all_gather(DefaultAllGather())
    with torch.no_grad():
        held_out = data.evaluation()
        eval_loss = sum(float(lm_loss(runner, b)) for b in held_out) / len(held_out)
    step_times = sorted(times[args.warmup:]) or sorted(times)
    median = step_times[len(step_times) // 2]
    result = {
        "mode": args.mode, "world": world, "parameters": sum(p.numel() for p in model.parameters()),
        "compressor": args.compressor, "error_feedback": args.error_feedback,
        "quantize_weights": args.quantize_weights, "optimizer": args.optimizer, "hsdp": args.hsdp,
        "projector": args.projector if args.optimizer != "adamw" else None, "reshard": not args.no_reshard,
        "steps": args.steps, "warmup": args.warmup,
        "step_seconds_median": median, "samples_per_second": args.batch * world / median,
        "wire_tx_bytes_per_step": wire, "counted_bytes_per_step": counted,
        "eval_loss": eval_loss, "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "memory_bytes": memory,
    }
    if state is not None:
        stats = state.stats()
        result["reduce_scatter_ratio"] = stats["compression_ratio"]
        result["skipped_steps"] = stats["skipped_steps"]
    if hasattr(opt, "stats"):
        result["optimizer_comm"] = opt.stats()
    return result


def _counted(state, gathers) -> int:
    total = state.stats()["total_bytes_sent"] if state is not None else 0
    return total + (gathers.stats()["total_bytes_sent"] if gathers is not None else 0)


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        result = train(args)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
