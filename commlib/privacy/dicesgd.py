"""DiceSGD: differentially private SGD with clipping-error feedback (Zhang, Bu, Wu, Hong; ICLR 2024).

In sum units (the units of Opacus' ``summed_grad``), per step over the (global) batch of expected
size B::

    S_clip = sum_i clip(g_i, C1)        (per-sample clipping by the norm over all parameters)
    S_raw  = sum_i g_i
    V      = S_clip + clip(E, B C2)     (E clipped by its norm over all parameters)
    E     <- E + S_raw - V              (hidden, never released)
    update = (V + N(0, (sigma C1 kappa)^2)) / B,   kappa = sqrt(1 + 2 C2 / C1)

This is the paper's Algorithm 2 (``v = mean_i clip(g_i, C1) + clip(e, C2)``, ``e`` in mean units)
multiplied through by B: the paper clips the *mean-unit* error at C2, which is ``B C2`` for the sum
``E = B e``. (Clipping the sum-unit E at C2 itself would feed back at most C2 / B per step in mean
units, a negligible correction: measured, it leaves DP-SGD's clipping bias in place.)

``kappa`` is the noise inflation of the authors' code (``PrivacyEngine_Dice``: std = sigma C1
sqrt(1 + 2 C2/C1)); ``sigma`` is the base noise multiplier of a standard subsampled Gaussian (from
Opacus' ``get_noise_multiplier``) and is what the accountant records, so the reported epsilon is
Opacus' epsilon for (sigma, q, steps), with the paper's analysis supplying the mapping to the
inflated noise. The theory needs C2 >= C1.

Distributed: with ``process_group`` (default: the world when torch.distributed is initialized), each
rank computes its local S_clip and S_raw, one all-reduce (through commlib's communication layer) sums
them, every rank updates the same E, and the noise comes from a generator seeded identically on all
ranks (rank 0's seed is broadcast once), so it is drawn once for the global batch, not once per rank.
"""

from __future__ import annotations

import math
import secrets

import torch
import torch.distributed as dist
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

from commlib.comm.agree import agree_across_ranks
from commlib.comm.groups import private_group
from commlib.comm.patterns import split_like
from commlib.comm.queue import Comm
from commlib.comm.rank_state import (
    FORMAT,
    agree_on_load,
    byte_books,
    check_format,
    numel_bytes,
    options_differ,
    own_verdict,
    settle_load,
)
from commlib.validation import number


