"""Differential privacy with error feedback: DiceSGD on Opacus (``pip install -e .[privacy]``)."""

from commlib.privacy.dicesgd import DiceSGD, clip_global, dice_update, noise_inflation
from commlib.privacy.engine import DicePrivacyEngine

__all__ = ["DicePrivacyEngine", "DiceSGD", "clip_global", "dice_update", "noise_inflation"]
