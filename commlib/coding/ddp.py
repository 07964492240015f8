"""The loss side of gradient coding inside DDP: rank i's coded loss ``sum_j B[i, j] loss_j`` over the
parts ``code.parts(i)``. The hook that decodes before the SUM all-reduce, and what this form can and
cannot save, are :mod:`commlib.hooks.gc`."""

from __future__ import annotations

import torch

from commlib.coding.codes import GradientCode


def coded_loss(code: GradientCode, rank: int, part_losses: dict[int, torch.Tensor]) -> torch.Tensor:
    """``sum_j B[rank, j] loss_j`` over the parts this rank holds (``part_losses`` maps part -> loss)."""
    parts = code.parts(rank)
    missing = [j for j in parts if j not in part_losses]
    if missing:
        raise ValueError(f"rank {rank} needs the losses of parts {parts}; missing {missing}")
    return sum(float(code.B[rank, j]) * part_losses[j] for j in parts)
