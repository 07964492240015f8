"""``DicePrivacyEngine``: Opacus' ``PrivacyEngine`` whose optimizer is :class:`DiceSGD`."""

from __future__ import annotations

from opacus import PrivacyEngine

from commlib.privacy.dicesgd import DiceSGD
from commlib.validation import number


def check_delta(delta) -> None:
    number("delta", delta, low=0, high=1, low_open=True, high_open=True)


class DicePrivacyEngine(PrivacyEngine):
    """Opacus' engine (accounting, Poisson sampling, ``GradSampleModule``) with DiceSGD as the optimizer.

    ``make_private(..., max_grad_norm=C1, error_max_grad_norm=C2)`` and
    ``make_private_with_epsilon(..., target_epsilon=, target_delta=, epochs=, max_grad_norm=C1,
    error_max_grad_norm=C2)`` return ``(module, DiceSGD optimizer, data_loader)``; the noise multiplier
    comes from Opacus' ``get_noise_multiplier`` for the chosen accountant and every step is recorded
    in ``engine.accountant``; ``engine.get_epsilon(delta)`` reports epsilon.

    Example::

        >>> engine = DicePrivacyEngine(accountant="rdp")                              # doctest: +SKIP
        >>> module, optimizer, loader = engine.make_private_with_epsilon(    # doctest: +SKIP
        ...     module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        ...     target_epsilon=4.0, target_delta=1e-5, epochs=10, max_grad_norm=1.0, error_max_grad_norm=1.0)
    """

    def get_epsilon(self, delta: float) -> float:
        check_delta(delta)
        return super().get_epsilon(delta)

    def make_private_with_epsilon(self, *args, target_delta: float, **kwargs):
        check_delta(target_delta)
        return super().make_private_with_epsilon(*args, target_delta=target_delta, **kwargs)

    def _prepare_optimizer(self, *, optimizer, noise_multiplier, max_grad_norm, expected_batch_size,
                           loss_reduction="mean", distributed=False, clipping="flat", noise_generator=None,
                           grad_sample_mode="hooks", error_max_grad_norm=None, **kwargs):
        if clipping != "flat":
            raise ValueError(f"DiceSGD clips by the norm over all parameters (clipping='flat'), got {clipping!r}")
        if error_max_grad_norm is None:
            raise ValueError("error_max_grad_norm (C2) is required for DiceSGD")
        if hasattr(optimizer, "original_optimizer"):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        return DiceSGD(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                       error_max_grad_norm=error_max_grad_norm, expected_batch_size=expected_batch_size,
                       loss_reduction=loss_reduction, generator=generator, secure_mode=self.secure_mode, **kwargs)
