"""Gradient coding inside DDP: coded losses per rank and a hook that decodes before the SUM all-reduce.

The data is split into n parts (n = world size). Uncoded DDP has rank i train on part i and averages:
``(1/n) sum_i g_i``. With a gradient code, rank i computes the coded combination
``f_i = sum_j B[i, j] g_j`` of the parts ``code.parts(i)`` (:func:`coded_loss` weights the part
losses), and the hook returns ``(1/n) sum_{i alive} a_i f_i = (1/n) sum_j g_j`` for the decoding
coefficients ``a`` of the ranks that did not straggle: the same update as uncoded DDP.

What it can and cannot save: NCCL/gloo all-reduce waits for every rank, so inside DDP a straggler's
contribution can only be *erased* (its coefficient is 0), not skipped in time: this form gives
exactly the decoded gradient under a straggler pattern (for testing codes on a real model, and for
ranks whose results are known to be bad), but no wall-clock saving. The wall-clock benefit needs the
master/worker runtime with deadlines, :mod:`commlib.coding.runtime`.
"""

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
