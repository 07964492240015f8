"""Lightning + commlib: a GPT-2 (from a ``transformers`` config, random init) trained with a commlib
comm hook and a commlib low-rank optimizer, on CPU or GPU.

    python examples/lightning_train.py --devices 2 --hook powersgd --option rank=2 --optimizer galore

The state is built before the process group exists (as Lightning's docs build theirs) and given to
``DDPStrategy``, which registers it on CUDA; on CPU Lightning drops it silently, and
``CommHookCallback`` registers it there. ``--out`` writes every rank's parameter digest and hook bytes.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.strategies import DDPStrategy

from commlib import compress, hooks
from commlib.integrations import rank_report, write_report
from commlib.integrations.lightning import CommHookCallback
from workloads.data import ByteWindowDataset
from workloads.models import build_optimizer, gpt2_model, parse_value


class ByteLM(LightningModule):
    def __init__(self, optimizer: str, lr: float):
        super().__init__()
        self.model = gpt2_model(dim=64, layers=2, heads=2, context=32)
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        # runs after init_process_group and the DDP wrap: these are the parameters DDP reduces
        return build_optimizer(self.optimizer_name, self.model, self.lr, projector="svd", gap=10)


class Report(Callback):
    """After training, on every rank (spawned workers too): parameter digests and hook bytes of all ranks."""

    def __init__(self, hook_callback: CommHookCallback, out: str | None):
        self.hook_callback, self.out = hook_callback, out

    def on_train_end(self, trainer, pl_module) -> None:
        report = rank_report(trainer.strategy.model, self.hook_callback.registered_state)
        report["registered_by"] = self.hook_callback.registered_by
        report["optimizer"] = type(trainer.optimizers[0]).__name__
        if trainer.global_rank == 0:
            write_report(report, self.out)
        self.hook_callback.registered_state.close()  # the hook's thread and private group, before exit


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--hook", default="powersgd", choices=hooks.names())
    parser.add_argument("--option", action="append", default=[], help="hook option key=value (repeatable)")
    parser.add_argument("--compressor", help='for --hook ef, e.g. "QSGD(bits=4)"')
    parser.add_argument("--optimizer", default="galore", choices=["adamw", "galore", "fira", "frugal"])
    parser.add_argument("--start-method", default="popen", choices=["popen", "spawn", "fork"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--port", type=int, help="rendezvous port (default: Lightning's MASTER_PORT choice)")
    parser.add_argument("--out", help="JSON file for rank 0's report")
    args = parser.parse_args(argv)

    if args.port:
        os.environ["MASTER_PORT"] = str(args.port)
    options = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.compressor:
        options["compressor"] = compress.from_string(args.compressor)
    options.setdefault("start_iter", 2)
    state, hook = hooks.make(args.hook, **options)  # no process group yet: the state binds at its first bucket
    torch.manual_seed(0)  # the same init everywhere (DDP broadcasts rank 0's anyway)
    module = ByteLM(args.optimizer, args.lr)
    loader = torch.utils.data.DataLoader(ByteWindowDataset(count=512, context=32), batch_size=8, shuffle=True)
    hook_callback = CommHookCallback()
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = Trainer(
        accelerator=accelerator, devices=args.devices, max_steps=args.steps,
        strategy=DDPStrategy(ddp_comm_state=state, ddp_comm_hook=hook, start_method=args.start_method),
        callbacks=[hook_callback, Report(hook_callback, args.out)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="commlib-lightning-"))
    trainer.fit(module, loader)


if __name__ == "__main__":
    main()
