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
    # fused error feedback: pass 1 compresses v = pad(g + e, numel) without materializing it,
    # pass 2 (after the collective) writes e <- (g + e) - decompress in place
    "ef_sign_pack": "ef_sign_pack(Tensor grad, Tensor? residual, int chunk_size, int numel) -> (Tensor, Tensor)",
    "ef_sign_residual_": (
        "ef_sign_residual_(Tensor(a!) residual, Tensor grad, Tensor packed, Tensor scales, int chunk_size,"
        " int numel, bool accumulate) -> ()"
    ),
    "ef_qsgd_quantize": (
        "ef_qsgd_quantize(Tensor grad, Tensor? residual, int bits, int bucket_size, int seed, int numel)"
        " -> (Tensor, Tensor)"
    ),
    "ef_qsgd_residual_": (
        "ef_qsgd_residual_(Tensor(a!) residual, Tensor grad, Tensor codes, Tensor scales, int bits,"
        " int bucket_size, int numel, bool accumulate) -> ()"
    ),
    "ef_topk_abs": "ef_topk_abs(Tensor grad, Tensor? residual, int k, bool exact) -> (Tensor, Tensor)",
    "ef_sparse_residual_": (
        "ef_sparse_residual_(Tensor(a!) residual, Tensor grad, Tensor indices, Tensor values, bool accumulate) -> ()"
    ),
    "ef_gather": "ef_gather(Tensor grad, Tensor? residual, Tensor indices) -> (Tensor, Tensor)",
    # decompression into an existing tensor (out[:out.numel()] <- (out +) decompressed), no temporaries
    "sign_unpack_into_": (
        "sign_unpack_into_(Tensor(a!) out, Tensor packed, Tensor scales, int chunk_size, int numel,"
        " ScalarType dtype, bool accumulate) -> ()"
    ),
    "qsgd_dequantize_into_": (
        "qsgd_dequantize_into_(Tensor(a!) out, Tensor codes, Tensor scales, int bits, int bucket_size, int numel,"
        " ScalarType dtype, bool accumulate) -> ()"
    ),
    # PowerSGD's passes fused: M = G + E with P = M Q; then P Q^T written out with M <- M - P Q^T
    "powersgd_project": "powersgd_project(Tensor grad, Tensor? residual, Tensor q, Tensor(a!) m) -> Tensor",
    "powersgd_backproject_": "powersgd_backproject_(Tensor(a!) m, Tensor p, Tensor q, Tensor(b!) out) -> ()",
}

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)
