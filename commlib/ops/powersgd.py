"""PowerSGD's passes fused (Vogels et al. 2019, Alg. 1): ``M = G + E`` with ``P = M Q`` in one pass,
then ``P Q^T`` written out with ``M <- M - P Q^T``. Per op: its schema, its pure-PyTorch reference
(the kernels in ``csrc/*/powersgd.*`` match it within the float dot-product bound), its fake kernel
and its typed wrapper."""

from __future__ import annotations

import torch

from commlib.ops._library import define, dispatch

__all__ = ["powersgd_backproject_", "powersgd_project"]


def check_powersgd(op: str, m: torch.Tensor, q: torch.Tensor) -> None:
    if m.dtype != torch.float32 or q.dtype != torch.float32:
        raise RuntimeError(f"commlib::{op}: expected float32 tensors")
    if m.dim() != 2 or q.dim() != 2 or q.shape[0] != m.shape[1]:
        raise RuntimeError(f"commlib::{op}: shapes {tuple(m.shape)} and {tuple(q.shape)} do not chain "
                           "(M is rows x cols, Q is cols x r)")


# ------------------------------------------------------------------ powersgd_project
def powersgd_project_reference(grad, residual, q, m):
    check_powersgd("powersgd_project", grad, q)
    for name, t in (("m", m), ("residual", residual)):
        if t is not None and (t.shape != grad.shape or t.dtype != torch.float32):
            raise RuntimeError(f"commlib::powersgd_project: {name} must be a float32 matrix shaped like grad")
    if residual is None:
        m.copy_(grad)
    else:
        torch.add(grad, residual, out=m)
    return m @ q


define("powersgd_project(Tensor grad, Tensor? residual, Tensor q, Tensor(a!) m) -> Tensor",
       powersgd_project_reference, lambda grad, residual, q, m: grad.new_empty((grad.shape[0], q.shape[1])))


def powersgd_project(grad: torch.Tensor, residual: torch.Tensor | None, q: torch.Tensor,
                     m: torch.Tensor) -> torch.Tensor:
    """``m <- grad + residual`` (``grad`` without a residual) and ``P = m q`` in one pass over the
    matrix (float32, ``grad`` rows x cols, ``q`` cols x r); returns ``P``."""
    return dispatch("powersgd_project", grad, residual, q, m)


# ------------------------------------------------------------------ powersgd_backproject_
def powersgd_backproject_reference(m, p, q, out) -> None:
    check_powersgd("powersgd_backproject_", m, q)
    if p.dtype != torch.float32 or p.shape != (m.shape[0], q.shape[1]):
        raise RuntimeError(f"commlib::powersgd_backproject_: p must be float32 of shape ({m.shape[0]}, {q.shape[1]})")
    if out.shape != m.shape or out.dtype != torch.float32:
        raise RuntimeError("commlib::powersgd_backproject_: out must be a float32 matrix shaped like m")
    torch.mm(p, q.t(), out=out)
    m.sub_(out)


define("powersgd_backproject_(Tensor(a!) m, Tensor p, Tensor q, Tensor(b!) out) -> ()",
       powersgd_backproject_reference, lambda *args: None)


def powersgd_backproject_(m: torch.Tensor, p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out <- p q^T`` and ``m <- m - p q^T`` in one pass (float32); returns ``m``."""
    dispatch("powersgd_backproject_", m, p, q, out)
    return m
