"""Shape-only (fake/meta) kernels, so the ops trace under torch.compile and FakeTensorMode."""

import torch


def _chunks(numel: int, chunk_size: int) -> int:
    if numel == 0:
        return 0
    chunk = numel if chunk_size == 0 or chunk_size >= numel else chunk_size
    return -(-numel // chunk)


@torch.library.register_fake("commlib::sign_pack")
def _sign_pack(x, chunk_size):
    n = x.numel()
    return x.new_empty(-(-n // 32), dtype=torch.int32), x.new_empty(_chunks(n, chunk_size), dtype=torch.float32)


@torch.library.register_fake("commlib::sign_unpack")
def _sign_unpack(packed, scales, numel, chunk_size, dtype):
    torch._check(packed.numel() == -(-numel // 32))
    return packed.new_empty(numel, dtype=dtype)


@torch.library.register_fake("commlib::qsgd_quantize")
def _qsgd_quantize(x, bits, bucket_size, seed):
    n = x.numel()
    return x.new_empty(-(-n // 8) * bits, dtype=torch.uint8), x.new_empty(-(-n // bucket_size), dtype=torch.float32)


@torch.library.register_fake("commlib::qsgd_dequantize")
def _qsgd_dequantize(codes, scales, bits, bucket_size, numel, dtype):
    torch._check(codes.numel() == -(-numel // 8) * bits)
    return codes.new_empty(numel, dtype=dtype)


@torch.library.register_fake("commlib::topk_abs")
def _topk_abs(x, k, exact):
    return x.new_empty(k), x.new_empty(k, dtype=torch.int32)


@torch.library.register_fake("commlib::ef_sign_pack")
def _ef_sign_pack(grad, residual, chunk_size, numel):
    return grad.new_empty(-(-numel // 32), dtype=torch.int32), grad.new_empty(_chunks(numel, chunk_size),
                                                                              dtype=torch.float32)


@torch.library.register_fake("commlib::ef_sign_residual_")
def _ef_sign_residual_(residual, grad, packed, scales, chunk_size, numel, accumulate):
    return None


@torch.library.register_fake("commlib::ef_qsgd_quantize")
def _ef_qsgd_quantize(grad, residual, bits, bucket_size, seed, numel):
    return (grad.new_empty(-(-numel // 8) * bits, dtype=torch.uint8),
            grad.new_empty(-(-numel // bucket_size), dtype=torch.float32))


@torch.library.register_fake("commlib::ef_qsgd_residual_")
def _ef_qsgd_residual_(residual, grad, codes, scales, bits, bucket_size, numel, accumulate):
    return None


@torch.library.register_fake("commlib::ef_topk_abs")
def _ef_topk_abs(grad, residual, k, exact):
    return grad.new_empty(k), grad.new_empty(k, dtype=torch.int32)


@torch.library.register_fake("commlib::ef_sparse_residual_")
def _ef_sparse_residual_(residual, grad, indices, values, accumulate):
    return None


@torch.library.register_fake("commlib::ef_gather")
def _ef_gather(grad, residual, indices):
    return grad.new_empty(indices.numel()), grad.new_empty((), dtype=torch.float32)


@torch.library.register_fake("commlib::powersgd_project")
def _powersgd_project(grad, residual, q, m):
    return grad.new_empty((grad.shape[0], q.shape[1]))


@torch.library.register_fake("commlib::powersgd_backproject_")
def _powersgd_backproject_(m, p, q, out):
    return None


@torch.library.register_fake("commlib::sign_unpack_into_")
def _sign_unpack_into_(out, packed, scales, chunk_size, numel, dtype, accumulate):
    return None


@torch.library.register_fake("commlib::qsgd_dequantize_into_")
def _qsgd_dequantize_into_(out, codes, scales, bits, bucket_size, numel, dtype, accumulate):
    return None
