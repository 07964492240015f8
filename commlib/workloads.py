"""Real training workloads for examples and benchmarks: models from ``transformers`` configs, real bytes.

Models are built from configs with random init (nothing downloaded):

* ``gpt2``: :class:`transformers.GPT2LMHeadModel`, byte vocabulary (256), trained on the Python
  install's own ``Lib/*.py`` sources (next-byte prediction);
* ``mlp``: ``layers`` x Linear(dim, dim), the communication-heavy check (8 x 1024), regressing the
  next ``dim`` source bytes from the previous ``dim``;
* ``resnet``: :class:`transformers.ResNetForImageClassification` (basic blocks), trained on
  scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32.

Run under ``torchrun`` (or ``mpiexec`` through :mod:`commlib.launch.mpi`) as a module::

    torchrun --nproc-per-node 2 -m commlib.workloads --model gpt2 --hook powersgd --option rank=4 --steps 30

Rank 0 prints one JSON line (``RESULT {...}``) with per-step times, losses, bytes per step and the
held-out loss at the end; ``--out`` also writes it to a file. Besides the commlib hooks (any name
in :func:`commlib.hooks.names`) it runs the baselines ``none`` (DDP's dense allreduce),
``torch_fp16`` and ``torch_powersgd`` (PyTorch's own hooks) so that every figure of a comparison
comes from the same code path.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

BASELINES = ("none", "torch_fp16", "torch_powersgd")


# ---------------------------------------------------------------------------------------- data
def python_source_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """Bytes of the standard library's ``.py`` files in sorted path order (identical on every rank)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def digits_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (ships with the package), as 3 x size x size floats."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target).long()


class ByteBatches:
    """Random windows of a rank's shard of the corpus; a fixed held-out tail for evaluation."""

    def __init__(self, rank: int, world: int, batch: int, context: int, seed: int):
        data = python_source_bytes()
        split = int(0.95 * data.numel())
        self.train = data[:split][rank::world]
        self.held_out = data[split:]
        self.batch, self.context = batch, context
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def windows(self, data: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.stack([data[o : o + self.context + 1] for o in offsets.tolist()])

    def next(self) -> torch.Tensor:
        offsets = torch.randint(0, self.train.numel() - self.context - 1, (self.batch,), generator=self.gen)
        return self.windows(self.train, offsets)

    def evaluation(self, batches: int = 8) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(12345)
        return [self.windows(self.held_out, torch.randint(0, self.held_out.numel() - self.context - 1,
                                                          (self.batch,), generator=gen))
                for _ in range(batches)]


class ByteWindowDataset(torch.utils.data.Dataset):
    """``count`` fixed windows of ``context`` bytes of the corpus, as ``{"input_ids", "labels"}`` (a
    causal LM shifts the labels itself): the map-style dataset the trainers' samplers shard."""

    def __init__(self, count: int = 512, context: int = 64, seed: int = 0):
        data = python_source_bytes()
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, data.numel() - context, (count,), generator=gen)
        self.windows = torch.stack([data[o : o + context] for o in offsets.tolist()])

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


class DigitBatches:
    def __init__(self, rank: int, world: int, batch: int, seed: int):
        x, y = digits_images()
        self.train_x, self.train_y = x[:1600][rank::world], y[:1600][rank::world]
        self.test_x, self.test_y = x[1600:], y[1600:]
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.train_x.shape[0], (self.batch,), generator=self.gen)
        return self.train_x[idx], self.train_y[idx]

    def evaluation(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.test_x, self.test_y)]