def global_clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Opacus' convention: ``min(1, C / (norm + 1e-6))``."""
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_global(tensors: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """``clip(E, C)`` for E spread over several tensors: one factor from the norm over all of them."""
    norm = torch.stack([t.reshape(-1).norm(2) for t in tensors]).norm(2) if tensors else torch.zeros(())
    factor = float(global_clip_factors(norm, max_norm))
    return [t * factor for t in tensors]


def dice_update(clipped_sum: list[torch.Tensor], raw_sum: list[torch.Tensor], error: list[torch.Tensor],
                error_max_norm: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One DiceSGD step in sum units (Alg. 2): returns ``(V, E')`` with ``V = S_clip + clip(E, C2)``,
    ``E' = E + S_raw - V``."""
    fed_back = clip_global(error, error_max_norm)
    v = [c + f for c, f in zip(clipped_sum, fed_back)]
    new_error = [e + r - vv for e, r, vv in zip(error, raw_sum, v)]
    return v, new_error


def noise_inflation(max_grad_norm: float, error_max_grad_norm: float) -> float:
    """``kappa = sqrt(1 + 2 C2 / C1)`` (the authors' code)."""
    return math.sqrt(1.0 + 2.0 * error_max_grad_norm / max_grad_norm)


def check_dice_arguments(noise_multiplier, max_grad_norm, error_max_grad_norm, expected_batch_size) -> None:
    number("max_grad_norm (C1)", max_grad_norm, low=0, low_open=True)
    number("error_max_grad_norm (C2)", error_max_grad_norm, low=max_grad_norm,
           why=" (max_grad_norm), as the theory requires")
    number("noise_multiplier", noise_multiplier, low=0)
    if expected_batch_size is not None:
        number("expected_batch_size", expected_batch_size, low=0, low_open=True)


class DiceSGD(DPOptimizer):
    r"""An Opacus ``DPOptimizer`` that feeds the clipping error back (DiceSGD, Alg. 2), in sum units.

    Arguments are Opacus' plus ``error_max_grad_norm`` (C2 >= C1 = ``max_grad_norm``),
    ``process_group`` (ranks whose batches form the global batch; default the world when
    torch.distributed is initialized, ``False`` for none) and ``noise_seed`` (the noise generator's
    seed, equal on every rank; default rank 0's random choice, broadcast once). The generator lives
    on the parameters' device. With ``secure_mode=True`` (or a ``generator`` of your own) rank 0
    draws the noise, with Opacus' secure recipe in secure mode, and broadcasts it: every rank
    applies the same noise, and secure noise is never saved or replayed.
    ``expected_batch_size`` is the *global* expected batch size.

    Example::

        >>> import torch
        >>> from opacus import GradSampleModule
        >>> from commlib.privacy import DiceSGD
        >>> model = GradSampleModule(torch.nn.Linear(4, 1))
        >>> opt = DiceSGD(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
        ...               error_max_grad_norm=1.0, expected_batch_size=8, process_group=False, noise_seed=0)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    """

    def __init__(self, optimizer, *, noise_multiplier: float, max_grad_norm: float, error_max_grad_norm: float,
                 expected_batch_size: int | None, loss_reduction: str = "mean", generator=None,
                 secure_mode: bool = False, process_group=None, noise_seed: int | None = None, **kwargs):
        check_dice_arguments(noise_multiplier, max_grad_norm, error_max_grad_norm, expected_batch_size)
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                         generator=generator, secure_mode=secure_mode, **kwargs)
        self.error_max_grad_norm = float(error_max_grad_norm)
        if expected_batch_size is None:
            raise ValueError("expected_batch_size is required: the fed-back error is clipped at "
                             "expected_batch_size x error_max_grad_norm in sum units")
        self.error_clip_scale = float(expected_batch_size)  # the paper's mean-unit C2, in sum units
        self.kappa = noise_inflation(max_grad_norm, error_max_grad_norm)
        self.comm = None
        if process_group is not False and dist.is_available() and dist.is_initialized():
            group = process_group if process_group is not None else dist.group.WORLD
            if dist.get_world_size(group) > 1:
                self.comm = Comm(private_group(group))
                agree_across_ranks({"noise_multiplier": float(noise_multiplier), "max_grad_norm": float(max_grad_norm),
                                    "error_max_grad_norm": float(error_max_grad_norm),
                                    "expected_batch_size": expected_batch_size, "secure_mode": bool(secure_mode),
                                    "noise_seed": noise_seed, "loss_reduction": loss_reduction,
                                    "shapes": [list(p.shape) for p in self.params]}, self.comm.group, "DiceSGD")
        device = self.params[0].device if self.params else torch.device("cpu")
        # who draws the noise: every rank from one shared seed (the default: no communication), or
        # rank 0 alone and a broadcast (secure mode, or a generator of the user's, whose states
        # the ranks do not share): either way every rank applies the same noise
        self.noise_from_rank0 = secure_mode or generator is not None
        if secure_mode and noise_seed is not None:
            raise ValueError("noise_seed must be None with secure_mode=True: secure noise is not reproducible")
        if generator is None:
            if secure_mode:  # fresh entropy on rank 0 (pass a CSPRNG generator for cryptographic strength)
                seed = secrets.randbits(63)
            elif noise_seed is None:
                choice = torch.randint(0, 2**62, (1,), dtype=torch.int64)
                if self.comm is not None:
                    self.comm.broadcast(choice, src=0)
                seed = int(choice)
            else:
                seed = noise_seed
            self.generator = torch.Generator(device=device).manual_seed(seed)  # on the parameters' device
        self.error = [torch.zeros_like(p) for p in self.params]  # E, identical on every rank
        self.dice_steps = 0
        self.bytes_sent = self.total_bytes_sent = 0  # this rank's all-reduce (and noise broadcast) bytes
        self.skipped_steps = 0

    # ------------------------------------------------------------------ the step
    def clip_and_accumulate(self):
        """S_clip (into ``p.summed_grad``, as Opacus) and S_raw (into ``p.summed_raw``) in one pass."""
        samples = self.grad_samples
        if len(samples[0]) == 0:
            factors = torch.zeros((0,), device=samples[0].device)
        else:
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
            factors = global_clip_factors(norms, self.max_grad_norm)
        for p, grad_sample in zip(self.params, samples):
            _check_processed_flag(p.grad_sample)
            grad_sample = grad_sample.to(p.dtype)
            clipped = torch.einsum("i,i...", factors.to(p.dtype), grad_sample)
            raw = grad_sample.sum(0)
            p.summed_grad = clipped if p.summed_grad is None else p.summed_grad + clipped
            previous = getattr(p, "summed_raw", None)
            p.summed_raw = raw if previous is None else previous + raw
            _mark_as_processed(p.grad_sample)

    def add_noise(self):
        clipped = [p.summed_grad for p in self.params]
        raw = [p.summed_raw for p in self.params]
        if self.comm is not None:  # one all-reduce of both sums: the global batch's S_clip and S_raw
            flat = torch.cat([t.reshape(-1) for t in clipped + raw])
            self.comm.all_reduce(flat)
            sent = numel_bytes(flat)
            summed = split_like(flat, clipped + raw)
            clipped, raw = summed[: len(clipped)], summed[len(clipped):]
        else:
            sent = 0
        v, new_error = dice_update(clipped, raw, self.error, self.error_max_grad_norm * self.error_clip_scale)
        if all(bool(torch.isfinite(e).all()) for e in new_error):
            self.error = new_error
        else:
            self.skipped_steps += 1  # E kept; the non-finite update still reaches the parameters' grads
        std = self.noise_multiplier * self.max_grad_norm * self.kappa
        for p, value, noise in zip(self.params, v, self.draw_noise(std, v)):
            p.grad = (value + noise).view_as(p)
            p.summed_grad = None
            p.summed_raw = None
        if self.noise_from_rank0 and self.comm is not None and std != 0:
            sent += sum(numel_bytes(t) for t in v)
        self.bytes_sent = sent
        self.total_bytes_sent += sent
        self.dice_steps += 1

    def dense_bytes(self) -> int:
        """What plain data parallelism sends per step: one all-reduce of the gradients."""
        if self.comm is None:
            return 0
        return sum(numel_bytes(p) for p in self.params)

    def stats(self) -> dict:
        """The books (:func:`commlib.comm.rank_state.byte_books`): DiceSGD sends twice the dense bytes,
        S_clip and S_raw in one all-reduce (plus the noise in secure mode); ``skipped_steps`` counts
        steps whose new E was non-finite and was not kept."""
        dense = self.dense_bytes()
        return byte_books("dicesgd", self.dice_steps, self.bytes_sent, dense if self.dice_steps else 0,
                          self.total_bytes_sent, dense * self.dice_steps, self.skipped_steps)

    def draw_noise(self, std: float, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """``N(0, std^2)`` shaped like each tensor, the same on every rank: drawn on every rank
        from the shared generator, or (secure mode, a user's generator) drawn on rank 0 with
        Opacus' noise function (secure mode: its 2n-sample recipe against floating-point attacks)
        and broadcast."""
        if std == 0:
            return [torch.zeros_like(t) for t in like]
        if not self.noise_from_rank0 or self.comm is None or self.comm.rank == 0:
            noise = [_generate_noise(std, t, generator=self.generator, secure_mode=self.secure_mode).to(t.dtype)
                     for t in like]
        else:
            noise = [torch.empty_like(t) for t in like]
        if self.noise_from_rank0 and self.comm is not None:
            flat = torch.cat([n.reshape(-1) for n in noise])
            self.comm.broadcast(flat, src=0)
            noise = split_like(flat, noise)
        return noise

    def zero_grad(self, set_to_none: bool = False):
        for p in self.params:
            p.summed_raw = None
        super().zero_grad(set_to_none)

    # ------------------------------------------------------------------ checkpoints
    def dice_options(self) -> dict:
        """What fixes E's meaning: its shapes, and the batch size and C2 that set its units."""
        return {"shapes": [list(e.shape) for e in self.error], "expected_batch_size": self.error_clip_scale,
                "error_max_grad_norm": self.error_max_grad_norm}

    def dice_state_dict(self) -> dict:
        """E, the step count, the books and the noise generator's state (tensors and primitives) in
        the per-rank state layer's format (:mod:`commlib.comm.rank_state`). E is identical on every
        rank, so any rank's state fits any rank; the options it was saved under must match."""
        shared = self.generator is not None and not self.noise_from_rank0  # secure noise is never replayed
        return {"format": FORMAT, "method": "dicesgd", "options": self.dice_options(),
                "error": [e.clone() for e in self.error], "dice_steps": self.dice_steps,
                "total_bytes_sent": self.total_bytes_sent, "skipped_steps": self.skipped_steps,
                "generator": self.generator.get_state() if shared else None}

    def load_dice_state_dict(self, state: dict) -> None:
        """Loads E and the generator; a state saved under other options is refused on every rank."""
        check_format(state, "dicesgd")
        differ = options_differ(state["options"], self.dice_options())
        fatal = (f"DiceSGD state was saved under other options: {differ}. E lives in sum units of the "
                 "expected batch, is clipped at error_max_grad_norm and has one tensor per parameter, "
                 "so it does not fit these parameters") if differ else None
        verdict = agree_on_load(fatal, [], self.comm.group) if self.comm is not None else own_verdict(fatal, [])
        settle_load("DiceSGD", verdict, fatal, [], "error", "E")
        self.error = [e.clone().to(p.device) for e, p in zip(state["error"], self.params)]
        self.dice_steps = int(state["dice_steps"])
        self.total_bytes_sent = int(state["total_bytes_sent"])
        self.skipped_steps = int(state["skipped_steps"])
        if state["generator"] is not None and not self.noise_from_rank0:
            self.generator.set_state(state["generator"].cpu())

    def state_dict(self):
        out = dict(super().state_dict())
        out["dice"] = self.dice_state_dict()
        return out

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        dice = state_dict.pop("dice", None)
        if dice is None:  # loading it would silently restart the fed-back error E at zero
            raise ValueError("DiceSGD.load_state_dict: the state has no 'dice' entry (E, the fed-back clipping "
                             "error, and the noise generator): it was not saved by DiceSGD.state_dict()")
        super().load_state_dict(state_dict)
        self.load_dice_state_dict(dice)
