"""Cast to a 16-bit float type (fp16 / bf16) on the wire."""

import torch

from commlib.compress.base import Compressor, Payload, numel_of
from commlib.validation import one_of

_WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Cast(Compressor):
    """Sends ``tensor.to(dtype)``; summable (an allreduce in the wire dtype).

    fp16 overflows beyond 65504 to inf, which then propagates like any non-finite gradient;
    bf16 keeps fp32's range at 8 bits of mantissa.

    Example::

        >>> import torch
        >>> from commlib.compress import Cast
        >>> c = Cast(torch.bfloat16)
        >>> c.nbytes((1024,))
        2048
    """

    summable = True
    name = "cast"

    def __init__(self, dtype: torch.dtype = torch.float16):
        one_of("dtype", dtype, _WIRE_DTYPES)
        self.dtype = dtype

    def config(self):
        return {"dtype": self.dtype}

    def compress(self, tensor, *, seed=0):
        return Payload((tensor.reshape(-1).to(self.dtype),), tensor.shape, tensor.dtype)

    def decompress(self, payload):
        return payload.tensors[0].to(payload.dtype).view(payload.shape)

    def nbytes(self, shape, dtype=torch.float32):
        return numel_of(shape) * torch.empty((), dtype=self.dtype).element_size()
