"""The hook names of :func:`make`: each method's module registers its state class (or factory)
with :func:`register`; this module imports none of them, so a method built on another (AGVM wraps
an inner hook) looks its inner method up here without an import cycle."""

import torch
import torch.distributed as dist

_REGISTRY: dict = {}  # name -> state class or factory, in registration order


# no `from __future__ import annotations` here: DDP checks this hook's annotations as real types
def commlib_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook of every commlib method: ``state.run(bucket)``."""
    return state.run(bucket)


def register(name: str, factory=None):
    """Add method ``name`` to :func:`make`: ``register(name, factory)``, or ``@register(name)`` on a
    state class or factory ``(process_group, **options) -> state``. Returns the factory."""
    if factory is None:
        return lambda f: register(name, f)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a hook name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory
    return factory


def names() -> list[str]:
    """The hook names :func:`make` accepts, in registration order."""
    return list(_REGISTRY)


def make(name: str, process_group=None, **options):
    """Build ``(state, hook)`` for method ``name``; options go to the state's constructor.

    Example::

        >>> from commlib import hooks
        >>> state, hook = hooks.make("powersgd", rank=2, model=model)   # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)                   # doctest: +SKIP
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown hook {name!r}; hooks.names() lists {names()}")
    return _REGISTRY[name](process_group, **options), commlib_hook
