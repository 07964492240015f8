"""Hugging Face Trainer + commlib: a GPT-2 (``transformers`` config, random init) trained by
``transformers.Trainer`` with a commlib comm hook and a commlib low-rank optimizer.

    torchrun --nproc-per-node 2 examples/hf_trainer_train.py --hook powersgd --option rank=2 --optimizer fira

The Trainer has no comm-hook option and gives callbacks the unwrapped model;
:func:`commlib.integrations.hf.add_comm_hook` registers the hook on ``trainer.model_wrapped`` (the
DDP) when training begins. The low-rank optimizer goes in through ``optimizers=``, which keeps its
groups (``create_optimizer`` would regroup the parameters by weight decay). On CPU the script sets
``use_cpu=True`` and the gloo backend. ``--out`` writes every rank's parameter digest and hook bytes.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from commlib import compress, hooks
from commlib.integrations import rank_report, write_report
from commlib.integrations.hf import add_comm_hook
from workloads.data import ByteWindowDataset
from workloads.models import build_optimizer, gpt2_model, parse_value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hook", default="powersgd", choices=hooks.names())
    parser.add_argument("--option", action="append", default=[], help="hook option key=value (repeatable)")
    parser.add_argument("--compressor", help='for --hook ef, e.g. "QSGD(bits=4)"')
    parser.add_argument("--optimizer", default="fira", choices=["adamw", "galore", "fira", "frugal"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", help="JSON file for rank 0's report")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="commlib-hf-"), max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=args.lr, use_cpu=not on_gpu, ddp_backend=None if on_gpu else "gloo", report_to=[],
        save_strategy="no", logging_steps=max(1, args.steps // 2), disable_tqdm=True, seed=0,
        dataloader_num_workers=0, ddp_find_unused_parameters=False)
    torch.manual_seed(0)
    model = gpt2_model(dim=64, layers=2, heads=2, context=32)
    optimizer = build_optimizer(args.optimizer, model, args.lr, projector="svd", gap=10)
    trainer = Trainer(model=model, args=training_args, train_dataset=ByteWindowDataset(count=512, context=32),
                      optimizers=(optimizer, None))

    options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.compressor:
        options["compressor"] = compress.from_string(args.compressor)
    options.setdefault("start_iter", 2)
    state, hook = hooks.make(args.hook, **options)
    callback = add_comm_hook(trainer, state, hook)
    trainer.train()

    report = rank_report(trainer.model_wrapped, state)
    report.update(registered=callback.registered, optimizer=type(trainer.optimizer.optimizer
                                                                 if hasattr(trainer.optimizer, "optimizer")
                                                                 else trainer.optimizer).__name__,
                  global_step=trainer.state.global_step)
    if trainer.is_world_process_zero():
        write_report(report, args.out)
    state.close()  # the hook's thread and private group, before the interpreter tears threads down
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
