"""L-GreCo: layer-wise adaptive compression (Markov, Ramezani-Kebrya, Alistarh; MLSys 2024)."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from commlib import compress
from commlib.comm.patterns import split_like
from commlib.comm.queue import Comm
from commlib.compress.topk import topk_count
from commlib.hooks.ef import ErrorFeedbackState
from commlib.hooks.lgreco_solver import lowrank_errors, plan_with_fallback, qsgd_errors, topk_errors
from commlib.hooks.powersgd import PowerSGDState, should_compress
from commlib.hooks.registry import register
from commlib.hooks.state import ParamView
from commlib.validation import integer, number, one_of

FAMILIES = ("powersgd", "topk", "qsgd")


def default_candidates(family: str, default) -> list:
    """L-GreCo's candidate sets around the default: ranks [r/2, 2r]; densities d/4..4d; bits b-2..b+2."""
    if family == "powersgd":
        return list(range(max(1, default // 2), 2 * default + 1))
    if family == "topk":
        return sorted({min(1.0, default * f) for f in (0.25, 0.5, 1.0, 2.0, 4.0)})
    return list(range(max(1, default - 2), min(8, default + 2) + 1))


class LGreCoMixin:
    r"""Periodic retuning shared by the L-GreCo states (the family's state does the compression).

    Every ``retune_every`` steps (the first time at ``start_iter``, from the warm-up gradients),
    each rank's finite local gradients of the last ``accumulate_steps`` steps are summed,
    all-reduced (so every rank holds identical tensors; a non-finite sum keeps the old plan), and for
    every layer and candidate setting the error
    ``E[l, k]`` and bytes ``S[l, k]`` are computed; the DP of :mod:`commlib.hooks.lgreco_solver`
    then picks one setting per layer minimising bytes with total error <= ``alpha`` x the uniform
    default's. Rank 0's plan is broadcast as an int tensor. Warm-start ``Q`` (resized) and
    error-feedback buffers carry over a retune. Overflow (rule 7): a layer whose gradient any rank
    saw non-finite in the window is left out of the retune on every rank, agreed by a flag per
    layer all-reduced before the sum (:meth:`agreed_layers`); it keeps its setting.
    """

    def _init_lgreco(self, family, candidates, default, alpha, retune_every, accumulate_steps, error_buckets):
        if candidates is None:
            candidates = default_candidates(family, default)
        candidates = list(candidates)
        if not candidates:
            raise ValueError("candidates must be a non-empty list of settings")
        if default not in candidates:
            raise ValueError(f"the default setting {default!r} must be one of the candidates {candidates!r}")
        number("alpha", alpha, low=0, low_open=True)
        for name, value, low in [("retune_every", retune_every, 1), ("accumulate_steps", accumulate_steps, 1),
                                 ("error_buckets", error_buckets, 10)]:
            integer(name, value, low)
        if accumulate_steps > retune_every:
            raise ValueError(f"accumulate_steps must be <= retune_every ({retune_every}), got {accumulate_steps}")
        self.family = family
        self.candidates = candidates
        self.default_index = candidates.index(default)
        self.alpha = float(alpha)
        self.retune_every = retune_every
        self.accumulate_steps = accumulate_steps
        self.error_buckets = error_buckets
        self.plan: dict[str, int] = {}  # parameter -> candidate index
        self.accumulated: dict[str, torch.Tensor] = {}
        self.tainted: set[str] = set()  # layers this rank saw overflow since the last retune
        self.grad_dtypes: dict[str, torch.dtype] = {}
        self.history: list[dict] = []
        self.next_retune = -1  # set to start_iter once the base state exists

    # ------------------------------------------------------------------ hooks of HookState
    def observe(self, views: list[ParamView], step: int) -> None:
        if self.next_retune < 0:
            self.next_retune = self.start_iter
        if not self.next_retune - self.accumulate_steps <= step < self.next_retune:
            return
        for v in views:
            if v.grad.dim() <= 1:
                continue
            # every rank keeps the same keys (a layer's sum may stay zero); a layer this rank saw
            # overflow is marked, and the retune drops it on every rank (agreed before the sum)
            self.grad_dtypes[v.key] = v.grad.dtype
            acc = self.accumulated.get(v.key)
            if acc is None:
                acc = self.accumulated[v.key] = torch.zeros(v.grad.shape, dtype=torch.float32, device=v.grad.device)
            if bool(torch.isfinite(v.grad).all()):
                acc.add_(v.grad)
            else:  # an overflowed step teaches nothing
                self.tainted.add(v.key)

    def prepare(self, comm: Comm, step: int) -> None:
        if self.next_retune < 0:
            self.next_retune = self.start_iter
        if step >= self.next_retune:
            self.retune(comm, step)

    # ------------------------------------------------------------------ the retune
    def retune(self, comm: Comm, step: int) -> None:
        start = time.perf_counter()
        keys = self.agreed_layers(comm, step)
        flat = torch.cat([self.accumulated[k].reshape(-1) for k in keys]) if keys else None
        if flat is not None:
            comm.all_reduce(flat)
            self.count_bytes(flat.numel() * flat.element_size(), 0)  # the retune's traffic is on the books too
        if flat is not None and bool(torch.isfinite(flat).all()):  # same verdict on every rank
            summed = split_like(flat, [self.accumulated[k] for k in keys])
            self.accumulated = dict(zip(keys, summed))
            errors = np.zeros((len(keys), len(self.candidates)))
            sizes = np.zeros((len(keys), len(self.candidates)))
            for i, k in enumerate(keys):
                errors[i], sizes[i] = self.candidate_table(self.accumulated[k], self.grad_dtypes[k])
            default = np.full(len(keys), self.default_index)
            plan, budget = plan_with_fallback(errors, sizes, default, self.alpha, self.error_buckets)
            chosen = torch.from_numpy(plan.astype(np.int64))
            comm.broadcast(chosen, src=0)  # one plan everywhere, even if an SVD differed in the last bit
            plan = chosen.numpy()
            rows = np.arange(len(keys))
            self.plan = {k: int(c) for k, c in zip(keys, plan)}
            self.apply_plan()
            self.history.append({
                "step": step,
                "solve_seconds": time.perf_counter() - start,
                "bytes_planned": float(sizes[rows, plan].sum()),
                "bytes_uniform": float(sizes[rows, default].sum()),
                "error_budget": budget,
                "error_planned": float(errors[rows, plan].sum()),
                "error_uniform": float(errors[rows, default].sum()),
                "choices": {k: self.setting_of(k) for k in keys},
            })
        self.accumulated = {}
        self.tainted = set()
        while self.next_retune <= step:
            self.next_retune += self.retune_every

    def agreed_layers(self, comm: Comm, step: int) -> list[str]:
        """The layers whose statistics count in this retune, the same list on every rank (rule 7):
        every rank accumulated the same keys (checked), and a layer any rank saw overflow is dropped
        everywhere (a flag per layer, all-reduced before the sum whose length depends on it). A
        dropped layer keeps its current setting."""
        keys = sorted(self.accumulated)
        counts = torch.tensor([len(keys), -len(keys)], dtype=torch.int64, device=self._flag_device())
        if comm.world_size > 1:
            from commlib.comm.queue import _collective

            _collective(torch.distributed.all_reduce, counts, op=torch.distributed.ReduceOp.MAX, group=comm.group)
        if int(counts[0]) != -int(counts[1]):
            raise RuntimeError(f"L-GreCo retune at step {step}: the ranks accumulated statistics of different "
                               f"numbers of layers ({-int(counts[1])} to {int(counts[0])}; this rank {len(keys)})")
        if not keys:
            return []
        flags = torch.tensor([k in self.tainted for k in keys], dtype=torch.float32, device=self._flag_device())
        comm.all_reduce(flags)
        self.count_bytes(flags.numel() * flags.element_size(), 0)
        return [k for k, bad in zip(keys, flags.tolist()) if bad == 0]

    def _flag_device(self):
        any_acc = next(iter(self.accumulated.values()), None)
        return any_acc.device if any_acc is not None else "cpu"

    def candidate_table(self, grad: torch.Tensor, dtype: torch.dtype) -> tuple[list[float], list[float]]:
        """Errors and bytes (for gradients of ``dtype``) of every candidate on one layer's accumulated gradient."""
        raise NotImplementedError

    def apply_plan(self) -> None:
        raise NotImplementedError

    def setting_of(self, key: str):
        return self.candidates[self.plan.get(key, self.default_index)]

    # ------------------------------------------------------------------ reporting and state
    def lgreco_stats(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {
            "family": self.family,
            "retunes": len(self.history),
            "next_retune": self.next_retune,
            "plan": {k: self.setting_of(k) for k in sorted(self.plan)},
            "solve_seconds": last.get("solve_seconds", 0.0),
            "bytes_planned": last.get("bytes_planned", 0.0),
            "bytes_uniform": last.get("bytes_uniform", 0.0),
            "error_budget": last.get("error_budget", 0.0),
            "error_planned": last.get("error_planned", 0.0),
        }

    def stats(self) -> dict:
        out = super().stats()
        out["lgreco"] = self.lgreco_stats()
        return out

    def write_plan_json(self, path) -> None:
        """The plan history (one entry per retune) as JSON, for ``benchmarks/plot_lgreco.py``."""
        with open(path, "w") as f:
            json.dump({"family": self.family, "candidates": self.candidates, "history": self.history}, f, indent=1)

    def log_to(self, writer, step: int) -> None:
        """Write the current plan to a TensorBoard ``SummaryWriter`` (anything with ``add_scalar``)."""
        for key, value in self.lgreco_stats()["plan"].items():
            writer.add_scalar(f"lgreco/{key}", float(value), step)
        if self.history:
            writer.add_scalar("lgreco/bytes_ratio_vs_uniform",
                              self.history[-1]["bytes_uniform"] / max(self.history[-1]["bytes_planned"], 1.0), step)

    def lgreco_state(self) -> dict:
        return {"plan": dict(self.plan), "history": list(self.history),
                "next_retune": self.next_retune, "grad_dtypes": {k: str(v) for k, v in self.grad_dtypes.items()}}

    def load_lgreco_state(self, state: dict) -> None:
        self.plan = {k: int(v) for k, v in state["plan"].items()}
        self.grad_dtypes = {k: getattr(torch, v.replace("torch.", "")) for k, v in state["grad_dtypes"].items()}
        self.history = list(state["history"])
        self.next_retune = int(state["next_retune"])
        self.apply_plan()

    def options(self) -> dict:
        return {**super().options(), "family": self.family, "candidates": list(self.candidates),
                "alpha": self.alpha, "retune_every": self.retune_every, "accumulate_steps": self.accumulate_steps}

    def buffers_state(self) -> dict:
        out = super().buffers_state()
        out["lgreco"] = self.lgreco_state()
        out["lgreco_accumulated"] = dict(self.accumulated)  # local sums before the retune's all-reduce
        out["lgreco_tainted"] = "\n".join(sorted(self.tainted))
        return out

    def load_buffers_state(self, buffers: dict) -> None:
        super().load_buffers_state(buffers)
        self.load_lgreco_state(buffers["lgreco"])
        self.accumulated = dict(buffers["lgreco_accumulated"])
        self.tainted = set(filter(None, (buffers.get("lgreco_tainted") or "").split("\n")))


class LGreCoPowerSGDState(LGreCoMixin, PowerSGDState):
    r"""L-GreCo over PowerSGD ranks: a rank per layer, errors from the accumulated gradient's SVD.

    Arguments (beyond :class:`PowerSGDState`'s): ``candidates`` (ranks, default [r/2, 2r]),
    ``alpha`` (error budget as a multiple of the uniform rank's, default 1), ``retune_every``
    (steps, default 500), ``accumulate_steps`` (default 10), ``error_buckets`` (DP resolution,
    default 10000).

    Example::

        >>> state, hook = commlib.hooks.make("lgreco", family="powersgd", rank=4, model=model)  # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, hook)                                           # doctest: +SKIP
        >>> state.stats()["lgreco"]["plan"]                                                    # doctest: +SKIP
    """

    name = "lgreco"
    per_rank_buffers = PowerSGDState.per_rank_buffers + ("lgreco_accumulated", "lgreco_tainted")

    def __init__(self, process_group=None, *, candidates=None, alpha: float = 1.0, retune_every: int = 500,
                 accumulate_steps: int = 10, error_buckets: int = 10_000, **kwargs):
        default = kwargs.get("rank", kwargs.get("matrix_approximation_rank", 1))
        self._init_lgreco("powersgd", candidates, default, alpha, retune_every, accumulate_steps, error_buckets)
        for c in self.candidates:
            integer("each of candidates (PowerSGD ranks)", c, 1)
        super().__init__(process_group, **kwargs)

    def candidate_table(self, grad, dtype):
        matrix = grad.reshape(grad.shape[0], -1)
        rows, cols = matrix.shape
        elem = torch.empty((), dtype=dtype).element_size()
        errors = lowrank_errors(matrix, [min(rows, cols, r) for r in self.candidates])
        sizes = []
        for i, r in enumerate(self.candidates):
            r = min(rows, cols, r)
            if should_compress(rows, cols, r, self.min_compression_rate):
                sizes.append(float((rows + cols) * r * elem))
            else:  # this rank would go dense: exact, full size
                errors[i] = 0.0
                sizes.append(float(rows * cols * elem))
        return errors, sizes

    def apply_plan(self) -> None:
        self.rank_of = {k: self.candidates[i] for k, i in self.plan.items()}


class LGreCoEFState(LGreCoMixin, ErrorFeedbackState):
    r"""L-GreCo over top-k densities or QSGD bit widths, with classic error feedback per layer.

    ``family="topk"``: ``density`` (default 0.01) and ``candidates`` (densities, default
    d/4..4d); ``family="qsgd"``: ``bits`` (default 4), ``bucket_size`` (512) and ``candidates``
    (bit widths, default b-2..b+2). Payloads are all-gathered. Other arguments as
    :class:`LGreCoPowerSGDState`. On the two-level path (``hierarchical=``) the plan is made from
    the whole layers' gradients, summed over every rank, and each piece of a layer is compressed
    with its layer's setting across the rail.

    Example::

        >>> state, hook = commlib.hooks.make("lgreco", family="topk", density=0.01, model=model)  # doctest: +SKIP
    """

    name = "lgreco"
    per_rank_buffers = ErrorFeedbackState.per_rank_buffers + ("lgreco_accumulated", "lgreco_tainted")

    def __init__(self, process_group=None, *, family: str = "topk", density: float = 0.01, bits: int = 4,
                 bucket_size: int = 512, exact: bool = True, candidates=None, alpha: float = 1.0,
                 retune_every: int = 500, accumulate_steps: int = 10, error_buckets: int = 10_000, **kwargs):
        if kwargs.get("collective", "auto") not in ("auto", "allgather"):
            raise ValueError("L-GreCo's topk/qsgd families use collective='allgather' (per-layer compressors)")
        kwargs.pop("collective", None)
        self.bucket_size = bucket_size
        self.exact = exact
        default = density if family == "topk" else bits
        self._init_lgreco(family, candidates, default, alpha, retune_every, accumulate_steps, error_buckets)
        self._compressors = [self._make(c) for c in self.candidates]  # validates every candidate
        self._assigned: dict[str, compress.Compressor] = {}
        super().__init__(process_group, compressor=self._compressors[self.default_index], collective="allgather",
                         **kwargs)

    def _make(self, setting):
        if self.family == "topk":
            return compress.TopK(setting, self.exact)
        return compress.QSGD(setting, self.bucket_size)

    def compressor_for(self, key):
        """The layer's planned compressor; on the two-level path a piece takes its layer's."""
        return self._assigned.get(self.layer_of(key), self._compressors[self.default_index])

    def candidate_table(self, grad, dtype):
        shape, n = grad.shape, grad.numel()
        dense = float(n * torch.empty((), dtype=dtype).element_size())
        if self.family == "topk":
            errors = topk_errors(grad, [topk_count(n, d) for d in self.candidates])
        else:
            errors = qsgd_errors(grad, self.candidates, self.bucket_size)
        sizes = []
        for i, c in enumerate(self._compressors):
            if c.shrinks(shape, dtype):
                sizes.append(float(c.nbytes(shape, dtype)))
            else:
                errors[i] = 0.0
                sizes.append(dense)
        return errors, sizes

    def apply_plan(self) -> None:
        self._assigned = {k: self._compressors[i] for k, i in self.plan.items()}


@register("lgreco")
def make_lgreco(process_group=None, family: str = "powersgd", **options):
    """``hooks.make("lgreco", family=...)``: the state for the chosen compression family."""
    one_of("family", family, FAMILIES)
    if family == "powersgd":
        return LGreCoPowerSGDState(process_group, **options)
    return LGreCoEFState(process_group, family=family, **options)
