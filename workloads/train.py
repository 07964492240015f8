"""One trainer for the examples, the benchmarks and the launch tests: DDP (any commlib hook,
PyTorch's own hooks, or local steps) or FSDP2 (compressed reduce-scatter, int8 all-gather, HSDP).

Models (``--model``), built from configs with random init (nothing downloaded):

* ``gpt2``: :class:`transformers.GPT2LMHeadModel`, byte vocabulary (256), trained on the Python
  install's own ``Lib/*.py`` sources (next-byte prediction);
* ``mlp``: ``layers`` x Linear(dim, dim), the communication-heavy check (8 x 1024), regressing the
  next ``dim`` source bytes from the previous ``dim`` (DDP only);
* ``resnet``: :class:`transformers.ResNetForImageClassification` (basic blocks), trained on
  scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32 (DDP only).

Run under ``torchrun`` (or ``mpiexec`` through :mod:`commlib.launch.mpi`) as a module::

    torchrun --nproc-per-node 2 -m workloads.train --model gpt2 --hook powersgd --option rank=4 --steps 30
    torchrun --nproc-per-node 2 -m workloads.train --mode fsdp --compressor "QSGD(bits=8)" --quantize-weights

``--mode ddp`` runs the commlib hooks (any name in :func:`commlib.hooks.names`) and the baselines
``none`` (DDP's dense allreduce), ``torch_fp16`` and ``torch_powersgd`` (PyTorch's own hooks), or,
with ``--local-sgd``, commlib's DiLoCo or PyTorch's ``PeriodicModelAverager`` instead of DDP.
``--mode fsdp`` shards the GPT-2 blocks with FSDP2 and compresses its reduce-scatter with
``--compressor`` (``"silent"`` sends nothing: the throughput ceiling).

Rank 0 prints one JSON line (``RESULT {...}``): median step time and samples/s after the warm-up,
the bytes commlib's books counted per step and the bytes this rank's NIC sent (``--interface``),
the held-out loss, per-rank memory (parameters, gradients, optimizer state, residuals, message
buffers, peak RSS) and whether all ranks hold the same parameters; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from commlib import compress
from workloads.data import ByteBatches, DigitBatches, interface_tx_bytes
from workloads.models import (
    ADAMW_IMPLEMENTATIONS,
    build_optimizer,
    cnn_loss,
    gpt2_model,
    lm_loss,
    mlp_loss,
    mlp_model,
    parse_value,
    resnet_model,
)

BASELINES = ("none", "torch_fp16", "torch_powersgd")


# ---------------------------------------------------------------------------------------- books
def dense_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def local_bytes(tensors) -> int:
    """Bytes of the tensors as this rank holds them (a DTensor's local shard)."""
    from commlib.optim.sharded import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def optimizer_state_bytes(opt) -> int:
    return local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def torch_powersgd_bytes(model: nn.Module, rank: int, min_compression_rate: float = 2.0) -> int:
    """Bytes per step PyTorch's PowerSGD hook sends: P and Q of each matrix its rule compresses
    (:func:`commlib.hooks.powersgd.should_compress`, at rank ``min(n, m, rank)``), the rest dense."""
    from commlib.hooks.powersgd import should_compress

    total = 0
    for p in model.parameters():
        if p.dim() > 1:
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = min(n, m, rank)
            if should_compress(n, m, r, min_compression_rate):
                total += (n + m) * r * p.element_size()
                continue
        total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------- DDP mode
def register_hook(ddp, model: nn.Module, name: str, options: dict):
    """Register hook ``name`` on ``ddp``; returns ``(commlib_state_or_None, fixed_bytes_per_step)``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "none":
        return None, dense_bytes(model)
    if name == "torch_fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None, dense_bytes(model) // 2
    if name == "torch_powersgd":
        rank = int(options.get("rank", 1))
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=int(options.get("start_iter", 2)),
                                            use_error_feedback=True, warm_start=True, random_seed=0)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return None, torch_powersgd_bytes(model, rank)
    from commlib import hooks

    state, hook = hooks.make(name, model=model, **options)
    ddp.register_comm_hook(state, hook)
    return state, None


class LocalSteps:
    """``--local-sgd``: each rank trains its own replica; commlib's DiLoCo, or PyTorch's
    ``PeriodicModelAverager`` (post-local SGD: parameter averaging every H steps, no outer
    optimizer, no compression), syncs them. ``stats()["total_bytes_sent"]`` books what one rank
    contributes (the averager: the dense parameters at each average)."""

    def __init__(self, args, model: nn.Module, opt):
        self.model, self.mode = model, args.local_sgd
        if self.mode == "diloco":
            from commlib.localsgd import DiLoCo

            compressor = compress.from_string(args.outer_compressor) if args.outer_compressor else None
            self.outer = DiLoCo(model, opt, sync_every=args.sync_every, outer_lr=args.outer_lr,
                                outer_momentum=args.outer_momentum, nesterov=args.outer_momentum > 0,
                                compressor=compressor, collective=args.outer_collective, fragments=args.fragments,
                                delay=args.delay, mix=args.mix, timeout=args.timeout)
        else:
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

            self.outer = PeriodicModelAverager(period=args.sync_every, warmup_steps=0)
            self.averaged_bytes = 0
            self.dense = dense_bytes(model)

    def after_inner_step(self) -> None:
        if self.mode == "diloco":
            self.outer.step()
        else:
            before, warmup = self.outer.step, self.outer.warmup_steps
            self.outer.average_parameters(self.model.parameters())
            if before >= warmup and (before - warmup) % self.outer.period == 0:  # the averager's own rule
                self.averaged_bytes += self.dense

    def stats(self) -> dict:
        if self.mode == "diloco":
            return {"total_bytes_sent": self.outer.stats()["total_bytes_sent"]}
        return {"total_bytes_sent": self.averaged_bytes}

    def describe(self) -> dict:
        if self.mode == "diloco":
            stats = self.outer.stats()
            return {"mode": "diloco", **self.outer.options(), "syncs": stats["syncs"],
                    "skipped_syncs": stats["skipped_syncs"], "memory_bytes": stats["memory_bytes"]}
        return {"mode": "averager", "period": self.outer.period}

    def close(self) -> None:
        if self.mode == "diloco":
            self.outer.close()


# ---------------------------------------------------------------------------------------- FSDP mode
class SilentReduceScatter:
    """The throughput ceiling of a compressed reduce-scatter: it sends nothing (each rank keeps its
    own row, so the ranks' gradients differ: timing only)."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        output_tensor.copy_(input_tensor.view(dist.get_world_size(group), -1)[dist.get_rank(group)])


# ---------------------------------------------------------------------------------------- one run
@dataclass
class Run:
    """What the training loop needs from a mode: the model, what runs the forward, the data and the
    loss, the optimizer, and the books (bytes counted so far, residual and message-buffer bytes)."""

    model: nn.Module
    runner: nn.Module
    data: object
    loss_fn: Callable
    opt: torch.optim.Optimizer
    counted_bytes: Callable[[], int]          # commlib's books, cumulative
    fixed_bytes_per_step: int | None = None   # PyTorch's baselines keep no books: their bytes per step
    after_step: Callable[[], None] = lambda: None
    residual_bytes: Callable[[], int] = lambda: 0
    buffer_bytes: Callable[[], int] = lambda: 0
    before_eval: Callable[[], None] = lambda: None
    report: dict = field(default_factory=dict)
    finish: Callable[[dict], None] = lambda result: None


def model_and_data(args, rank: int, world: int):
    if args.model == "gpt2":
        return (gpt2_model(args.dim, args.layers, args.heads, args.context),
                ByteBatches(rank, world, args.batch, args.context, args.seed), lm_loss)
    if args.mode == "fsdp":
        raise SystemExit("--mode fsdp shards the GPT-2 blocks: use --model gpt2")
    if args.model == "mlp":  # windows of 2 * width bytes
        return mlp_model(args.dim, args.layers), ByteBatches(rank, world, args.batch, 2 * args.dim - 1, args.seed), \
            mlp_loss
    return resnet_model(args.dim), DigitBatches(rank, world, args.batch, args.seed), cnn_loss


def adamw_kwargs(args) -> dict:
    # FSDP2's DTensor parameters take the foreach kernels; DDP the fused one (5-7x faster on CPU here)
    return ADAMW_IMPLEMENTATIONS[args.adamw or ("foreach" if args.mode == "fsdp" else "fused")]


def setup_ddp(args, rank: int, world: int) -> Run:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, data, loss_fn = model_and_data(args, rank, world)
    local_sgd = args.local_sgd != "none"
    runner = model if local_sgd else DDP(model, bucket_cap_mb=args.bucket_cap_mb)
    options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.compressor:
        # the lowrank hook compresses the residual G - P R of Fira / FRUGAL with it
        options["residual" if args.hook == "lowrank" else "compressor"] = compress.from_string(args.compressor)
    opt = build_optimizer(args.optimizer, model, args.lr, args.projector, args.rank_fraction, args.update_proj_gap,
                          adamw_kwargs(args))
    if args.hook == "lowrank":  # the hook all-reduces this optimizer's projected gradients
        options["optimizer"] = opt
    report = {"hook": args.hook, "options": {k: str(v) for k, v in options.items() if k != "optimizer"}}
    if local_sgd:
        state, fixed = LocalSteps(args, model, opt), None
    else:
        state, fixed = register_hook(runner, model, args.hook, options)

    def finish(result: dict) -> None:
        if local_sgd:
            result["local_sgd"] = state.describe()
            state.close()
        elif state is not None:
            stats = state.stats()
            result["skipped_steps"] = stats["skipped_steps"]
            if "lgreco" in stats:
                result["lgreco_plan"] = stats["lgreco"]["plan"]
            result["hierarchical"] = stats.get("hierarchical")

    return Run(model, runner, data, loss_fn, opt,
               counted_bytes=lambda: state.stats()["total_bytes_sent"] if state is not None else 0,
               fixed_bytes_per_step=fixed, after_step=state.after_inner_step if local_sgd else (lambda: None),
               residual_bytes=lambda: int(getattr(state, "residual_bytes", lambda: 0)()),
               report=report, finish=finish)


def setup_fsdp(args, rank: int, world: int) -> Run:
    from torch.distributed.fsdp import fully_shard

    from commlib.fsdp import compress_gradients, fsdp_modules, quantize_all_gather

    model, data, loss_fn = model_and_data(args, rank, world)
    state = gathers = mesh = None
    kwargs = {}
    if args.hsdp:
        from torch.distributed.device_mesh import init_device_mesh

        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mesh = init_device_mesh("cpu", (world // local, local), mesh_dim_names=("replicate", "shard"))
        kwargs["mesh"] = mesh["shard"] if args.compressor else mesh  # native HSDP for the dense baseline
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=not args.no_reshard, **kwargs)
    fully_shard(model, reshard_after_forward=not args.no_reshard, **kwargs)
    if args.compressor == "silent":
        for _, m in fsdp_modules(model):
            m.set_custom_reduce_scatter(SilentReduceScatter())
    elif args.compressor:
        ef = {"none": False, "fp32": True, "bf16": "bf16"}[args.error_feedback]
        state = compress_gradients(model, compress.from_string(args.compressor), error_feedback=ef,
                                   replicate=mesh["replicate"] if mesh is not None else None,
                                   hierarchical=False if args.flat else "auto")
    if args.quantize_weights:
        gathers = quantize_all_gather(model, args.block_size)
    opt = build_optimizer(args.optimizer, model, args.lr, args.projector, args.rank_fraction, args.update_proj_gap,
                          adamw_kwargs(args))

    def counted() -> int:
        total = state.stats()["total_bytes_sent"] if state is not None else 0
        return total + (gathers.stats()["total_bytes_sent"] if gathers is not None else 0)

    def before_eval() -> None:  # evaluate the trained full-precision (master) parameters
        if gathers is not None:
            gathers.remove()

    def finish(result: dict) -> None:
        if state is not None:
            stats = state.stats()
            result["reduce_scatter_ratio"] = stats["compression_ratio"]
            result["skipped_steps"] = stats["skipped_steps"]
        if hasattr(opt, "stats"):
            result["optimizer_comm"] = opt.stats()

    report = {"compressor": args.compressor, "error_feedback": args.error_feedback,
              "quantize_weights": args.quantize_weights, "hsdp": args.hsdp, "reshard": not args.no_reshard}
    return Run(model, model, data, loss_fn, opt, counted_bytes=counted,
               residual_bytes=lambda: state.residual_bytes() if state is not None else 0,
               buffer_bytes=lambda: ((state.pool.nbytes() if state is not None else 0)
                                     + (gathers.buffer_bytes() if gathers is not None else 0)),
               before_eval=before_eval, report=report, finish=finish)


def train(args: argparse.Namespace) -> dict:
    """Train on the initialized process group; returns the rank's result dict."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    run = (setup_fsdp if args.mode == "fsdp" else setup_ddp)(args, rank, world)
    times, losses, memory = [], [], {}
    counted_start = wire_start = 0
    for step in range(args.steps):
        if step == args.warmup:
            dist.barrier()
            counted_start = run.counted_bytes()
            wire_start = interface_tx_bytes(args.interface)
        batch = run.data.next()
        t0 = time.perf_counter()
        loss = run.loss_fn(run.runner, batch)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            memory["gradients"] = local_bytes(p.grad for p in run.model.parameters())
        run.opt.step()
        run.after_step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if rank == 0 and args.log_every and step % args.log_every == 0:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    timed = max(1, args.steps - args.warmup)
    wire = interface_tx_bytes(args.interface) - wire_start if args.interface else None
    if run.fixed_bytes_per_step is not None:
        bytes_per_step = float(run.fixed_bytes_per_step)
    else:
        bytes_per_step = (run.counted_bytes() - counted_start) / timed
    memory.update(parameters=local_bytes(run.model.parameters()), optimizer_state=optimizer_state_bytes(run.opt),
                  residuals=run.residual_bytes())
    memory["total"] = sum(memory.values())
    # commlib's reused message buffers; DDP's and plain FSDP's own buffers are not counted
    memory["comm_buffers"] = run.buffer_bytes()
    memory["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run.before_eval()
    with torch.no_grad():
        held_out = run.data.evaluation()
        eval_loss = sum(float(run.loss_fn(run.model, b)) for b in held_out) / len(held_out)
    dense = dense_bytes(run.model)
    params = [p.detach() for p in run.model.parameters()]
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]  # FSDP2: a collective
    checksum = float(torch.cat([p.reshape(-1) for p in params]).double().sum())
    step_times = sorted(times[args.warmup:]) or sorted(times)
    median = step_times[len(step_times) // 2]
    batch_size = args.batch * world
    result = {
        "mode": args.mode, "model": args.model, "optimizer": args.optimizer,
        "projector": args.projector if args.optimizer != "adamw" else None, **run.report,
        "world": world, "steps": args.steps, "warmup": args.warmup,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "step_seconds_median": median,
        # local steps sync once in H steps: their rate is the mean, not the median
        "step_seconds_mean": sum(step_times) / len(step_times),
        "samples_per_second_mean": batch_size * len(step_times) / sum(step_times),
        "samples_per_second": batch_size / median,
        "bytes_per_step": bytes_per_step, "dense_bytes_per_step": dense,
        "compression_ratio": dense / bytes_per_step if bytes_per_step else float("inf"),
        "wire_tx_bytes_per_step": wire / timed if wire is not None else None,
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "eval_loss": eval_loss, "losses": losses, "step_seconds": times,
        "memory_bytes": memory, "param_checksum": checksum,
    }
    run.finish(result)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    from commlib import hooks

    parser = argparse.ArgumentParser(prog="python -m workloads.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "resnet", "mlp"])
    parser.add_argument("--dim", type=int, default=256, help="gpt2 / mlp width, resnet base width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adamw", default=None, choices=list(ADAMW_IMPLEMENTATIONS),
                        help="torch AdamW implementation (default: fused with DDP, foreach with FSDP2)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "galore", "fira", "frugal"],
                        help="low-rank optimizers project the transformer blocks' matrices (GaLore's recipe)")
    parser.add_argument("--projector", default="dct", choices=["dct", "svd", "random"])
    parser.add_argument("--rank-fraction", type=float, default=0.25, help="rank / smaller side (FRUGAL: density)")
    parser.add_argument("--update-proj-gap", type=int, default=50)
    parser.add_argument("--compressor", help='DDP: the hook\'s compressor (--hook ef and friends), e.g. '
                        '"TopK(density=0.01)"; FSDP2: the reduce-scatter\'s, "silent" sends nothing (ceiling)')
    parser.add_argument("--interface", default=os.environ.get("COMMLIB_WIRE_INTERFACE"),
                        help="network interface whose tx bytes are reported (the emulated link)")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout in seconds")
    parser.add_argument("--out", help="write rank 0's JSON result here")
    parser.add_argument("--log-every", type=int, default=0)
    ddp = parser.add_argument_group("--mode ddp")
    ddp.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ddp.add_argument("--hook", default="none", choices=list(BASELINES) + hooks.names())
    ddp.add_argument("--option", action="append", default=[], help="hook option key=value (repeatable)")
    ddp.add_argument("--local-sgd", default="none", choices=["none", "diloco", "averager"],
                     help="local steps instead of DDP: commlib DiLoCo, or PyTorch's PeriodicModelAverager")
    ddp.add_argument("--sync-every", type=int, default=20, help="inner steps per sync (H) for --local-sgd")
    ddp.add_argument("--outer-lr", type=float, default=0.7)
    ddp.add_argument("--outer-momentum", type=float, default=0.9)
    ddp.add_argument("--outer-compressor", help='DiLoCo outer-gradient compressor, e.g. "QSGD(bits=4)"')
    ddp.add_argument("--outer-collective", default="auto")
    ddp.add_argument("--fragments", type=int, default=1)
    ddp.add_argument("--delay", type=int, default=0)
    ddp.add_argument("--mix", type=float, default=0.0)
    fsdp = parser.add_argument_group("--mode fsdp")
    fsdp.add_argument("--error-feedback", default="none", choices=["none", "fp32", "bf16"])
    fsdp.add_argument("--quantize-weights", action="store_true", help="int8 block-quantized all-gather (qwZ)")
    fsdp.add_argument("--block-size", type=int, default=256)
    fsdp.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=False (ZeRO-2-like)")
    fsdp.add_argument("--hsdp", action="store_true",
                      help="HSDP: shard inside each node (LOCAL_WORLD_SIZE ranks), replicate across nodes; with "
                           "--compressor the replica all-reduce is commlib's, compressed; without, FSDP2's native one")
    fsdp.add_argument("--flat", action="store_true",
                      help="keep the compressed reduce-scatter one hop on several nodes (no two-hop qgZ)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        result = train(args)
        checksums = [None] * dist.get_world_size()
        dist.all_gather_object(checksums, result["param_checksum"])
        result["ranks_agree"] = len(set(checksums)) == 1
        if dist.get_rank() == 0:
            line = json.dumps(result)
            print("RESULT " + line, flush=True)
            if args.out:
                Path(args.out).write_text(line)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from commlib.launch.mpi import leave

    main()
    # Errors above still raise and exit non-zero; a completed run leaves without C++ teardown (an
    # intermittent abort at exit turned finished runs into failures), finalizing MPI under mpiexec.
    leave(0)