# ---------------------------------------------------------------------------------------- models
def gpt2_model(dim: int = 256, layers: int = 4, heads: int = 4, context: int = 64) -> nn.Module:
    """A GPT-2 LM (``transformers.GPT2Config``) over bytes, random init, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=dim, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def resnet_model(width: int = 32, depths: tuple = (1, 1, 1, 1)) -> nn.Module:
    """A ResNet (``transformers.ResNetConfig``, basic blocks) for the 10 digit classes."""
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = ResNetConfig(num_channels=3, embedding_size=width, hidden_sizes=[width * 2**i for i in range(4)],
                          depths=list(depths), layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    return ResNetForImageClassification(config)


def mlp_model(width: int = 1024, layers: int = 8) -> nn.Module:
    """The communication-heavy check of DESIGN.md: ``layers`` x Linear(width, width) with ReLU
    between them (8 x 1024: 8.4M parameters for ~17 MFLOP per sample)."""
    blocks = []
    for i in range(layers):
        blocks.append(nn.Linear(width, width))
        if i < layers - 1:
            blocks.append(nn.ReLU())
    return nn.Sequential(*blocks)


def mlp_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Predict the next ``width`` bytes of the sources from the previous ones (scaled to [0, 1])."""
    x = window.float().div_(255.0)
    half = x.shape[1] // 2
    return nn.functional.mse_loss(model(x[:, :half]), x[:, half : 2 * half])


def lm_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


def cnn_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(pixel_values=x).logits, y)


# ---------------------------------------------------------------------------------------- hooks
def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_compressor(text: str | None):
    """``"QSGD(bits=4)"`` -> ``compress.QSGD(bits=4)``."""
    from commlib import compress

    if not text:
        return None
    name, _, rest = text.partition("(")
    kwargs = {}
    for part in filter(None, (p.strip() for p in rest.rstrip(")").split(","))):
        key, _, value = part.partition("=")
        kwargs[key.strip()] = parse_value(value.strip())
    return getattr(compress, name.strip())(**kwargs)


def torch_powersgd_bytes(model: nn.Module, rank: int, min_compression_rate: float = 2.0) -> int:
    """Bytes per step PyTorch's PowerSGD hook sends (P and Q of each compressed matrix, the rest dense).

    Mirrors its per-tensor rule: a tensor is compressed when it is a matrix (after flattening
    trailing dims) and ``n*m >= min_compression_rate * (n + m) * rank``.
    """
    total = 0
    for p in model.parameters():
        if p.dim() > 1:
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = min(n, m, rank)
            if n * m >= min_compression_rate * (n + m) * r:
                total += (n + m) * r * p.element_size()
                continue
        total += p.numel() * p.element_size()
    return total


