"""EF21 / EF21-W constants: contraction factors of the compressors and the theory step sizes.

Notation of Richtárik, Sokolov, Fatkhullin (NeurIPS 2021) and Richtárik, Gasanov, Burlachenko
(ICLR 2024): a compressor C is contractive with factor ``alpha`` in (0, 1] when
``E||C(x) - x||^2 <= (1 - alpha) ||x||^2``.
"""

from __future__ import annotations

import math

from commlib import compress
from commlib.compress.topk import topk_count
from commlib.validation import integer, number


def _require_alpha(alpha) -> float:
    return number("alpha", alpha, low=0, high=1, low_open=True)


def _require_positive(name, value) -> float:
    return number(name, value, low=0, low_open=True)


def ef21_theta_beta(alpha: float) -> tuple[float, float]:
    """``theta = 1 - sqrt(1 - alpha)``, ``beta = (1 - alpha) / (1 - sqrt(1 - alpha))`` (EF21, Lemma 3)."""
    alpha = _require_alpha(alpha)
    root = math.sqrt(1.0 - alpha)
    theta = 1.0 - root
    return theta, (1.0 - alpha) / theta


def ef21_xi(alpha: float) -> float:
    """``sqrt(beta / theta) = sqrt(1 - alpha) / (1 - sqrt(1 - alpha))``; 0 for alpha = 1, <= 2/alpha - 1."""
    theta, beta = ef21_theta_beta(alpha)
    return math.sqrt(beta / theta)


def ef21_stepsize(alpha: float, L: float, L_tilde: float) -> float:
    """EF21's step size ``1 / (L + L_tilde * sqrt(beta / theta))`` (EF21, Theorem 1).

    ``L`` is the smoothness of the average f, ``L_tilde`` the workers' quadratic mean
    ``sqrt(mean L_i^2)`` for EF21 (:func:`quadratic_mean`), or their arithmetic mean for EF21-W
    (:func:`ef21w_stepsize`).
    """
    L = _require_positive("L", L)
    L_tilde = _require_positive("L_tilde", L_tilde)
    return 1.0 / (L + L_tilde * ef21_xi(alpha))


def smoothness_constants(values) -> list[float]:
    """The workers' ``L_i`` as floats: a non-empty list of finite numbers > 0."""
    values = [_require_positive("L_i", float(v)) for v in values]
    if not values:
        raise ValueError("L_i must be a non-empty list")
    return values


def quadratic_mean(values) -> float:
    values = smoothness_constants(values)
    return math.sqrt(sum(v * v for v in values) / len(values))


def arithmetic_mean(values) -> float:
    values = smoothness_constants(values)
    return sum(values) / len(values)


def ef21_stepsize_from_smoothness(alpha: float, L: float, L_i) -> float:
    """EF21 with ``L_tilde = L_QM = sqrt(mean L_i^2)``."""
    return ef21_stepsize(alpha, L, quadratic_mean(L_i))


def ef21w_stepsize(alpha: float, L: float, L_i) -> float:
    """EF21-W with ``L_tilde = L_AM = mean L_i`` (Richtárik, Gasanov, Burlachenko 2024, Theorem 2):
    never smaller than EF21's, and ``L_QM / L_AM`` times larger in the limit of heavy compression."""
    return ef21_stepsize(alpha, L, arithmetic_mean(L_i))


def ef21w_weights(L_i) -> list[float]:
    """EF21-W's weights ``w_i = L_i / sum_j L_j``."""
    values = smoothness_constants(L_i)
    total = sum(values)
    return [v / total for v in values]


def compressor_alpha(compressor, numel: int) -> float:
    """The contraction factor ``alpha`` of ``compressor`` on tensors of ``numel`` elements.

    * Identity: 1. Cast: ``1 - u^2`` with u the unit roundoff (fp16 2^-11, bf16 2^-8).
    * TopK and (biased) RandomK: ``k / d`` with ``k = ceil(density d)``.
    * Sign (scaled by the chunk's mean |x|): ``1 / chunk`` in the worst case (all mass on one entry).
    * QSGD (unbiased, 2^bits levels per bucket of B): ``E||C(x) - x||^2 <= (B - 1)/(2^bits - 1)^2 ||x||^2``,
      so alpha = 1 - that when it is < 1; otherwise QSGD is not contractive and this raises.
    """
    integer("numel", numel, 1)
    if isinstance(compressor, compress.Identity):
        return 1.0
    if isinstance(compressor, compress.Cast):
        import torch

        unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(compressor.dtype, 2.0**-24)
        return 1.0 - unit * unit
    if isinstance(compressor, compress.TopK):
        return topk_count(numel, compressor.density) / numel
    if isinstance(compressor, compress.RandomK):
        if compressor.unbiased:
            raise ValueError("RandomK(unbiased=True) scales by d/k and is not contractive; use unbiased=False")
        return topk_count(numel, compressor.density) / numel
    if isinstance(compressor, compress.Sign):
        if not compressor.scaled:
            raise ValueError("Sign(scaled=False) is not contractive (its output norm does not follow the input's)")
        chunk = compressor.chunk_size or numel
        return 1.0 / min(chunk, numel)
    if isinstance(compressor, compress.QSGD):
        omega = (min(compressor.bucket_size, numel) - 1) / (2**compressor.bits - 1) ** 2
        if omega >= 1:
            raise ValueError(f"QSGD(bits={compressor.bits}, bucket_size={compressor.bucket_size}) is not contractive "
                             f"(variance factor {omega:.3g} >= 1); use bucket_size < {(2**compressor.bits - 1)**2 + 1}")
        return 1.0 - omega
    raise ValueError(f"no contraction factor known for {compressor!r}")
