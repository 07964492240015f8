"""Lightning: a commlib comm hook on the DDP that ``DDPStrategy`` builds, on CPU and GPU alike.

``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=hook)`` is Lightning's documented way, and it
registers the hook **only when the root device is CUDA** (``DDPStrategy._register_ddp_hooks``);
on CPU the hook is dropped without a message. :class:`CommHookCallback` registers the strategy's
hook (or one it is given) in ``on_fit_start`` when Lightning did not, and leaves it alone when
Lightning did, so the same script is right on both. commlib states are built before the process
group exists and pickle while unbound, so ``ddp_spawn`` works too.

Example (2 CPU processes; ``examples/lightning_train.py`` is the whole script)::

    from pytorch_lightning import Trainer
    from pytorch_lightning.strategies import DDPStrategy
    from commlib import hooks
    from commlib.integrations.lightning import CommHookCallback

    state, hook = hooks.make("powersgd", rank=2)            # before init_process_group: binds late
    trainer = Trainer(accelerator="cpu", devices=2, max_steps=20,
                      strategy=DDPStrategy(ddp_comm_state=state, ddp_comm_hook=hook),
                      callbacks=[CommHookCallback()])       # registers it where Lightning does not
    trainer.fit(module, loader)

Works with ``pytorch_lightning`` and with ``lightning.pytorch`` (whichever is installed; the first
wins when both are).
"""

from __future__ import annotations

try:  # the standalone package first: its Trainer checks isinstance against its own Callback
    from pytorch_lightning import Callback
    from pytorch_lightning.strategies import DDPStrategy
except ImportError:  # pragma: no cover - depends on which package is installed
    from lightning.pytorch import Callback
    from lightning.pytorch.strategies import DDPStrategy

from commlib.integrations import mark_registered, register_comm_hook, registered_state

__all__ = ["CommHookCallback", "lightning_registers_hook"]


def lightning_registers_hook(strategy) -> bool:
    """Whether ``strategy`` registers its own ``ddp_comm_hook`` (Lightning 2.x: CUDA root device only)."""
    return (isinstance(strategy, DDPStrategy) and getattr(strategy, "_ddp_comm_hook", None) is not None
            and strategy.root_device.type == "cuda")


class CommHookCallback(Callback):
    """Register a commlib comm hook on ``trainer.strategy.model`` in ``on_fit_start``.

    Args:
        state, hook: what to register. Both None (the default): the ``ddp_comm_state`` and
            ``ddp_comm_hook`` given to the ``DDPStrategy``.

    Where Lightning registers the strategy's hook itself (CUDA), the callback only records it; a
    second ``fit`` on the same DDP does not register twice. Single-process runs (no DDP) are left alone.
    """

    def __init__(self, state=None, hook=None):
        if (state is None) != (hook is None):
            raise ValueError("give both state and hook, or neither (then the DDPStrategy's are used)")
        self.state = state
        self.hook = hook
        self.registered_by: str | None = None  # "lightning" or "callback", after on_fit_start
        self.registered_state = None  # the state running on the DDP (in spawned workers: their copy)

    def on_fit_start(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            return
        state, hook = self.state, self.hook
        if state is None:
            state, hook = getattr(strategy, "_ddp_comm_state", None), getattr(strategy, "_ddp_comm_hook", None)
            if hook is None:
                raise ValueError("CommHookCallback() without a state needs DDPStrategy(ddp_comm_state=..., "
                                 "ddp_comm_hook=...)")
        ddp = strategy.model
        self.registered_state = state
        if registered_state(ddp) is state:
            return
        if lightning_registers_hook(strategy) and strategy._ddp_comm_hook is hook:
            if strategy._ddp_comm_state is not state:
                raise ValueError("the DDPStrategy registers a different state with this hook; pass the same "
                                 "state to both, or give the hook to the callback only")
            mark_registered(ddp, state)  # Lightning registered it: only record it
            self.registered_by = "lightning"
            return
        register_comm_hook(ddp, state, hook)
        self.registered_by = "callback"
