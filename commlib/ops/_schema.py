"""The one table of commlib's custom ops. C++/CUDA files only implement these (TORCH_LIBRARY_IMPL)."""

import torch

LIBRARY = torch.library.Library("commlib", "DEF")

SCHEMAS = {
    "sign_pack": "sign_pack(Tensor x, int chunk_size) -> (Tensor, Tensor)",
    "sign_unpack": "sign_unpack(Tensor packed, Tensor scales, int numel, int chunk_size, ScalarType dtype) -> Tensor",
    "qsgd_quantize": "qsgd_quantize(Tensor x, int bits, int bucket_size, int seed) -> (Tensor, Tensor)",
    "qsgd_dequantize": (
        "qsgd_dequantize(Tensor codes, Tensor scales, int bits, int bucket_size, int numel, ScalarType dtype)"
        " -> Tensor"
    ),
    "topk_abs": "topk_abs(Tensor x, int k, bool exact) -> (Tensor, Tensor)",
}

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)
