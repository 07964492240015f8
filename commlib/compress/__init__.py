"""Compressors: pure functions of a tensor (``compress``, ``decompress``, ``nbytes``), no communication."""

from commlib.compress.base import Compressor, Payload, derive_seed
from commlib.compress.cast import Cast
from commlib.compress.identity import Identity
from commlib.compress.powersgd import PowerSGD
from commlib.compress.qsgd import QSGD
from commlib.compress.randomk import RandomK
from commlib.compress.sign import Sign
from commlib.compress.spec import from_string
from commlib.compress.topk import TopK

__all__ = ["Cast", "Compressor", "Identity", "Payload", "PowerSGD", "QSGD", "RandomK", "Sign", "TopK", "derive_seed",
           "from_string"]
