"""Accelerate + commlib: a GPT-2 (``transformers`` config, random init) trained with a commlib comm
hook registered on the DDP that ``accelerator.prepare`` returns, with gradient accumulation.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --cpu \\
        --hook ef --compressor "QSGD(bits=4)" --accumulate 2

On CPU pass ``--cpu`` (``Accelerator(cpu=True)``): ``accelerate launch --cpu --num_processes 2``
starts one process, and ``--multi_gpu`` without ``cpu=True`` finds no GPU and trains each process
alone. ``DistributedDataParallelKwargs(comm_hook=...)`` ignores a function, so the hook is
registered with :func:`commlib.integrations.accelerate.register_comm_hook` after ``prepare``.
Under ``accelerator.accumulate`` DDP skips the all-reduce (and the hook) on the steps that only
accumulate. ``--out`` writes every rank's parameter digest and hook bytes.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from accelerate import Accelerator

from commlib import compress, hooks
from commlib.integrations import rank_report, write_report
from commlib.integrations.accelerate import register_comm_hook
from workloads.data import ByteWindowDataset
from workloads.models import gpt2_model, parse_value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="train on CPU processes (gloo)")
    parser.add_argument("--hook", default="ef", choices=hooks.names())
    parser.add_argument("--option", action="append", default=[], help="hook option key=value (repeatable)")
    parser.add_argument("--compressor", default="QSGD(bits=4)", help='for --hook ef, e.g. "QSGD(bits=4)"')
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", help="JSON file for rank 0's report")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu, gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    model = gpt2_model(dim=64, layers=2, heads=2, context=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(ByteWindowDataset(count=512, context=32), batch_size=8, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.hook == "ef":
        options["compressor"] = compress.from_string(args.compressor)
    options.setdefault("start_iter", 2)
    state, hook = hooks.make(args.hook, **options)
    registered = register_comm_hook(model, state, hook, accelerator=accelerator)

    micro_batches = 0
    batches = iter(loader)
    while micro_batches < args.steps * args.accumulate:
        batch = next(batches)
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        micro_batches += 1

    report = rank_report(model, state) if accelerator.num_processes > 1 else {}
    report.update(registered=registered, distributed_type=str(accelerator.distributed_type),
                  num_processes=accelerator.num_processes, micro_batches=micro_batches, loss=float(loss.detach()))
    if accelerator.is_main_process:
        write_report(report, args.out)
    state.close()  # the hook's thread and private group, before the interpreter tears threads down
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
