"""AGVM: per-module gradient-variance alignment (Xue et al., "Large-batch Optimization for Dense Visual
Predictions", NeurIPS 2022), as a DDP hook that wraps any other commlib hook."""

from __future__ import annotations

import contextlib
import datetime
import math

import torch
import torch.distributed as dist
from torch import nn

from commlib.comm.agree import agree_across_ranks
from commlib.comm.groups import private_group
from commlib.comm.patterns import split_like
from commlib.comm.queue import Comm, OrderedQueue
from commlib.comm.rank_state import byte_books, check_on_mismatch, options_differ
from commlib.hooks.registry import make, register
from commlib.hooks.state import HookState, check_flat_only, strip_ddp_prefix
from commlib.validation import integer, number, one_of

ESTIMATORS = ("halves", "scalar")


# ---------------------------------------------------------------------------------------- pure math
def halves_phi(dot: float, norm_a_sq: float, norm_b_sq: float) -> float:
    """The paper's variance proxy ``Phi = 1 - cos(G_A, G_B)`` of the two half-batch gradients (Eq. 6)."""
    denom = math.sqrt(norm_a_sq * norm_b_sq)
    return 1.0 - (dot / denom if denom > 0 else 1.0)


def scalar_phi(mean_local_norm_sq: float, mean_norm_sq: float) -> float:
    """Noise-to-signal ratio ``(mean_i ||g_i||^2 - ||g_bar||^2) / ||g_bar||^2`` (one scalar all-reduce)."""
    if mean_norm_sq <= 0:
        return 1.0
    return max(mean_local_norm_sq - mean_norm_sq, 0.0) / mean_norm_sq


def modulation(phi_reference: float, phi: float) -> float:
    """``mu = sqrt(clamp((Phi_ref + 1e-6) / (Phi + 1e-6), 0.5, 10))`` (paper Eq. 7 with the official clamp)."""
    return math.sqrt(min(max((phi_reference + 1e-6) / (phi + 1e-6), 0.5), 10.0))


def preconditioned(grad: torch.Tensor, exp_avg_sq: torch.Tensor, beta2: float, eps: float) -> torch.Tensor:
    """The Adam variant's vector: ``g / (sqrt(beta2 v + (1 - beta2) g^2) + eps)``."""
    return grad / ((exp_avg_sq * beta2 + grad * grad * (1 - beta2)).sqrt() + eps)


# ---------------------------------------------------------------------------------------- grouping
def propose_groups(model: nn.Module) -> dict[str, str]:
    """One group per top-level child that has parameters, in model order (the first is the reference)."""
    return {name: name for name, child in model.named_children() if any(True for _ in child.parameters())}


def normalize_groups(groups) -> list[tuple[str, str]]:
    """``[(prefix, group), ...]`` from either ``{prefix: group}`` or ``{group: [prefixes]}``
    (DESIGN's form, prefixes like ``"backbone."``); prefixes are compared without a trailing dot."""
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"groups must be a non-empty dict of parameter-name prefix -> group name (or group -> "
                         f"list of prefixes), got {groups!r}")
    pairs = []
    for key, value in groups.items():
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"groups[{key!r}] must list at least one prefix")
            pairs.extend((str(prefix).rstrip("."), key) for prefix in value)
        else:
            pairs.append((str(key).rstrip("."), value))
    return pairs


def group_order(groups) -> list[str]:
    """Group names in the order given; the first is AGVM's reference."""
    return list(dict.fromkeys(group for _, group in normalize_groups(groups)))


def assign_groups(model: nn.Module, groups, strict: bool = True) -> dict[str, str]:
    """Parameter name -> group name; rejects overlapping prefixes and, when ``strict``, parameters in
    no group."""
    pairs = normalize_groups(groups)
    prefixes = [p for p, _ in pairs]
    for a in prefixes:
        for b in prefixes:
            if a is not b and (a == b or b.startswith(a + ".") or a == ""):
                raise ValueError(f"groups has overlapping prefixes {a!r} and {b!r}")
    out = {}
    for name, _ in model.named_parameters():
        name = strip_ddp_prefix(name)
        match = [g for p, g in pairs if name == p or name.startswith(p + ".")]
        if match:
            out[name] = match[0]
        elif strict:
            raise ValueError(f"parameter {name!r} is in no group (strict=True); prefixes: {prefixes}")
    return out


