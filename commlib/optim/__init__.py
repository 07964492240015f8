"""Low-rank memory-efficient optimizers: GaLore, Fira, FRUGAL with SVD / random / DCT projectors."""

from commlib.optim import projectors
from commlib.optim.lowrank import FiraAdamW, FrugalAdamW, GaLoreAdamW, LowRankAdamW

__all__ = ["FiraAdamW", "FrugalAdamW", "GaLoreAdamW", "LowRankAdamW", "projectors"]
