"""commlib's custom ops (``torch.ops.commlib.*``) and their typed wrappers.

One module per op family holds, for each of its ops, the schema, the pure-PyTorch reference (the
readable spec, registered as the ``CompositeExplicitAutograd`` kernel: the fallback on every
device), the fake kernel and the wrapper: :mod:`commlib.ops.sign`, :mod:`commlib.ops.qsgd`,
:mod:`commlib.ops.sparse`, :mod:`commlib.ops.powersgd`. Compiled CPU/CUDA kernels (``csrc/``), once
loaded by :mod:`commlib._ext`, take over for their device through the dispatcher.
``SCHEMAS`` and ``REFERENCES`` map every op name to its schema and its reference.
"""

from __future__ import annotations

from commlib.ops import powersgd, qsgd, sign, sparse
from commlib.ops._library import REFERENCES, SCHEMAS
from commlib.ops.powersgd import *  # noqa: F403
from commlib.ops.qsgd import *  # noqa: F403
from commlib.ops.sign import *  # noqa: F403
from commlib.ops.sparse import *  # noqa: F403

__all__ = ["REFERENCES", "SCHEMAS", *sign.__all__, *qsgd.__all__, *sparse.__all__, *powersgd.__all__]
