"""Hugging Face ``Trainer``: a commlib comm hook and a commlib low-rank optimizer.

The ``Trainer`` has no comm-hook setting, builds the DDP itself (through Accelerate) and hands its
callbacks the *unwrapped* model, so a hook registered on ``model`` in a callback never runs.
:func:`add_comm_hook` adds a callback that holds the trainer and registers the hook on
``trainer.model_wrapped`` (the DDP) in ``on_train_begin``, once per DDP, however many times
``train()`` is called. A commlib optimizer goes in through ``optimizers=(optimizer, scheduler)``:
the Trainer's own ``create_optimizer`` would split the parameters into its two weight-decay groups
and lose the low-rank group layout.

Example (``examples/hf_trainer_train.py`` is the whole script)::

    from transformers import Trainer, TrainingArguments
    from commlib import hooks
    from commlib.integrations.hf import add_comm_hook
    from commlib.optim import GaLoreAdamW

    optimizer = GaLoreAdamW(groups, lr=1e-3)
    trainer = Trainer(model=model, args=TrainingArguments(..., use_cpu=True, ddp_backend="gloo"),
                      train_dataset=dataset, optimizers=(optimizer, None))
    state, hook = hooks.make("powersgd", rank=2)
    add_comm_hook(trainer, state, hook)
    trainer.train()
"""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback

from commlib.integrations import register_comm_hook

__all__ = ["CommHookTrainerCallback", "add_comm_hook"]


class CommHookTrainerCallback(TrainerCallback):
    """Registers ``hook`` with ``state`` on ``trainer.model_wrapped`` when training begins (DDP runs only)."""

    def __init__(self, trainer, state, hook):
        self.trainer = trainer
        self.state = state
        self.hook = hook
        self.registered = False

    def on_train_begin(self, args, control_state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if args.parallel_mode.value != "distributed":
            return  # one process: nothing to communicate
        if not isinstance(wrapped, DistributedDataParallel):
            raise TypeError(f"the Trainer wrapped the model in {type(wrapped).__name__}, not DDP; "
                            "a DDP comm hook cannot run there")
        register_comm_hook(wrapped, self.state, self.hook)
        self.registered = True


def add_comm_hook(trainer, state, hook) -> CommHookTrainerCallback:
    """Add (and return) the callback that registers a commlib hook on ``trainer``'s DDP."""
    callback = CommHookTrainerCallback(trainer, state, hook)
    trainer.add_callback(callback)
    return callback
