"""Every touch of FSDP2's private internals, in one module, behind one torch-version check.

FSDP2 hands a custom collective flat buffers only, and its comm base classes live in a private
module. commlib needs, and reads here only:

* the comm base classes ``AllGather`` and ``ReduceScatter`` (``torch.distributed.fsdp._fully_shard._fsdp_api``),
  and the defaults that put FSDP2's own collectives back (``_fsdp_collectives``);
* each parameter's padded shard shape, in reduce-scatter order (``FSDPModule._get_fsdp_state()``).

``set_custom_all_gather`` / ``set_custom_reduce_scatter`` arrived in torch 2.9 (pytorch#155189);
an older torch gets a clear ``RuntimeError`` at import of :mod:`commlib.fsdp` instead of an
``AttributeError`` mid-step.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

MIN_TORCH = (2, 9)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def require_supported_torch() -> None:
    """Raise ``RuntimeError`` unless this torch has FSDP2's custom collectives."""
    if torch_version() < MIN_TORCH or not hasattr(FSDPModule, "set_custom_reduce_scatter"):
        raise RuntimeError(f"commlib.fsdp needs torch >= {'.'.join(map(str, MIN_TORCH))} (FSDPModule."
                           f"set_custom_reduce_scatter / set_custom_all_gather); this is torch {torch.__version__}")


require_supported_torch()

from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter  # noqa: E402

__all__ = ["AllGather", "MIN_TORCH", "ReduceScatter", "padded_shard_shapes", "require_supported_torch",
           "restore_default_all_gather", "restore_default_reduce_scatter", "torch_version"]


def padded_shard_shapes(module: FSDPModule) -> list[tuple[int, ...]]:
    """The padded per-rank shard shape of each parameter, in FSDP's reduce-scatter order (FSDP hands
    the comm flat buffers only, so the matrix-wise compressors read the layout here)."""
    groups = module._get_fsdp_state()._fsdp_param_groups
    if len(groups) > 1:
        raise ValueError("compress_gradients supports one parameter group per FSDP module (no shard_placement_fn "
                         "with per-parameter meshes)")
    return [tuple(p.padded_sharded_param_size) for g in groups for p in g.fsdp_params]


def restore_default_reduce_scatter(module: FSDPModule) -> None:
    """Put FSDP2's own reduce-scatter back on ``module``."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    module.set_custom_reduce_scatter(DefaultReduceScatter())


def restore_default_all_gather(module: FSDPModule) -> None:
    """Put FSDP2's own all-gather back on ``module``."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    module.set_custom_all_gather(DefaultAllGather())
