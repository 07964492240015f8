"""commlib: compressed gradient communication for distributed PyTorch training.

"Rule N" in the code and tests is rule N of ``docs/invariants.md``: the rules every state keeps
(one collective order, identical ranks, state that knows whose it is, warm-up, non-finite values
propagate, fail loudly, ranks agree before they talk, private subgroups, ``p.grad`` edits count).
"""

from commlib import compress, hooks, ops
from commlib._ext import kernel_backend

__version__ = "0.1.0"
__all__ = ["compress", "hooks", "kernel_backend", "ops"]