# ---------------------------------------------------------------------------------------- the state
@register("agvm")
class AGVMState:
    r"""AGVM around an inner hook: every ``tau`` steps, measure each module group's gradient
    variance, and keep per-group learning-rate multipliers ``mu`` (EMA with ``momentum``).

    Estimators (``estimator=``; the default ``"scalar"`` was chosen by measurement: in
    ``benchmarks/bench_agvm.py`` it cost 77.7 ms per step against 98.9 ms for ``"halves"`` with the
    same final loss, 2.6631 vs 2.6630):

    * ``"halves"`` (the paper's): ranks are split into halves A = [0, n/2) and B; the hook
      all-reduces the local gradients within each half and over the world (two dense all-reduces of
      the bucket, on estimation steps only), so every rank holds ``G_A`` and ``G_B = (sum - sum_A) / |B|``
      and computes per group ``Phi = 1 - cos(G_A, G_B)``; rank 0's 3 scalars per group are broadcast.
    * ``"scalar"``: ``Phi = (mean_i ||g_i||^2 - ||g_bar||^2) / ||g_bar||^2`` from one scalar all-reduce
      per group, with ``g_bar`` the inner hook's result (what the optimizer sees).

    ``mu_i = sqrt(clamp((Phi_ref + 1e-6)/(Phi_i + 1e-6), 0.5, 10))``, the first group the reference;
    ``mu <- momentum mu + (1 - momentum) mu_new``. Apply it around the optimizer step::

        with state.modulate(optimizer):
            optimizer.step()

    which multiplies each param group's ``lr`` by its module's ``mu`` and restores the saved values
    afterwards (schedulers see their own lr). Every optimizer param group must lie in one module
    group (:func:`param_groups_by_module` builds them). ``use_adam=True`` (with ``optimizer=``)
    measures the cosine on Adam-preconditioned gradients, as the official code's Adam variant.

    Example::

        >>> from commlib import hooks                                                    # doctest: +SKIP
        >>> groups = hooks.propose_groups(model)      # {"backbone": "backbone", "neck": "neck", ...} # doctest: +SKIP
        >>> state, hook = hooks.make("agvm", inner="powersgd", inner_options={"rank": 4}, model=model, # doctest: +SKIP
        ...                          groups=groups)
        >>> ddp.register_comm_hook(state, hook)    # doctest: +SKIP
        >>> opt = torch.optim.SGD(hooks.param_groups_by_module(model, groups), lr=0.1)    # doctest: +SKIP
        >>> ... loss.backward(); with state.modulate(opt): opt.step()    # doctest: +SKIP
    """

    name = "agvm"

    def __init__(self, process_group=None, *, model: nn.Module, groups: dict | None = None,
                 inner: str = "allreduce", inner_options: dict | None = None, tau: int = 10,
                 momentum: float = 0.97, start_iter: int = 2, estimator: str = "scalar", strict: bool = True,
                 use_adam: bool = False, optimizer=None, timeout: float | None = None, hierarchical="auto",
                 topology=None):
        check_flat_only(self.name, hierarchical, topology)  # its halves' statistics are per rank

        if model is None:
            raise ValueError("model is required: module groups are parameter-name prefixes")
        integer("tau", tau, 1)
        number("momentum", momentum, low=0, high=1, high_open=True)
        integer("start_iter", start_iter, 0)
        one_of("estimator", estimator, ESTIMATORS)
        if inner == "agvm":
            raise ValueError("inner must be another hook than agvm")
        groups = groups if groups is not None else propose_groups(model)
        self.group_of = assign_groups(model, groups, strict)
        self.group_names = group_order(groups)
        self.model = model
        self._param_names = {id(p): strip_ddp_prefix(n) for n, p in model.named_parameters()}
        options = dict(inner_options or {})
        options.setdefault("model", model)
        self.inner_state, self.inner_hook = make(inner, process_group, **options)
        self.tau, self.momentum, self.start_iter = tau, float(momentum), start_iter
        self.estimator = estimator
        self.use_adam = use_adam
        self.optimizer = optimizer
        self.process_group, self.timeout = process_group, timeout
        self.queue = None  # bound at the first hook call (or bind()): the state can be built before init
        self.closed = False
        self.mu = torch.ones(len(self.group_names), dtype=torch.float64)
        self.step = 0
        self.history: list[dict] = []  # {"step", "phi": [...], "mu_new": [...], "mu": [...]}
        self.extra_bytes_last_step = 0
        self.extra_bytes_total = 0
        self._pending = torch.zeros(len(self.group_names), 3, dtype=torch.float64)
        self._step_bytes = 0

    # ------------------------------------------------------------------ binding and lifetime
    def bind(self) -> AGVMState:
        """Create AGVM's process groups and queue, and bind the inner state (idempotent)."""
        if self.closed:
            raise RuntimeError("AGVMState was closed; build a new state")
        if self.queue is None:
            self.queue = OrderedQueue(self.process_group,
                                      datetime.timedelta(seconds=self.timeout) if self.timeout else None)
            self.world_size, self.rank = self.queue.world_size, self.queue.rank
            ranks = dist.get_process_group_ranks(self.queue.group)
            half = max(1, self.world_size // 2)
            self.half_ranks = (ranks[:half], ranks[half:])
            self.half_groups = [private_group(self.queue.group, ranks=r) if r else None for r in self.half_ranks]
            self.my_half = 0 if self.rank < half else 1
            self._param_names = {id(p): strip_ddp_prefix(n) for n, p in self.model.named_parameters()}
            agree_across_ranks({"method": self.name, "options": self.options(), "use_adam": self.use_adam,
                                "groups": self.group_names,
                                "assignment": sorted([str(k), str(v)] for k, v in self.group_of.items())},
                               self.queue.group, "commlib agvm hook")
            if hasattr(self.inner_state, "bind"):
                self.inner_state.bind()
        return self

    def close(self) -> None:
        """Stop the threads and destroy the process groups of AGVM and its inner state."""
        if self.queue is not None:
            stopped = self.queue.close()
            for group in self.half_groups if stopped else ():  # never destroy a group the worker may be in
                if group is not None and dist.is_initialized():
                    dist.destroy_process_group(group)
            self.queue = None
        if hasattr(self.inner_state, "close"):
            self.inner_state.close()
        self.closed = True

    def __enter__(self) -> AGVMState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ DDP entry point
    def estimating(self, step: int) -> bool:
        return (self.world_size > 1 and len(self.group_names) > 1 and step >= self.start_iter
                and (step - self.start_iter) % self.tau == 0)

    def run(self, bucket: dist.GradBucket) -> torch.futures.Future:
        self.bind()
        step, is_last = self.step, bucket.is_last()
        if is_last:
            self.step += 1
        estimating = self.estimating(step)
        if estimating:
            local = bucket.buffer().detach().clone()  # before the inner hook reduces it in place
            keys = [self._param_names.get(id(p)) for p in bucket.parameters()]
            params = list(bucket.parameters())
            likes = bucket.gradients()  # per-parameter shapes of the flat buffer
        inner = self.inner_hook(self.inner_state, bucket)
        if not estimating:
            if is_last:
                self.extra_bytes_last_step = 0
            return inner
        if self.estimator == "halves":
            ours = self.queue.submit(lambda comm: self._halves_job(comm, local, keys, params, likes, step, is_last),
                                     device=bucket.buffer().device)
            return torch.futures.collect_all([inner, ours]).then(lambda f: f.value()[0].value())
        return inner.then(lambda f: self._scalar_after(f.value(), local, keys, likes, step, is_last))

    # ------------------------------------------------------------------ estimators
    def _halves_job(self, comm: Comm, local, keys, params, likes, step, is_last):
        n = comm.world_size
        size_a, size_b = len(self.half_ranks[0]), len(self.half_ranks[1])
        own = local.clone()
        dist.all_reduce(own, group=self.half_groups[self.my_half])
        total = comm.all_reduce(local.clone())
        nbytes = local.numel() * local.element_size()
        h = len(self.half_ranks[self.my_half])  # ring all-reduce volume per rank: 2 (k-1)/k x bytes
        self._step_bytes += 2 * nbytes * (h - 1) // h + 2 * nbytes * (n - 1) // n
        sum_a, sum_b = (own, total - own) if self.my_half == 0 else (total - own, own)
        grads_a, grads_b = split_like(sum_a / size_a, likes), split_like(sum_b / size_b, likes)
        for key, param, ga, gb in zip(keys, params, grads_a, grads_b):
            group = self.group_of.get(key)
            if group is None:
                continue
            if self.use_adam:
                ga, gb = self._precondition(param, ga), self._precondition(param, gb)
            row = self._pending[self.group_names.index(group)]
            row[0] += float((ga.double() * gb.double()).sum())
            row[1] += float(ga.double().pow(2).sum())
            row[2] += float(gb.double().pow(2).sum())
        if is_last:
            comm.broadcast(self._pending, src=0)  # one verdict everywhere (half sums differ in the last bit)
            self._step_bytes += self._pending.numel() * 8
            phis = [halves_phi(*map(float, row)) for row in self._pending]
            self._finish(step, phis)
        return None

    def _precondition(self, param, grad):
        state = self.optimizer.state.get(param, {}) if self.optimizer is not None else {}
        if "exp_avg_sq" not in state or state["exp_avg_sq"].shape != grad.shape:
            return grad
        group = next(g for g in self.optimizer.param_groups if any(p is param for p in g["params"]))
        beta2, eps = group.get("betas", (0.9, 0.999))[1], group.get("eps", 1e-8)
        return preconditioned(grad, state["exp_avg_sq"], beta2, eps)

    def _scalar_after(self, reduced: torch.Tensor, local, keys, likes, step, is_last):
        sums = torch.zeros(len(self.group_names), dtype=torch.float64)
        means = torch.zeros(len(self.group_names), dtype=torch.float64)
        for key, g_local, g_mean in zip(keys, split_like(local, likes), split_like(reduced, likes)):
            group = self.group_of.get(key)
            if group is None:
                continue
            i = self.group_names.index(group)
            sums[i] += float(g_local.double().pow(2).sum())
            means[i] += float(g_mean.double().pow(2).sum())
        # This callback runs on the inner hook's queue thread, bucket by bucket in order on every rank,
        # so the scalar all-reduce can be issued here on AGVM's own group without another thread.
        self._scalar_job(self.queue.comm, sums, means, step, is_last)
        return reduced

    def _scalar_job(self, comm: Comm, sums, means, step, is_last):
        comm.all_reduce(sums)
        self._step_bytes += sums.numel() * 8 * 2 * (comm.world_size - 1) // comm.world_size
        self._pending[:, 0] += sums / comm.world_size
        self._pending[:, 1] += means
        if is_last:
            self._finish(step, [scalar_phi(float(a), float(b)) for a, b, _ in self._pending])

    def _finish(self, step: int, phis: list[float]) -> None:
        self._pending.zero_()
        if not all(math.isfinite(p) for p in phis):  # an overflowed step teaches nothing: keep mu
            self.history.append({"step": step, "phi": phis, "mu_new": None, "mu": self.mu.tolist()})
        else:
            new = torch.tensor([modulation(phis[0], p) for p in phis], dtype=torch.float64)
            self.mu = self.momentum * self.mu + (1 - self.momentum) * new
            self.history.append({"step": step, "phi": phis, "mu_new": new.tolist(), "mu": self.mu.tolist()})
        self.extra_bytes_last_step = self._step_bytes
        self.extra_bytes_total += self._step_bytes
        self._step_bytes = 0

    # ------------------------------------------------------------------ the optimizer side
    def multipliers(self) -> dict[str, float]:
        return {name: float(m) for name, m in zip(self.group_names, self.mu)}

    @contextlib.contextmanager
    def modulate(self, optimizer):
        """Scale each param group's lr by its module's mu for one ``optimizer.step()``; restore after."""
        saved = [g["lr"] for g in optimizer.param_groups]
        factors = [self._group_factor(g) for g in optimizer.param_groups]
        try:
            for g, f in zip(optimizer.param_groups, factors):
                if f != 1.0:
                    g["lr"] = g["lr"] * f
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    def _group_factor(self, param_group: dict) -> float:
        names = {self.group_of.get(self._param_names.get(id(p))) for p in param_group["params"]}
        if len(names) != 1:
            raise ValueError(f"an optimizer param group spans module groups {sorted(map(str, names))}; build the "
                             "optimizer with hooks.param_groups_by_module(model, groups)")
        name = names.pop()
        return 1.0 if name is None else float(self.mu[self.group_names.index(name)])

    # ------------------------------------------------------------------ books and checkpoints
    def stats(self) -> dict:
        inner = self.inner_state.stats() if hasattr(self.inner_state, "stats") else {}
        # the inner hook's gradient bytes plus AGVM's own statistics (no dense counterpart)
        books = byte_books(self.name, self.step, inner.get("bytes_sent", 0) + self.extra_bytes_last_step,
                           inner.get("bytes_dense", 0), inner.get("total_bytes_sent", 0) + self.extra_bytes_total,
                           inner.get("total_bytes_dense", 0), inner.get("skipped_steps", 0))
        return {**books, "mu": self.multipliers(), "history": list(self.history),
                "estimator": self.estimator, "extra_bytes_last_step": self.extra_bytes_last_step,
                "extra_bytes_total": self.extra_bytes_total, "inner": inner}

    def state_dict(self) -> dict:
        return {"method": "agvm", "step": self.step, "mu": self.mu.clone(), "history": list(self.history),
                "groups": list(self.group_names), "options": self.options(),
                "extra_bytes_total": self.extra_bytes_total,
                "inner": self.inner_state.state_dict() if hasattr(self.inner_state, "state_dict") else {}}

    def load_state_dict(self, state: dict, *, on_mismatch: str = "error") -> None:
        check_on_mismatch(on_mismatch)
        if state.get("method") != "agvm":
            raise ValueError(f"state_dict is for hook {state.get('method')!r}, not 'agvm'")
        if state.get("groups") != list(self.group_names):
            raise ValueError(f"agvm state was saved for module groups {state.get('groups')}, this state has "
                             f"{list(self.group_names)}: mu holds one multiplier per group, in order")
        differ = options_differ(state.get("options", {}), self.options())
        if differ:  # tau, momentum, estimator and warm-up shape mu's history: another set would not resume it
            raise ValueError(f"agvm state was saved with other options: {differ}")
        self.step = int(state["step"])
        self.mu = state["mu"].clone().double()
        self.history = list(state["history"])
        self.extra_bytes_total = int(state["extra_bytes_total"])
        if state["inner"]:
            if isinstance(self.inner_state, HookState):
                self.inner_state.load_state_dict(state["inner"], on_mismatch=on_mismatch)
            else:
                self.inner_state.load_state_dict(state["inner"])

    def options(self) -> dict:
        return {"tau": self.tau, "momentum": self.momentum, "estimator": self.estimator, "start_iter": self.start_iter}

    def __getstate__(self):
        if self.queue is not None:
            raise TypeError("AGVMState is bound to process groups and a worker thread; pickle it before its first "
                            "use, or save state.state_dict()")
        state = dict(self.__dict__)
        state["_param_names"] = {}  # object ids mean nothing in another process
        return state


def agvm_hook(state: AGVMState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook of AGVM: measures on estimation steps, then hands the bucket to the inner hook."""
    return state.run(bucket)


def param_groups_by_module(model: nn.Module, groups: dict[str, str], strict: bool = True, **options) -> list[dict]:
    """Optimizer param groups, one per module group (plus one for unassigned parameters when not strict)."""
    assignment = assign_groups(model, groups, strict)
    buckets: dict = {name: [] for name in group_order(groups)}
    rest = []
    for name, p in model.named_parameters():
        group = assignment.get(strip_ddp_prefix(name))
        (buckets[group] if group is not None else rest).append(p)
    out = [{"params": ps, "agvm_group": name, **options} for name, ps in buckets.items() if ps]
    if rest:
        out.append({"params": rest, **options})
    return out
