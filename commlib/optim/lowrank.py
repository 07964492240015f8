"""GaLore, Fira and FRUGAL: AdamW whose state lives in a low-rank subspace of each gradient matrix.

Update rules (W: m x n parameter, G its gradient, R the projected gradient, T the refresh gap):

* GaLore (Zhao et al. 2024, Alg. 2): ``N = m/(sqrt(v)+eps)`` from Adam on R;
  ``W -= lr * b * scale * back(N)`` with ``b = sqrt(1-beta2^t)/(1-beta1^t)``; weight decay after.
* Fira (Chen et al. 2024, Eqs. 7-10): GaLore's step plus the residual ``S = phi ⊙ (G - back(R))``,
  ``phi`` the column norms ``||N||/||R||`` along the unprojected side, and the norm-growth limiter
  ``||S_t|| <= 1.01 ||S_{t-1}||``: ``W -= lr * b * (alpha back(N) + S)``.
* FRUGAL (Zmushko et al. 2025, Alg. 1): Adam (torch-style) on R with the moments reset at each
  refresh, and a state-free signSGD (or SGD) step on the rest ``G - back(R)``; or its blockwise form:
  a fraction ``density`` of whole tensors gets AdamW, the others signSGD.

Projectors (per group, ``projector=``): ``svd`` (GaLore's), ``random`` (orthonormal, seeded by
(group seed, parameter, refresh): equal on every rank without communication) and ``dct`` (DCT-II
basis vectors ranked by alignment with the gradient; only int64 indices are stored). Under DDP the
projector is computed from the averaged gradient, so it is the same on every rank.

State per parameter: tensors and ints only (``torch.load(weights_only=True)`` reads it); integer
index tensors are protected from ``Optimizer.load_state_dict``'s cast to the parameter dtype.

FSDP2's sharded (DTensor ``Shard(0)``) parameters are stepped on each rank's rows with the explicit
collectives of :mod:`commlib.optim.sharded` (state stored as DTensors, counted in :meth:`stats`).
Under DDP, ``hooks.make("lowrank", optimizer=opt)`` all-reduces the projected gradients instead of
the full ones through :meth:`wire_projection` / :meth:`receive_projected`. DeepSpeed ZeRO >= 1's
flat partitions are refused at the first step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from commlib.compress.base import derive_seed
from commlib.optim import projectors as pj
from commlib.optim.sharded import CommCounter, local, row_shard_of, wrap
from commlib.validation import integer, number, one_of

INT_STATE_KEYS = ("dct_indices",)


# ---------------------------------------------------------------------------------------- pure math
def adam_moments_(exp_avg, exp_avg_sq, grad, beta1: float, beta2: float) -> None:
    """``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2`` in place."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def advance_moments(state: dict, like: torch.Tensor, step_key: str, zeros=None) -> int:
    """Create zero moments shaped like ``like`` (or made by ``zeros()``) on first use, count one
    more step; returns it."""
    if "exp_avg" not in state:
        state[step_key] = 0
        state["exp_avg"] = zeros() if zeros is not None else torch.zeros_like(like)
        state["exp_avg_sq"] = zeros() if zeros is not None else torch.zeros_like(like)
    state[step_key] += 1
    return state[step_key]


def reset_moments(state: dict) -> None:
    """FRUGAL's ``reset_statistics``: drop the inner Adam's moments and step (they restart at zero)."""
    for key in ("exp_avg", "exp_avg_sq", "adam_step"):
        state.pop(key, None)


