"""One per-rank state layer for every stateful part of commlib: the checkpoint format, the load
verdict every rank agrees on, the option diff, the missing-tensor check, and the byte books behind
every ``stats()``.

A checkpointable state (a DDP hook state, the FSDP2 gradient compression, AGVM, DiLoCo) saves
``{"format": FORMAT, "method": ..., "world_size": ..., "rank{r}": <this rank's part>}``; rank 0
may gather every rank's part into one file (:func:`gather_state_dict`) and every rank loads the same
file. A load reaches one :class:`LoadVerdict` on all ranks (:func:`agree_on_load`): a lone reset
would desynchronise the dense warm-up and a lone refusal would leave the other ranks waiting.

Every ``stats()`` starts with :func:`byte_books`: the same keys everywhere and one zero-byte
convention (:func:`compression_ratio`).
"""

from __future__ import annotations

import enum
import math

import torch
import torch.distributed as dist

from commlib.validation import one_of

FORMAT = "commlib.hook_state/2"
ON_MISMATCH = ("error", "reset")


class LoadVerdict(enum.IntEnum):
    """What every rank does with a loaded state; ordered, so the ranks agree on the worst."""

    LOAD = 0    # every part fits: load it
    RESET = 1   # a part belongs to another rank or world size: drop the per-rank buffers (on_mismatch="reset")
    REFUSE = 2  # a part cannot be used under any policy (other options, model or layout): nothing loads


def check_on_mismatch(on_mismatch: str) -> None:
    one_of("on_mismatch", on_mismatch, ON_MISMATCH)


def own_verdict(fatal: str | None, problems: list[str]) -> LoadVerdict:
    """This rank's verdict alone: refuse on a fatal reason, reset on a problem, else load."""
    return LoadVerdict.REFUSE if fatal else LoadVerdict.RESET if problems else LoadVerdict.LOAD


def agree_on_load(fatal: str | None, problems: list[str], group=None) -> LoadVerdict:
    """The verdict of every rank on a load: the worst of the ranks' own (a collective)."""
    return LoadVerdict(any_rank_max(int(own_verdict(fatal, problems)), group))


def settle_load(method: str, verdict: LoadVerdict, fatal: str | None, problems: list[str], on_mismatch: str,
                what_is_per_rank: str) -> bool:
    """Raise what ``verdict`` calls for; returns True when the per-rank buffers are to be dropped.

    ``fatal`` is this rank's own reason to refuse (raised as is); ``problems`` its reasons for a
    reset; ``what_is_per_rank`` names the buffers that belong to one rank, for the error."""
    if fatal:
        raise ValueError(fatal)
    if verdict is LoadVerdict.REFUSE:
        raise ValueError(f"{method} state: another rank refused its part of the checkpoint (see its error); "
                         "nothing was loaded")
    if verdict is LoadVerdict.RESET and on_mismatch == "error":
        raise ValueError(f"{method} state: " + "; ".join(problems or ["another rank's state does not fit its rank "
                         "or world size (see its error)"]) + f". {what_is_per_rank} belong to one rank: save every "
                         "rank's state (hooks.gather_state_dict(state), or torch.distributed.checkpoint with "
                         "commlib.checkpoint.HookStateful(state)), or pass on_mismatch='reset' to drop them")
    return verdict is LoadVerdict.RESET


# ---------------------------------------------------------------------------------------- books
def compression_ratio(dense: int | float, sent: int | float) -> float:
    """``dense / sent``; 1.0 when nothing was due (no step yet), ``inf`` when bytes were due and
    none were sent. The one zero-byte convention of every ``stats()``."""
    if sent:
        return dense / sent
    return math.inf if dense else 1.0


def byte_books(method: str, step: int, bytes_sent: int, bytes_dense: int, total_bytes_sent: int,
               total_bytes_dense: int, skipped_steps: int) -> dict:
    """The keys every ``stats()`` starts with: the last step's payload and dense bytes, their
    ratio, the running totals and the steps skipped on a non-finite gradient."""
    return {"method": method, "step": int(step), "bytes_sent": int(bytes_sent), "bytes_dense": int(bytes_dense),
            "compression_ratio": compression_ratio(bytes_dense, bytes_sent),
            "total_bytes_sent": int(total_bytes_sent), "total_bytes_dense": int(total_bytes_dense),
            "skipped_steps": int(skipped_steps)}


BOOK_KEYS = tuple(byte_books("", 0, 0, 0, 0, 0, 0))