def register_hook(ddp: DDP, model: nn.Module, name: str, options: dict):
    """Register hook ``name`` on ``ddp``; returns ``(commlib_state_or_None, bytes_per_step_fn)``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    if name == "none":
        return None, lambda: dense
    if name == "torch_fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None, lambda: dense // 2
    if name == "torch_powersgd":
        rank = int(options.get("rank", 1))
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=int(options.get("start_iter", 2)),
                                            use_error_feedback=True, warm_start=True, random_seed=0)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        compressed = torch_powersgd_bytes(model, rank)
        return None, lambda: compressed
    from commlib import hooks

    state, hook = hooks.make(name, model=model, **options)
    ddp.register_comm_hook(state, hook)
    return state, None


def build_optimizer(name: str, model: nn.Module, lr: float, projector: str = "dct", rank_fraction: float = 0.25,
                    gap: int = 50, adamw: dict | None = None):
    """torch's AdamW, or a commlib low-rank optimizer with GaLore's recipe: the transformer blocks'
    matrices projected at rank ``rank_fraction`` x their smaller side, AdamW for the rest."""
    from commlib.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, **(adamw or {}))
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and ".h." in f".{n}"]
    if not matrices:  # not a GPT-2: every matrix and convolution
        matrices = [p for p in model.parameters() if p.dim() >= 2]
    ids = {id(p) for p in matrices}
    others = [p for p in model.parameters() if id(p) not in ids]
    group = {"params": matrices, "update_proj_gap": gap, "projector": projector}
    if name == "frugal":
        return FrugalAdamW([{"params": others}, {**group, "density": rank_fraction}], lr=lr)
    rank = max(1, int(rank_fraction * min(min(p.shape[0], p[0].numel()) for p in matrices)))
    cls = {"galore": GaLoreAdamW, "fira": FiraAdamW}[name]
    return cls([{"params": others}, {**group, "rank": rank}], lr=lr)


def interface_tx_bytes(interface: str | None) -> int:
    """Bytes sent so far on a network interface (the emulated node's link), 0 when not given."""
    if not interface:
        return 0
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


# ---------------------------------------------------------------------------------------- training
# torch.optim.AdamW's implementations: the same update rule, different kernels
ADAMW_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


class LocalSteps:
    """``--local-sgd``: each rank trains its own replica; commlib's DiLoCo, or PyTorch's
    ``PeriodicModelAverager`` (post-local SGD: parameter averaging every H steps, no outer
    optimizer, no compression), syncs them. ``stats()["total_bytes_sent"]`` books what one rank
    contributes (the averager: the dense parameters at each average)."""

    def __init__(self, args, model: nn.Module, opt):
        self.model, self.mode = model, args.local_sgd
        if self.mode == "diloco":
            from commlib.localsgd import DiLoCo

            compressor = parse_compressor(args.outer_compressor) if args.outer_compressor else None
            self.outer = DiLoCo(model, opt, sync_every=args.sync_every, outer_lr=args.outer_lr,
                                outer_momentum=args.outer_momentum, nesterov=args.outer_momentum > 0,
                                compressor=compressor, collective=args.outer_collective, fragments=args.fragments,
                                delay=args.delay, mix=args.mix, timeout=args.timeout)
        else:
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

            self.outer = PeriodicModelAverager(period=args.sync_every, warmup_steps=0)
            self.averaged_bytes = 0
            self.dense = sum(p.numel() * p.element_size() for p in model.parameters())

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
            return {"total_bytes_sent": self.outer.stats()["payload_bytes_total"]}
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


def parse_args(argv=None) -> argparse.Namespace:
    from commlib import hooks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--adamw", default="fused", choices=list(ADAMW_IMPLEMENTATIONS),
                        help="torch AdamW implementation (fused: one kernel per step, 5-7x faster on CPU here)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "galore", "fira", "frugal"],
                        help="low-rank optimizers project the transformer blocks' matrices (GaLore's recipe)")
    parser.add_argument("--projector", default="dct", choices=["dct", "svd", "random"])
    parser.add_argument("--rank-fraction", type=float, default=0.25, help="rank / smaller side (FRUGAL: density)")
    parser.add_argument("--update-proj-gap", type=int, default=50)
    parser.add_argument("--hook", default="none", choices=list(BASELINES) + hooks.names())
    parser.add_argument("--option", action="append", default=[], help="hook option key=value (repeatable)")
    parser.add_argument("--compressor", help='for --hook ef and friends, e.g. "TopK(density=0.01)"')
    parser.add_argument("--interface", default=os.environ.get("COMMLIB_WIRE_INTERFACE"),
                        help="network interface whose tx bytes are reported (the emulated link)")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout in seconds")
    parser.add_argument("--local-sgd", default="none", choices=["none", "diloco", "averager"],
                        help="local steps instead of DDP: commlib DiLoCo, or PyTorch's PeriodicModelAverager")
    parser.add_argument("--sync-every", type=int, default=20, help="inner steps per sync (H) for --local-sgd")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--outer-compressor", help='DiLoCo outer-gradient compressor, e.g. "QSGD(bits=4)"')
    parser.add_argument("--outer-collective", default="auto")
    parser.add_argument("--fragments", type=int, default=1)
    parser.add_argument("--delay", type=int, default=0)
    parser.add_argument("--mix", type=float, default=0.0)
    parser.add_argument("--out", help="write rank 0's JSON result here")
    parser.add_argument("--log-every", type=int, default=0)
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> dict:
    """Train on the initialized process group; returns the rank's result dict."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    if args.model == "gpt2":
        model = gpt2_model(args.dim, args.layers, args.heads, args.context)
        data = ByteBatches(rank, world, args.batch, args.context, args.seed)
        loss_fn = lm_loss
    elif args.model == "mlp":
        model = mlp_model(args.dim, args.layers)
        data = ByteBatches(rank, world, args.batch, 2 * args.dim - 1, args.seed)  # windows of 2 * width bytes
        loss_fn = mlp_loss
    else:
        model = resnet_model(args.dim)
        data = DigitBatches(rank, world, args.batch, args.seed)
        loss_fn = cnn_loss
    local_sgd = args.local_sgd != "none"
    ddp = model if local_sgd else DDP(model, bucket_cap_mb=args.bucket_cap_mb)
    options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.compressor:
        # the lowrank hook compresses the residual G - P R of Fira / FRUGAL with it
        options["residual" if args.hook == "lowrank" else "compressor"] = parse_compressor(args.compressor)
    opt = build_optimizer(args.optimizer, model, args.lr, args.projector, args.rank_fraction, args.update_proj_gap,
                          ADAMW_IMPLEMENTATIONS[args.adamw])
    if args.hook == "lowrank":  # the hook all-reduces this optimizer's projected gradients
        options["optimizer"] = opt
    if local_sgd:
        state, fixed_bytes = LocalSteps(args, model, opt), None
    else:
        state, fixed_bytes = register_hook(ddp, model, args.hook, options)
    times, losses = [], []
    hook_bytes_start = wire_start = 0
    for step in range(args.steps):
        if step == args.warmup:
            dist.barrier()
            hook_bytes_start = state.stats()["total_bytes_sent"] if state is not None else 0
            wire_start = interface_tx_bytes(args.interface)
        batch = data.next()
        t0 = time.perf_counter()
        loss = loss_fn(ddp, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if local_sgd:
            state.after_inner_step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if rank == 0 and args.log_every and step % args.log_every == 0:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    timed = max(1, args.steps - args.warmup)
    wire = interface_tx_bytes(args.interface) - wire_start if args.interface else None
    if state is not None:
        bytes_per_step = (state.stats()["total_bytes_sent"] - hook_bytes_start) / timed
    else:
        bytes_per_step = float(fixed_bytes())
    with torch.no_grad():
        held_out = data.evaluation()
        eval_loss = sum(float(loss_fn(model, b)) for b in held_out) / len(held_out)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    params = [p.detach().reshape(-1) for p in model.parameters()]
    checksum = float(torch.cat(params).double().sum())
    step_times = sorted(times[args.warmup:]) or sorted(times)
    batch_size = args.batch * world
    result = {
        "model": args.model, "hook": args.hook, "optimizer": args.optimizer,
        "projector": args.projector if args.optimizer != "adamw" else None,
        "options": {k: str(v) for k, v in options.items() if k != "optimizer"},
        "world": world, "steps": args.steps, "warmup": args.warmup,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds_median": step_times[len(step_times) // 2],
        # local steps sync once in H steps: their rate is the mean, not the median
        "step_seconds_mean": sum(step_times) / len(step_times),
        "samples_per_second_mean": batch_size * len(step_times) / sum(step_times),
        "samples_per_second": batch_size / step_times[len(step_times) // 2],
        "bytes_per_step": bytes_per_step, "dense_bytes_per_step": dense,
        "compression_ratio": dense / bytes_per_step if bytes_per_step else float("inf"),
        "wire_tx_bytes_per_step": wire / timed if wire is not None else None,
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "eval_loss": eval_loss, "losses": losses, "step_seconds": times,
        "param_checksum": checksum,
    }
    if local_sgd:
        result["local_sgd"] = state.describe()
        state.close()
    elif state is not None:
        stats = state.stats()
        result["skipped_steps"] = stats["skipped_steps"]
        if "lgreco" in stats:
            result["lgreco_plan"] = stats["lgreco"]["plan"]
        result["hierarchical"] = stats.get("hierarchical")
    return result


def main(argv=None) -> None:
    from datetime import timedelta

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
