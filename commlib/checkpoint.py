"""Hook states in ``torch.distributed.checkpoint`` (DCP): per-rank state that is neither lost nor merged.

Two properties of DCP make a hook state unsafe to hand it directly:

* DCP keeps **one** copy of a plain tensor or value saved under the same key on every rank (it
  takes such entries for replicated ones), so per-rank error-feedback residuals would come back
  as one rank's residuals on every rank. A commlib state dict keeps its part under ``rank{r}``,
  which DCP does not merge.
* DCP loads tensors **in place**, into the tensors of the ``state_dict()`` it asks for first. A
  fresh state (a restarted job) has no residuals yet, so DCP would bring nothing back for them.
  A hook state handed to DCP directly notices that (its ``tensor_keys`` record) and refuses.

:class:`HookStateful` wraps a state for DCP: this rank's ``state.state_dict()`` travels as one
serialized blob under ``rank{r}``, which DCP loads whole whatever the fresh state holds. The load
then goes through ``state.load_state_dict`` with every check of the hook state (rank, world size,
method, options, layout). After an elastic restart into *more* ranks, the new ranks find no
``rank{r}`` entry: with ``on_mismatch="reset"`` pass ``planner=DefaultLoadPlanner(allow_partial_load=True)``
to ``dcp.load`` and they start from the replicated part (``common``) with fresh buffers; with
``"error"`` the load fails.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

from commlib.comm.rank_state import (
    check_on_mismatch,
    is_rank_key,
    require_initialized,
    tensor_keys,
    without_per_rank,
)


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=True)


class HookStateful:
    r"""A DCP ``Stateful`` around a commlib hook state (or AGVM, or :class:`commlib.localsgd.DiLoCo`).

    Example::

        >>> import torch.distributed.checkpoint as dcp                                    # doctest: +SKIP
        >>> from commlib.checkpoint import HookStateful    # doctest: +SKIP
        >>> dcp.save({"model": model.state_dict(), "hook": HookStateful(state)}, checkpoint_id=path) # doctest: +SKIP
        >>> # after a restart, in fresh processes, with a fresh state:
        >>> dcp.load({"model": model.state_dict(), "hook": HookStateful(state)}, checkpoint_id=path) # doctest: +SKIP

    Arguments:
        state: the hook state.
        on_mismatch: ``"error"`` (default) or ``"reset"``, as ``state.load_state_dict``.
    """

    def __init__(self, state, on_mismatch: str = "error"):
        check_on_mismatch(on_mismatch)
        if not hasattr(state, "state_dict") or not hasattr(state, "load_state_dict"):
            raise ValueError(f"state must be a commlib hook state, got {type(state).__name__}")
        self.state = state
        self.on_mismatch = on_mismatch

    def _rank_world(self) -> tuple[int, int]:
        require_initialized()
        group = getattr(self.state, "process_group", None)
        return dist.get_rank(group), dist.get_world_size(group)

    def state_dict(self) -> dict:
        rank, world = self._rank_world()
        full = self.state.state_dict()
        return {"world_size": world, "common": _to_bytes(_replicated_part(self.state, full)),
                f"rank{rank}": _to_bytes(full)}

    def load_state_dict(self, state_dict: dict) -> None:
        rank, world = self._rank_world()
        blob = state_dict.get(f"rank{rank}")
        if isinstance(blob, bytes):
            loaded = _from_bytes(blob)
        elif self.on_mismatch == "reset":  # a rank the saving world did not have (a grown world)
            loaded = _from_bytes(state_dict["common"])
        else:
            raise ValueError(f"the checkpoint holds no hook state of rank {rank}: saved in a world of "
                             f"{state_dict.get('world_size')}, loading in a world of {world} (pass "
                             "on_mismatch='reset' and a DefaultLoadPlanner(allow_partial_load=True) to restart "
                             "the new ranks with fresh error-feedback buffers)")
        self.state.load_state_dict(loaded, on_mismatch=self.on_mismatch)


def _replicated_part(state_obj, full: dict) -> dict:
    """``full`` (``state_obj.state_dict()``) with the per-rank buffers emptied: what a rank that the
    saving world lacked can start from (step counter, plans, warm-start factors)."""
    out = dict(full)
    per_rank = getattr(state_obj, "per_rank_buffers", ())
    for key, part in full.items():
        if is_rank_key(key) and isinstance(part, dict) and "buffers" in part:
            buffers = without_per_rank(part["buffers"], per_rank)
            out[key] = {**part, "buffers": buffers, "tensor_keys": "\n".join(tensor_keys(buffers))}
    inner = getattr(state_obj, "inner_state", None)
    if inner is not None and isinstance(full.get("inner"), dict):
        out["inner"] = _replicated_part(inner, full["inner"])
    return out


__all__ = ["HookStateful"]


def save_atomic(obj, path) -> None:
    """``torch.save(obj, path)`` that never leaves a torn file: written to a temporary file in the
    same directory, flushed to disk, then renamed over ``path`` (a crash mid-save keeps the previous
    checkpoint whole)."""
    import os
    import tempfile

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
