"""No compression: the dense tensor itself."""

import torch

from commlib.compress.base import Compressor, Payload, numel_of


class Identity(Compressor):
    """Sends the tensor as it is. Useful as the neutral element of error feedback.

    Example::

        >>> from commlib.compress import Identity
        >>> import torch
        >>> c = Identity(); t = torch.randn(3, 4)
        >>> torch.equal(c.decompress(c.compress(t)), t)
        True
    """

    summable = True
    name = "identity"

    def compress(self, tensor, *, seed=0):
        return Payload((tensor.reshape(-1),), tensor.shape, tensor.dtype)

    def decompress(self, payload):
        return payload.tensors[0].view(payload.shape)

    def nbytes(self, shape, dtype=torch.float32):
        return numel_of(shape) * torch.empty((), dtype=dtype).element_size()