def transformers_adam_direction(exp_avg, exp_avg_sq, eps: float) -> torch.Tensor:
    """GaLore/Fira's ``N = m / (sqrt(v) + eps)`` (bias correction goes into the step size)."""
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def transformers_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def torch_adam_update(exp_avg, exp_avg_sq, step: int, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """torch.optim.Adam's ``m_hat / (sqrt(v_hat) + eps)`` (FRUGAL's inner Adam)."""
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    return (exp_avg / bc1) / (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)


def fira_axis(shape) -> int:
    """The axis Fira's norms run over: the projected one of an (m x r) or (r x n) low-rank tensor."""
    return 0 if shape[0] < shape[1] else 1


def fira_scaling(direction: torch.Tensor, low_rank_grad: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Fira's ``phi``: ratio of column norms of the Adam direction and the projected gradient,
    along the side that was not projected, shaped to broadcast against the m x n residual. ``dim``
    (default :func:`fira_axis` of ``direction``'s shape) must come from the global shape on a shard."""
    dim = fira_axis(direction.shape) if dim is None else dim
    phi = torch.norm(direction, dim=dim) / (torch.norm(low_rank_grad, dim=dim) + 1e-8)
    return phi.unsqueeze(1) if dim == 1 else phi


def fira_limit(residual: torch.Tensor, previous_norm, gamma: float = 1.01, norm=None):
    """Norm-growth limiter: returns ``(residual', its recorded norm)`` with ``||S_t|| <= gamma ||S_{t-1}||``.
    ``norm``: the residual's norm when ``residual`` is one shard of it."""
    norm = torch.norm(residual) if norm is None else norm
    if previous_norm is None:
        return residual, norm
    limiter = max(norm / (previous_norm + 1e-8), gamma) / gamma
    return residual / limiter, norm / limiter


# ---------------------------------------------------------------------------------------- base class
class LowRankAdamW(Optimizer):
    """Shared machinery; use :class:`GaLoreAdamW`, :class:`FiraAdamW` or :class:`FrugalAdamW`."""

    method = "galore"
    group_defaults: dict = {}
    group_key = "rank"
    aliases: dict = {}
    alias_values: dict = {}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, **group_options):
        unknown = set(group_options) - set(self.group_defaults) - {self.group_key} - set(self.aliases)
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; low-rank group options are "
                             f"{sorted(set(self.group_defaults) | {self.group_key})}")
        # Keyword options are the defaults of the low-rank groups; giving the group key here (rank or
        # density) makes every group low-rank unless it sets that key to None.
        self.constructor_options = {self.aliases.get(k, k): self.alias_values.get(v, v) if isinstance(v, str) else v
                                    for k, v in group_options.items()}
        number("lr", lr, low=0)
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        for name, beta in zip(("betas[0]", "betas[1]"), betas):
            number(name, beta, low=0, high=1, high_open=True)
        number("eps", eps, low=0)
        number("weight_decay", weight_decay, low=0)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self.comm = CommCounter()
        self.wire_in_subspace: set = set()  # ids of parameters whose p.grad the lowrank hook left in the subspace
        self.skipped_steps = 0  # steps skipped because a gradient was not finite

    # ------------------------------------------------------------------ groups
    def is_low_rank_group(self, group: dict) -> bool:
        return group.get(self.group_key) is not None

    def add_param_group(self, param_group: dict) -> None:
        param_group = {self.aliases.get(k, k): self.alias_values.get(v, v) if isinstance(v, str) else v
                       for k, v in param_group.items()}
        options = getattr(self, "constructor_options", {})
        if self.group_key in options and self.group_key not in param_group:
            param_group[self.group_key] = options[self.group_key]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # the parameters it was given: DeepSpeed ZeRO >= 1 swaps them for 1-D flat partitions
        if self.is_low_rank_group(group):
            self.__dict__["projects_matrices"] = self.__dict__.get("projects_matrices", False) or any(
                p.dim() >= 2 for p in group["params"])
        self.__dict__.setdefault("known_params", set()).update(id(p) for p in group["params"])
        if self.is_low_rank_group(group):
            for key, value in {**self.group_defaults, **options}.items():
                group.setdefault(key, value)
            self.validate_group(group)

    def validate_group(self, group: dict) -> None:
        one_of("projector", group["projector"], pj.PROJECTORS)
        one_of("svd_signs", group["svd_signs"], pj.SVD_SIGNS)
        one_of("proj_type", group["proj_type"], pj.PROJ_TYPES)
        integer("update_proj_gap", group["update_proj_gap"], 1)
        integer("seed", group["seed"], 0)
        for p in group["params"]:
            if p.dim() >= 2:
                shape = pj.matrix_shape(p.shape)  # the global shape of a sharded (DTensor) parameter
                pj.check_rank(self.group_rank(group, shape), shape, pj.side_for(shape, group["proj_type"]))

    def group_rank(self, group: dict, shape) -> int:
        return group["rank"]

    # ------------------------------------------------------------------ projector refresh
    def refresh_projector(self, group: dict, p: torch.Tensor, state: dict, grad2d: torch.Tensor, index: int,
                          shard=None) -> None:
        """A new basis from ``grad2d`` (this rank's rows of it when ``shard`` is given; the side and rank
        follow the global shape, and the collectives are those of :mod:`commlib.optim.sharded`)."""
        shape = shard.shape if shard is not None else tuple(grad2d.shape)
        side = pj.side_for(shape, group["proj_type"])
        rank = self.group_rank(group, shape)
        state["side"] = side
        refresh = state.get("refreshes", 0)
        if group["projector"] == "svd":
            whole = self.comm.all_gather_rows(grad2d, shard) if shard is not None else grad2d
            if torch.isfinite(whole).all() or "basis" not in state:  # a non-finite gradient keeps the old one
                basis = pj.svd_basis(whole, rank, side)
                if group.get("svd_signs", "align") == "align":
                    basis = self.aligned_svd_basis(basis, state.get("basis"), side, shard)
                state["basis"] = self.stored_basis(basis, side, shard)
        elif group["projector"] == "random":
            basis = self.random_basis_for(group, shape, index, refresh, grad2d.dtype, grad2d.device)
            state["basis"] = self.stored_basis(basis, side, shard)
        else:
            if shard is None:
                scores = pj.dct_scores(grad2d, side)
            elif side == pj.RIGHT:  # a sum over rows: add the shards' partial scores
                scores = self.comm.all_reduce_(pj.dct_scores(grad2d, side).contiguous(), shard)
            else:  # the DCT runs along the sharded rows
                scores = pj.dct_scores(self.comm.all_gather_rows(grad2d, shard), side)
            if torch.isfinite(scores).all() or "dct_indices" not in state:
                state["dct_indices"] = pj.top_indices(scores, rank)
        state["refreshes"] = refresh + 1

    def aligned_svd_basis(self, basis: torch.Tensor, previous, side: int, shard=None) -> torch.Tensor:
        """:func:`~commlib.optim.projectors.align_signs` of a whole new basis against the stored one
        (on a shard's left side the stored basis is this rank's rows: the dot products are summed
        over the shard group, r values, so every rank flips the same vectors)."""
        if previous is None:
            return pj.align_signs(basis, None, side)
        previous = local(previous)
        if shard is None or side == pj.RIGHT:
            return pj.align_signs(basis, previous if previous.shape == basis.shape else None, side)
        lo, hi = shard.rows_of(shard.rank)
        if previous.shape != basis[lo:hi].shape:
            return pj.align_signs(basis, None, side)
        dots = self.comm.all_reduce_(pj.alignment_dots(basis[lo:hi], previous, side).contiguous(), shard)
        return pj.apply_flips(basis, pj.sign_flips(dots), side)

    def random_basis_for(self, group: dict, shape, index: int, refresh: int, dtype, device) -> torch.Tensor:
        """The random projector of parameter ``index`` at its ``refresh``-th refresh: a function of
        (group seed, index, refresh) alone, so the lowrank hook knows it before the refresh."""
        side = pj.side_for(shape, group["proj_type"])
        seed = derive_seed(group["seed"], index, refresh)
        return pj.random_basis(shape, self.group_rank(group, shape), side, seed, dtype, device)

    @staticmethod
    def stored_basis(basis: torch.Tensor, side: int, shard) -> torch.Tensor:
        """On a shard: a right basis (r x n) is replicated, a left one (m x r) keeps this rank's rows."""
        if shard is None:
            return basis
        if side == pj.RIGHT:
            return wrap(basis.contiguous(), shard, "replicate", basis.shape)
        lo, hi = shard.rows_of(shard.rank)
        return wrap(basis[lo:hi].contiguous(), shard, "rows", basis.shape)

    def basis_of(self, state: dict, shape, dtype, device, shard=None) -> torch.Tensor:
        if "dct_indices" in state:
            basis = pj.dct_basis(state["dct_indices"], shape, state["side"], dtype, device)
            if shard is not None and state["side"] == pj.LEFT:
                lo, hi = shard.rows_of(shard.rank)
                basis = basis[lo:hi]
            return basis
        return local(state["basis"])

    def project(self, grad: torch.Tensor, basis: torch.Tensor, side: int, shard=None) -> torch.Tensor:
        """``R``; on a shard's left side, this rank's columns of the summed ``A_iᵀ G_i``."""
        low = pj.project(grad, basis, side)
        if shard is not None and side == pj.LEFT:
            return self.comm.reduce_scatter_cols(low, shard)
        return low

    def project_back(self, low: torch.Tensor, basis: torch.Tensor, side: int, shard=None) -> torch.Tensor:
        """This rank's rows of ``back(low)``; on a shard's left side ``low`` is gathered first."""
        if shard is not None and side == pj.LEFT:
            low = self.comm.all_gather_cols(low, shard)
        return pj.project_back(low, basis, side)

    @staticmethod
    def new_state(like: torch.Tensor, shard, layout: str, global_shape) -> torch.Tensor:
        zeros = torch.zeros_like(like)
        return zeros if shard is None else wrap(zeros, shard, layout, global_shape)

    def low_rank_state(self, low: torch.Tensor, side: int, shard):
        """A zero moment for ``low``: rows of (m x r) on the right side, columns of (r x n) on the left."""
        if shard is None:
            return torch.zeros_like(low)
        if side == pj.RIGHT:
            return self.new_state(low, shard, "rows", (shard.shape[0], low.shape[1]))
        return self.new_state(low, shard, "cols", (low.shape[0], shard.shape[1]))

    # ------------------------------------------------------------------ the wire protocol (hooks "lowrank")
    def group_of(self, p: torch.Tensor) -> dict | None:
        """The param group holding ``p`` (a cached map, rebuilt when the groups change)."""
        cache = self.__dict__.setdefault("group_cache", {})
        group = cache.get(id(p))
        if group is None or not any(group is g for g in self.param_groups):
            cache.clear()
            for g in self.param_groups:
                for q in g["params"]:
                    cache[id(q)] = g
            group = cache.get(id(p))
        return group

    def wire_projection(self, p: torch.Tensor):
        """``(basis, side)`` this optimizer projects ``p``'s gradient with at its next step, or None
        when it needs the whole averaged gradient then: ``p`` is not projected (dense, FRUGAL's
        blocks, a sharded parameter) or the next step refreshes an svd or dct projector (a random
        one is known before the step). Equal on every rank (it follows the optimizer state, which
        the ranks share)."""
        group = self.group_of(p)
        if group is None or not self.is_low_rank_group(group) or p.dim() < 2 or row_shard_of(p) is not None:
            return None
        if group.get("projector") == "blocks":
            return None
        state = self.state.get(p)
        shape = pj.matrix_shape(p.shape)
        if not state or "side" not in state or state.get("step", 0) % group["update_proj_gap"] == 0:
            if group["projector"] != "random":
                return None
            # a random basis depends on (seed, parameter, refresh count) only: the refresh needs no gradient
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            refresh = (state or {}).get("refreshes", 0)
            basis = self.random_basis_for(group, shape, index, refresh, p.dtype, p.device)
            return basis, pj.side_for(shape, group["proj_type"])
        return self.basis_of(state, shape, p.dtype, p.device), state["side"]

    def needs_residual(self) -> bool:
        """Whether the update uses ``G - back(R)`` besides ``R`` (Fira's residual, FRUGAL's state-free part)."""
        return False

    def receive_projected(self, p: torch.Tensor, in_subspace: bool) -> None:
        """The lowrank hook's word on what it wrote into ``p.grad`` for the next step: ``P R`` alone
        (``in_subspace=True``: no residual was sent, so the part of the gradient outside the
        subspace is zero by construction), or ``P R`` plus a residual estimate (False).

        The optimizer always projects the ``p.grad`` it finds at :meth:`step` (rule 9: clipping,
        unscaling and accumulation scaling applied after ``backward()`` reach the update), and with
        ``in_subspace`` it takes the residual ``G - P R`` as exactly zero instead of the rounding
        noise of ``G - P Pᵀ G`` (whose sign FRUGAL's state-free step would follow)."""
        if in_subspace:
            self.wire_in_subspace.add(id(p))
        else:
            self.wire_in_subspace.discard(id(p))

    def forget_wire(self, p: torch.Tensor) -> None:
        """The hook averaged ``p`` densely this step: its gradient is whole again."""
        self.wire_in_subspace.discard(id(p))

    def residual_of(self, p, grad, low, basis, side, shard):
        """``G - back(R)``, or zeros when the lowrank hook sent ``p``'s gradient without a residual."""
        if id(p) in self.wire_in_subspace:
            return torch.zeros_like(grad)
        return grad - self.project_back(low, basis, side, shard)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.refuse_flattened()  # before any parameter moves
        if not self.gradients_finite():
            self.skipped_steps += 1  # nothing moves: moments, bases and step counts stay as they were
            return loss
        for group in self.param_groups:
            low_rank = self.is_low_rank_group(group)
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                shard = row_shard_of(p)
                if low_rank and p.dim() >= 2:
                    self.low_rank_step(group, p, state, index, shard)
                else:
                    self.dense_step(group, p, state, shard)
        return loss

    def gradients_finite(self) -> bool:
        """Whether every gradient is free of inf and NaN (one host read per step; on FSDP2 shards
        the ranks of each shard group agree, so they skip together). A non-finite gradient skips
        the whole step, as ``GradScaler`` would: Adam's moments would otherwise hold the NaN forever."""
        flags, groups = [], {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                flags.append(torch.isfinite(local(p.grad)).all())
                shard = row_shard_of(p)
                if shard is not None and shard.world > 1:
                    groups[id(shard.group)] = shard.group
        if not flags:
            return True
        finite = torch.stack(flags).all()
        for group in groups.values():  # uncounted: a flag, not part of the method's traffic
            flag = finite.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            finite = flag[0].bool()
        return bool(finite)

    def refuse_flattened(self) -> None:
        """DeepSpeed ZeRO stages >= 1 hand the optimizer 1-D flat partitions in place of the matrices it
        was built with (one group at a time): no projection exists, and AdamW on them would pass for
        GaLore. A 1-D parameter the optimizer was not built with, in an optimizer that projects matrices,
        is refused before anything is updated."""
        if not self.__dict__.get("projects_matrices"):
            return
        known = self.__dict__.get("known_params", set())
        foreign = [p for g in self.param_groups for p in g["params"] if id(p) not in known and p.dim() < 2]
        if foreign:
            raise RuntimeError(
                f"{type(self).__name__} was built with parameter matrices but is asked to step 1-D tensors it was "
                f"not given {[tuple(p.shape) for p in foreign][:3]}: DeepSpeed ZeRO stage >= 1 (or another wrapper) "
                "flattened the parameters, so no low-rank projection exists. Use ZeRO stage 0 (DeepSpeed data "
                "parallel) or FSDP2 (torch.distributed.fsdp.fully_shard), whose sharded parameters commlib's "
                "low-rank optimizers support")

    def dense_step(self, group: dict, p: torch.Tensor, state: dict, shard=None) -> None:
        """Full-rank AdamW in GaLore's convention (bias correction in the step, decay after)."""
        beta1, beta2 = group["betas"]
        pl = local(p)
        advance_moments(state, pl, "step", lambda: self.new_state(pl, shard, "rows", p.shape))
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        adam_moments_(exp_avg, exp_avg_sq, local(p.grad), beta1, beta2)
        direction = transformers_adam_direction(exp_avg, exp_avg_sq, group["eps"])
        pl.add_(direction, alpha=-transformers_step_size(group["lr"], beta1, beta2, state["step"],
                                                          group["correct_bias"]))
        if group["weight_decay"] > 0.0:
            pl.add_(pl, alpha=-group["lr"] * group["weight_decay"])

    def low_rank_step(self, group: dict, p: torch.Tensor, state: dict, index: int, shard=None) -> None:
        raise NotImplementedError

    def projected_adam(self, group: dict, p: torch.Tensor, state: dict, index: int, shard=None):
        """GaLore/Fira's shared part: refresh the projector every ``update_proj_gap`` steps, project,
        update the low-rank moments. Returns ``(G, basis, side, R, N)`` with ``N = m / (sqrt(v) + eps)``
        (on a shard: this rank's rows of G, its part of the basis, R and N)."""
        beta1, beta2 = group["betas"]
        grad = pj.as_matrix(local(p.grad))
        shape = shard.shape if shard is not None else tuple(grad.shape)
        if "step" not in state:
            state["step"] = 0
        if state["step"] % group["update_proj_gap"] == 0 or "side" not in state:
            self.refresh_projector(group, p, state, grad, index, shard)
        side = state["side"]
        basis = self.basis_of(state, shape, grad.dtype, grad.device, shard)
        low = self.project(grad, basis, side, shard)
        if "exp_avg" not in state:
            state["exp_avg"] = self.low_rank_state(low, side, shard)
            state["exp_avg_sq"] = self.low_rank_state(low, side, shard)
        state["step"] += 1
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        adam_moments_(exp_avg, exp_avg_sq, low, beta1, beta2)
        direction = transformers_adam_direction(exp_avg, exp_avg_sq, group["eps"])
        return grad, basis, side, low, direction

    def apply_update(self, group: dict, p: torch.Tensor, state: dict, update: torch.Tensor) -> None:
        """``W -= lr b update`` (b the bias correction), then GaLore-style decoupled weight decay."""
        beta1, beta2 = group["betas"]
        pl = local(p)
        pl.add_(update.view_as(pl), alpha=-transformers_step_size(group["lr"], beta1, beta2, state["step"],
                                                                  group["correct_bias"]))
        if group["weight_decay"] > 0.0:
            pl.add_(pl, alpha=-group["lr"] * group["weight_decay"])

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but integer index tensors keep their dtype (torch casts state to the param dtype)."""
        kept = {pid: {k: v.clone() for k, v in s.items() if k in INT_STATE_KEYS}
                for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in kept.get(pid, {}).items():
                self.state[p][key] = value.to(p.device)

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (moments, bases, indices, scalars)."""
        return sum(local(v).numel() * local(v).element_size() for s in self.state.values() for v in s.values()
                   if torch.is_tensor(v))

    def stats(self) -> dict:
        """This rank's optimizer-state bytes and the collectives its sharded steps issued so far
        (bytes sent per rank and calls, by kind; all zero for unsharded parameters)."""
        return {"state_bytes": self.state_bytes(), "skipped_steps": self.skipped_steps, **self.comm.stats()}


# ---------------------------------------------------------------------------------------- GaLore
class GaLoreAdamW(LowRankAdamW):
    r"""GaLore AdamW (Zhao et al., ICML 2024). Groups with a ``rank`` key are projected.

    Group options: ``rank``, ``update_proj_gap`` (200), ``scale`` (0.25), ``proj_type`` (``std``),
    ``projector`` (``svd`` | ``random`` | ``dct``), ``seed`` (0). Parameters with more than 2 dims
    are projected as (dim 0) x (the rest); 1-D parameters in a low-rank group get plain AdamW. The
    moments persist across refreshes (GaLore's choice). With ``projector="svd"`` it equals
    ``galore_torch.GaLoreAdamW`` (galore-torch 1.0) step for step; its state is tensors only.

    Example::

        >>> import torch
        >>> from commlib.optim import GaLoreAdamW
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        >>> matrices = [p for p in model.parameters() if p.dim() == 2]
        >>> others = [p for p in model.parameters() if p.dim() < 2]
        >>> opt = GaLoreAdamW([{"params": others}, {"params": matrices, "rank": 4, "update_proj_gap": 50}], lr=1e-3)
        >>> model(torch.randn(2, 64)).sum().backward(); opt.step()
    """

    method = "galore"
    group_defaults = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "projector": "svd", "seed": 0,
                      "svd_signs": "align"}

    def low_rank_step(self, group, p, state, index, shard=None):
        _, basis, side, _, direction = self.projected_adam(group, p, state, index, shard)
        self.apply_update(group, p, state, self.project_back(direction, basis, side, shard) * group["scale"])


# ---------------------------------------------------------------------------------------- Fira
class FiraAdamW(LowRankAdamW):
    r"""Fira (Chen et al. 2024): GaLore plus the norm-scaled full-rank residual and the limiter.

    Group options as :class:`GaLoreAdamW` with ``alpha`` (0.25) for the scale, and ``residual``:

    * ``"paper"`` (default): ``S = phi ⊙ (G - P R)``, the paper's Eq. 8;
    * ``"reference"``: ``S = phi ⊙ (G - alpha P R)``, what ``fira.FiraAdamW`` 1.0.2 computes (its
      ``project_back`` already multiplies by alpha, so ``1 - alpha`` of the in-subspace part leaks
      into the residual). With it and ``projector="svd"`` this class equals ``fira.FiraAdamW``.

    Example::

        >>> opt = FiraAdamW([{"params": others}, {"params": matrices, "rank": 4, "alpha": 0.25}])  # doctest: +SKIP
    """

    method = "fira"
    aliases = {"scale": "alpha"}
    group_defaults = {"update_proj_gap": 200, "alpha": 0.25, "proj_type": "std", "projector": "svd", "seed": 0,
                      "residual": "paper", "svd_signs": "align"}

    def validate_group(self, group):
        super().validate_group(group)
        one_of("residual", group["residual"], ("paper", "reference"))

    def needs_residual(self) -> bool:
        return True

    def low_rank_step(self, group, p, state, index, shard=None):
        grad, basis, side, low, direction = self.projected_adam(group, p, state, index, shard)
        if shard is not None and side == pj.LEFT:  # phi needs whole columns of R and N: gather both once
            low, direction = self.comm.all_gather_cols(low, shard), self.comm.all_gather_cols(direction, shard)
        axis = fira_axis((shard.shape[0], low.shape[1]) if shard is not None and side == pj.RIGHT else low.shape)
        in_subspace = pj.project_back(low, basis, side)
        if id(p) in self.wire_in_subspace:  # the lowrank hook sent no residual: G is P R exactly
            grad = in_subspace
        if group["residual"] == "reference":
            in_subspace = in_subspace * group["alpha"]
        residual = (grad - in_subspace) * fira_scaling(direction, low, axis)
        norm = None
        if shard is not None:  # the limiter bounds the whole residual's norm
            norm = self.comm.all_reduce_(residual.float().pow(2).sum().reshape(1), shard)[0].sqrt()
        residual, state["scaling_grad"] = fira_limit(residual, state.get("scaling_grad"), norm=norm)
        self.apply_update(group, p, state, pj.project_back(direction, basis, side) * group["alpha"] + residual)


# ---------------------------------------------------------------------------------------- FRUGAL
class FrugalAdamW(LowRankAdamW):
    r"""FRUGAL (Zmushko et al., ICML 2025): state-full AdamW on a subspace, state-free updates on the rest.

    Groups with a ``density`` key are split. Group options: ``density`` rho (0.25), ``update_proj_gap``
    (200), ``projector`` (``svd`` | ``random`` | ``dct`` | ``blocks``), ``proj_type`` (``std``),
    ``inactive_update_rule`` (``sign_sgd`` | ``sgd`` | ``no``), ``inactive_lr_scale`` (1.0),
    ``proj_params_lr_scale`` (1.0), ``reset_statistics`` (True), ``block_order`` (``random`` |
    ``ascending`` | ``descending``, for ``blocks``), ``seed`` (0).

    * projection (``svd``/``random``/``dct``): rank = max(1, round(rho x the projected side));
      ``W -= lr s (Adam(R) back-projected) + lr s s_in sign(G - back(R))`` with s = proj_params_lr_scale.
    * ``blocks``: every ``update_proj_gap`` steps a fraction rho of the group's tensors (chosen by
      ``block_order``, deterministic from the seed and the refresh count, so equal on all ranks) is
      active and gets AdamW; the others get the state-free rule and hold no state.

    Weight decay is torch-style (before the update); the inner Adam is torch's (eps 1e-8 default).
    All parameters of a non-FRUGAL group get torch-style AdamW too.

    Example::

        >>> opt = FrugalAdamW([{"params": others}, {"params": matrices, "density": 0.25}], lr=1e-3)  # doctest: +SKIP
    """

    method = "frugal"
    group_key = "density"
    aliases = {"state_free": "inactive_update_rule", "update_gap": "update_proj_gap"}
    alias_values = {"signsgd": "sign_sgd", "none": "no"}
    group_defaults = {"density": 0.25, "update_proj_gap": 200, "proj_type": "std", "projector": "svd", "seed": 0,
                      "inactive_update_rule": "sign_sgd", "inactive_lr_scale": 1.0, "proj_params_lr_scale": 1.0,
                      "reset_statistics": True, "block_order": "random", "svd_signs": "align"}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 **group_options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=True,
                         **group_options)

    def validate_group(self, group):
        number("density", group["density"], low=0, high=1)
        one_of("projector", group["projector"], pj.PROJECTORS + ("blocks",))
        one_of("inactive_update_rule", group["inactive_update_rule"], ("sign_sgd", "sgd", "no"))
        one_of("block_order", group["block_order"], ("random", "ascending", "descending"))
        one_of("svd_signs", group["svd_signs"], pj.SVD_SIGNS)
        if group["projector"] != "blocks":
            super().validate_group(group)
        else:
            integer("update_proj_gap", group["update_proj_gap"], 1)

    def needs_residual(self) -> bool:
        return any(self.is_low_rank_group(g) and g["inactive_update_rule"] != "no" for g in self.param_groups)

    def group_rank(self, group, shape):
        side = pj.side_for(tuple(shape), group["proj_type"])
        dim = shape[1] if side == pj.RIGHT else shape[0]
        return max(1, min(dim, round(group["density"] * dim)))

    # ------------------------------------------------------------------ shared pieces
    def adam_part(self, group, state, grad, zeros=None) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        step = advance_moments(state, grad, "adam_step", zeros)
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        adam_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
        return torch_adam_update(exp_avg, exp_avg_sq, step, beta1, beta2, group["eps"])

    def state_free(self, group, rest: torch.Tensor) -> torch.Tensor | None:
        rule = group["inactive_update_rule"]
        if rule == "no":
            return None
        return torch.sign(rest) if rule == "sign_sgd" else rest

    def dense_step(self, group, p, state, shard=None):
        """torch.optim.AdamW (decay before the update) for parameters outside FRUGAL groups."""
        pl = local(p)
        if group["weight_decay"] > 0.0:
            pl.mul_(1.0 - group["lr"] * group["weight_decay"])
        zeros = lambda: self.new_state(pl, shard, "rows", p.shape)  # noqa: E731
        pl.add_(self.adam_part(group, state, local(p.grad), zeros), alpha=-group["lr"])

    def block_active(self, group, index: int, refresh: int) -> bool:
        count = len(group["params"])
        active = max(0, min(count, round(group["density"] * count)))
        if group["block_order"] == "random":
            gen = torch.Generator().manual_seed(derive_seed(group["seed"], refresh))
            chosen = torch.randperm(count, generator=gen)[:active].tolist()
        else:
            start = (refresh * active) % count if count else 0
            chosen = [(start + i) % count for i in range(active)]
            if group["block_order"] == "descending":
                chosen = [count - 1 - i for i in chosen]
        return index in chosen

    # ------------------------------------------------------------------ the step
    def low_rank_step(self, group, p, state, index, shard=None):
        lr = group["lr"] * group["proj_params_lr_scale"]
        pl, grad_local = local(p), local(p.grad)
        if "step" not in state:
            state["step"] = 0
        refreshing = state["step"] % group["update_proj_gap"] == 0
        if group["weight_decay"] > 0.0:
            pl.mul_(1.0 - group["lr"] * group["weight_decay"])
        if group["projector"] == "blocks":
            refresh = state["step"] // group["update_proj_gap"]
            active = self.block_active(group, index, refresh)
            if refreshing and group["reset_statistics"] or not active:
                reset_moments(state)
            if active:
                zeros = lambda: self.new_state(pl, shard, "rows", p.shape)  # noqa: E731
                pl.add_(self.adam_part(group, state, grad_local, zeros), alpha=-lr)
            else:
                update = self.state_free(group, grad_local)
                if update is not None:
                    pl.add_(update, alpha=-lr * group["inactive_lr_scale"])
            state["step"] += 1
            return
        grad = pj.as_matrix(grad_local)
        shape = shard.shape if shard is not None else tuple(grad.shape)
        if refreshing or "side" not in state:
            self.refresh_projector(group, p, state, grad, index, shard)
            if group["reset_statistics"]:
                reset_moments(state)
        side = state["side"]
        basis = self.basis_of(state, shape, grad.dtype, grad.device, shard)
        low = self.project(grad, basis, side, shard)
        adam = self.adam_part(group, state, low, lambda: self.low_rank_state(low, side, shard))
        pl.add_(self.project_back(adam, basis, side, shard).view_as(pl), alpha=-lr)
        rest = self.state_free(group, self.residual_of(p, grad, low, basis, side, shard))
        if rest is not None:
            pl.add_(rest.view_as(pl), alpha=-lr * group["inactive_lr_scale"])
        state["step"] += 1
