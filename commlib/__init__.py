"""commlib: compressed gradient communication for distributed PyTorch training."""

from commlib import compress, hooks, ops
from commlib._ext import kernel_backend

__version__ = "0.1.0"
__all__ = ["compress", "hooks", "kernel_backend", "ops"]
