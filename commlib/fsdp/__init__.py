"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): a compressed gradient
reduce-scatter (:func:`compress_gradients`) and a block-quantized parameter all-gather
(:func:`quantize_all_gather`). The low-rank optimizers of :mod:`commlib.optim` accept the sharded
(DTensor) parameters directly."""

from commlib.fsdp.all_gather import QuantizedAllGather, quantize_all_gather
from commlib.fsdp.reduce_scatter import CompressedReduceScatter
from commlib.fsdp.state import GradientCompression, compress_gradients, fsdp_modules

__all__ = ["CompressedReduceScatter", "GradientCompression", "QuantizedAllGather", "compress_gradients",
           "fsdp_modules", "quantize_all_gather"]