# ---------------------------------------------------------------------------------------- checkpoints
def require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("this needs an initialized torch.distributed process group (the state binds at its "
                           "first hook call, or at state.bind())")


def options_differ(saved: dict, now: dict) -> str:
    """``"k=saved (now current), ..."`` for every option that differs or exists on one side only."""
    differ = {k: (v, now.get(k)) for k, v in saved.items() if now.get(k) != v}
    differ.update({k: (None, v) for k, v in now.items() if k not in saved})
    return ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in sorted(differ.items()))


def missing_tensors(part: dict) -> list[str]:
    """Tensors a saved part lists in ``tensor_keys`` but does not hold (a DCP load into a fresh state)."""
    return sorted(set(filter(None, part["tensor_keys"].split("\n"))) - set(tensor_keys(part["buffers"])))


def any_rank_max(level: int, group=None) -> int:
    """The largest ``level`` over the ranks of ``group`` (one tiny all-reduce): every rank reaches the
    same verdict on a load."""
    if dist.get_world_size(group) == 1:
        return level
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([level], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def cloned_tensors(tree):
    """A copy of a nested dict whose tensors are cloned (primitives shared)."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: cloned_tensors(v) for k, v in tree.items()}
    return tree


def tensors_of(tree):
    """Every tensor in a nested dict."""
    if torch.is_tensor(tree):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors_of(v)


def tree_to(tree, device):
    """A copy of a nested dict with every tensor on ``device``."""
    if torch.is_tensor(tree):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: tree_to(v, device) for k, v in tree.items()}
    return tree


def tensor_keys(tree, prefix: str = "") -> list[str]:
    """Paths of every tensor in a nested dict (what a checkpoint must bring back)."""
    out = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if torch.is_tensor(v):
            out.append(path)
        elif isinstance(v, dict):
            out.extend(tensor_keys(v, path + "/"))
    return sorted(out)


def check_format(state, method: str) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not a commlib hook state of format {FORMAT!r} (got {type(state).__name__}"
                         f"{' with format ' + repr(state.get('format')) if isinstance(state, dict) else ''}); "
                         "states carry their rank and world size since this format")
    if state.get("method") != method:
        raise ValueError(f"state_dict is for hook {state.get('method')!r}, not {method!r}")


def is_rank_key(key) -> bool:
    """``rank{r}``: the key of one rank's part of a state dict."""
    return isinstance(key, str) and key.startswith("rank") and key[4:].isdigit()


def saved_ranks(state: dict) -> list[int]:
    return sorted(int(k[4:]) for k in state if is_rank_key(k))


def without_per_rank(buffers: dict, names) -> dict:
    """``buffers`` with the entries in ``names`` (those that belong to one rank) emptied."""
    return {k: ({} if k in names else v) for k, v in buffers.items()}


def pick_rank_state(state: dict, rank: int, world: int, method: str) -> tuple[dict, list[str]]:
    """This rank's part of a (possibly gathered) state dict, and what does not fit: another rank's
    state, or another world size. With no part of this rank, the lowest saved rank's is returned."""
    ranks = saved_ranks(state)
    if not ranks:
        raise ValueError(f"{method} hook state holds no rank's state")
    problems = []
    if int(state["world_size"]) != world:
        problems.append(f"saved in a world of {state['world_size']}, loading in a world of {world}")
    mine = state.get(f"rank{rank}")
    if mine is None:
        problems.append(f"state of rank {', '.join(map(str, ranks))} loaded on rank {rank}")
        mine = state[f"rank{ranks[0]}"]
    return mine, problems


def merge_rank_states(states: list):
    """Union of several ranks' state dicts: ``rank{r}`` parts side by side (recursively, for
    wrappers such as AGVM whose inner state is nested); other entries from the first."""
    first = states[0]
    if not isinstance(first, dict):
        return first
    out = {}
    for key in {k for s in states for k in s}:
        values = [s[key] for s in states if key in s]
        out[key] = merge_rank_states(values) if isinstance(values[0], dict) else values[0]
    return out


def gather_state_dict(state) -> dict:
    """Every rank's ``state.state_dict()`` in one dict (a collective: call it on every rank). Rank 0
    saves it; every rank loads the same file with ``state.load_state_dict`` and takes its own part."""
    require_initialized()
    group = getattr(state, "process_group", None)
    mine = state.state_dict()
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return merge_rank_states(everyone)


def stable_hash(key: str) -> int:
    """A process-independent 32-bit hash of a parameter key (Python's hash() is salted)."""
    h = 2166136261
    for byte in key.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def numel_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

